"""The AE-FLOW bottleneck: a FrEIA sequence of ``AllInOneBlock`` affine coupling blocks."""

from __future__ import annotations

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

__all__ = ["SUBNETS", "ConvSubnet", "ResNetSubnet", "NormalizingFlow"]


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


class NormalizingFlow(nn.Module):
    """Invertible map from encoder features z to z' with a standard normal target.

    A FrEIA ``SequenceINN`` of ``AllInOneBlock`` s with ``affine_clamping`` (the paper's exp(2 tanh(s))),
    ``global_affine_type="SOFTPLUS"`` and a fixed, seeded hard channel permutation after each block.
    The spatial size is free: the blocks are fully convolutional.

    Args:
        channels: feature channels C.
        n_blocks: number of coupling blocks (8 in the paper).
        subnet: ``"conv"`` or ``"resnet"``.
        hidden_ratio: hidden width of the ``conv`` subnet relative to its input channels.
        affine_clamping: soft clamp of the log-scale.
        permutation_seed: seed of the fixed channel permutations (stored in the state dict as well).

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
    ) -> None:
        super().__init__()
        if subnet not in SUBNETS:
            raise ValueError(f"unknown subnet {subnet!r}; choose one of {sorted(SUBNETS)}")
        if channels < 2:
            raise ValueError(f"the flow needs at least 2 channels, got {channels}")
        self.channels = channels
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
        z_prime, log_det = self.inn(z)
        return z_prime, log_det

    def inverse(self, z_prime: torch.Tensor) -> torch.Tensor:
        """Map latents back to features (the inverse of :meth:`forward`)."""
        z, _ = self.inn(z_prime, rev=True)
        return z
