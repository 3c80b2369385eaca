"""The AE-FLOW bottleneck: a FrEIA sequence of ``AllInOneBlock`` affine coupling blocks."""

from __future__ import annotations

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

__all__ = ["SUBNETS", "ConvSubnet", "ResNetSubnet", "ActNorm", "NormalizingFlow"]


class ConvSubnet(nn.Sequential):
    """Coupling subnet ``Conv3x3(c -> h) - ReLU - Conv1x1(h -> out)``.

    Args:
        in_channels: channels of the conditioning half.
        out_channels: channels of the predicted scale and shift (twice the transformed half).
        hidden_ratio: h = ``hidden_ratio * in_channels`` (1.0 in the paper).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_ratio: float = 1.0) -> None:
        hidden = max(1, int(round(in_channels * hidden_ratio)))
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )


class ResNetSubnet(nn.Module):
    """Coupling subnet with a ``Conv3x3 - BatchNorm - ReLU`` main path and a ``Conv1x1`` shortcut, summed.

    Args:
        in_channels: channels of the conditioning half.
        out_channels: channels of the predicted scale and shift.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_ratio: float = 1.0) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


SUBNETS: dict[str, type[nn.Module]] = {"conv": ConvSubnet, "resnet": ResNetSubnet}


class ActNorm(nn.Module):
    """Per-channel affine layer ``z * exp(s) + b`` with data-dependent initialisation (Kingma & Dhariwal, 2018).

    :meth:`initialize` sets ``s`` and ``b`` so that the given features have zero mean and unit variance per
    channel; both stay trainable. The log-determinant uses the runtime spatial size, so any input size works.
    The ``initialized`` flag is part of the state dict: a loaded model is never re-initialised.

    Args:
        channels: feature channels.
        eps: floor of the standard deviation (constant channels, e.g. dead ReLUs).
    """

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps

    @torch.no_grad()
    def initialize(self, z: torch.Tensor) -> None:
        """Standardise the channels of ``z`` (B, C, h, w) from now on."""
        flat = z.transpose(0, 1).reshape(z.shape[1], -1).float()
        std = flat.std(dim=1).clamp_min(self.eps)
        self.log_scale.copy_((-torch.log(std)).view_as(self.log_scale))
        self.bias.copy_((-flat.mean(dim=1) / std).view_as(self.bias))
        self.initialized.fill_(True)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_pixels = z[0, 0].numel()
        log_det = (self.log_scale.sum() * n_pixels).expand(z.shape[0])
        return z * self.log_scale.exp() + self.bias, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.bias) * torch.exp(-self.log_scale)


class NormalizingFlow(nn.Module):
    """Invertible map from encoder features z to z' with a standard normal target.

    A FrEIA ``SequenceINN`` of ``AllInOneBlock`` s with ``affine_clamping`` (the paper's exp(2 tanh(s))),
    ``global_affine_type="SOFTPLUS"`` and a fixed, seeded hard channel permutation after each block.
    The spatial size is free: the blocks are fully convolutional. With ``actnorm=True`` an :class:`ActNorm`
    layer comes first; call :meth:`initialize` with features of healthy training images before training
    (the training workflow does) so that the couplings start from standardised features.

    Args:
        channels: feature channels C.
        n_blocks: number of coupling blocks (8 in the paper).
        subnet: ``"conv"`` or ``"resnet"``.
        hidden_ratio: hidden width of the ``conv`` subnet relative to its input channels.
        affine_clamping: soft clamp of the log-scale.
        permutation_seed: seed of the fixed channel permutations (stored in the state dict as well).
        actnorm: put a data-initialised per-channel affine layer before the coupling blocks.

    Example::

        flow = NormalizingFlow(256)
        z_prime, log_det = flow(torch.randn(2, 256, 8, 8))
        z = flow.inverse(z_prime)
    """

    def __init__(
        self,
        channels: int,
        n_blocks: int = 8,
        subnet: str = "conv",
        hidden_ratio: float = 1.0,
        affine_clamping: float = 2.0,
        permutation_seed: int = 0,
        actnorm: bool = True,
    ) -> None:
        super().__init__()
        if subnet not in SUBNETS:
            raise ValueError(f"unknown subnet {subnet!r}; choose one of {sorted(SUBNETS)}")
        if channels < 2:
            raise ValueError(f"the flow needs at least 2 channels, got {channels}")
        self.channels = channels
        self.actnorm = ActNorm(channels) if actnorm else None
        subnet_cls = SUBNETS[subnet]

        def constructor(c_in: int, c_out: int) -> nn.Module:
            return subnet_cls(c_in, c_out, hidden_ratio)

        self.inn = Ff.SequenceINN(channels, 1, 1)
        for _ in range(n_blocks):
            self.inn.append(
                Fm.AllInOneBlock,
                subnet_constructor=constructor,
                affine_clamping=affine_clamping,
                global_affine_type="SOFTPLUS",
                permute_soft=False,
            )
        self._fix_permutations(permutation_seed)

    @torch.no_grad()
    def _fix_permutations(self, seed: int) -> None:
        # FrEIA draws its permutations from numpy's global generator; replace them with seeded ones.
        gen = torch.Generator().manual_seed(seed)
        eye = torch.eye(self.channels)
        for block in self.inn.module_list:
            perm = torch.randperm(self.channels, generator=gen)
            w = eye[perm].view(self.channels, self.channels, 1, 1)
            block.w_perm.data.copy_(w)
            block.w_perm_inv.data.copy_(w.transpose(0, 1).contiguous())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map features to the latent space.

        Args:
            z: features (B, C, h, w).

        Returns:
            z' of the same shape and the log-determinant of the Jacobian per sample, shape (B,).
        """
        if self.actnorm is None:
            return self.inn(z)
        z, log_det_norm = self.actnorm(z)
        z_prime, log_det = self.inn(z)
        return z_prime, log_det + log_det_norm

    def inverse(self, z_prime: torch.Tensor) -> torch.Tensor:
        """Map latents back to features (the inverse of :meth:`forward`)."""
        z, _ = self.inn(z_prime, rev=True)
        return z if self.actnorm is None else self.actnorm.inverse(z)

    @property
    def needs_initialization(self) -> bool:
        """True when the :class:`ActNorm` layer has not been initialised from data yet."""
        return self.actnorm is not None and not bool(self.actnorm.initialized)

    def initialize(self, z: torch.Tensor) -> None:
        """Initialise the :class:`ActNorm` layer from encoder features of healthy images (no-op without it)."""
        if self.actnorm is not None:
            self.actnorm.initialize(z)
