"""The AE-FLOW bottleneck: a FrEIA sequence of ``AllInOneBlock`` affine coupling blocks.

Numerics under autocast: the flow's log-determinant and its output ``z'`` (whose squares are the density)
are computed in float32 whatever the autocast. The coupling arithmetic (clamped ``exp``, shift, global
affine, log-det sums) and the channel permutation (a gather, exact) run with autocast disabled; the coupling
subnets' convolutions run in the autocast dtype when it is bfloat16 (float32's exponent range) and in float32
when it is float16, whose range (65504) the hidden activations and log-det sums of wide features exceed.
"""

from __future__ import annotations

import contextlib

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

__all__ = ["SUBNETS", "ConvSubnet", "ResNetSubnet", "ActNorm", "CouplingBlock", "NormalizingFlow"]


def _float32(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled on the tensor's device type (the enclosed code runs in float32)."""
    return torch.autocast(x.device.type, enabled=False)


def _full(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is float16 / bfloat16 (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _subnet_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """float32 under float16 autocast (overflow beyond 65504); the autocast dtype otherwise."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
        return _float32(x)
    return contextlib.nullcontext()


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _subnet_precision(x):
            return _full(super().forward(_full(x)))


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
        with _subnet_precision(x):
            x = _full(x)
            return _full(self.main(x) + self.shortcut(x))


SUBNETS: dict[str, type[nn.Module]] = {"conv": ConvSubnet, "resnet": ResNetSubnet}


class CouplingBlock(Fm.AllInOneBlock):
    """FrEIA's ``AllInOneBlock`` with its affine coupling, global affine and log-determinant in float32 and its
    hard channel permutation as an exact gather (same parameters and state-dict keys as the FrEIA block).

    FrEIA applies the permutation as a 1x1 convolution with a one-hot matrix: under autocast (or TF32) that
    rounds every ``z'`` to the reduced precision, and it costs a ``C x C`` matrix product per pixel. Blocks
    built with ``permute_soft=True`` (a dense orthogonal matrix) keep the convolution, in float32.

    Args:
        dims_in: FrEIA's input dimensions.
        dims_c: FrEIA's condition dimensions.
        permute_soft: a dense random orthogonal matrix instead of a hard permutation.
        kwargs: the other ``AllInOneBlock`` arguments.
    """

    def __init__(self, dims_in: list, dims_c: list | None = None, permute_soft: bool = False, **kwargs) -> None:
        super().__init__(dims_in, dims_c or [], permute_soft=permute_soft, **kwargs)
        self.hard_permutation = not permute_soft

    def _affine(self, x: torch.Tensor, a: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with _float32(x):
            return super()._affine(_full(x), _full(a), rev)

    def _permute(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with _float32(x):
            x = _full(x)
            if self.GIN or self.householder or not self.hard_permutation:
                return super()._permute(x, rev)
            scale = self.global_scale_activation(self.global_scale)
            log_jac = torch.sum(torch.log(scale))
            if rev:
                return (self._gather(x, self.w_perm_inv) - self.global_offset) / scale, log_jac
            return self._gather(x * scale + self.global_offset, self.w_perm), log_jac

    @staticmethod
    def _gather(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # output channel i of conv2d(x, w) with one-hot rows is input channel argmax(w[i])
        return x.index_select(1, w[:, :, 0, 0].argmax(1))


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
                CouplingBlock,
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
        z = _full(z)
        if self.actnorm is None:
            return self.inn(z)
        with _float32(z):
            z, log_det_norm = self.actnorm(z)
        z_prime, log_det = self.inn(z)
        return z_prime, log_det + log_det_norm

    def inverse(self, z_prime: torch.Tensor) -> torch.Tensor:
        """Map latents back to features (the inverse of :meth:`forward`)."""
        z, _ = self.inn(_full(z_prime), rev=True)
        if self.actnorm is None:
            return z
        with _float32(z):
            return self.actnorm.inverse(z)

    @property
    def needs_initialization(self) -> bool:
        """True when the :class:`ActNorm` layer has not been initialised from data yet."""
        return self.actnorm is not None and not bool(self.actnorm.initialized)

    def initialize(self, z: torch.Tensor) -> None:
        """Initialise the :class:`ActNorm` layer from encoder features of healthy images (no-op without it)."""
        if self.actnorm is not None:
            self.actnorm.initialize(z)
