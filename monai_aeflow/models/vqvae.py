"""VQ-VAE and VQ-GAN baselines: their losses (the VQ-GAN's holds the patch discriminator), score and specs.

Both networks (:class:`monai_aeflow.networks.vqvae.VQVAENet` and :class:`~monai_aeflow.networks.vqvae.VQGANNet`)
wrap MONAI's ``VQVAE`` and are scored by their reconstruction error
(:func:`monai_aeflow.models.common.reconstruction_score`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.models.common import loss_options, reconstruction_score
from monai_aeflow.models.spec import ModelSpec
from monai_aeflow.networks.vqvae import VQGANNet, VQOutput, VQVAENet

__all__ = [
    "VQGAN_SPEC",
    "VQVAE_SPEC",
    "VQGANLoss",
    "VQVAELoss",
    "make_vqgan_loss",
    "make_vqvae_loss",
    "reconstruction_score",
]


class VQVAELoss(nn.Module):
    """VQ-VAE loss: reconstruction (MSE) plus MONAI's commitment loss (the codebook is updated by EMA).

    Args:
        quantization_weight: weight of the commitment loss.

    Returns (from ``forward``):
        ``{"loss", "loss_recon", "loss_quant"}``.
    """

    def __init__(self, quantization_weight: float = 1.0) -> None:
        super().__init__()
        self.quantization_weight = float(quantization_weight)

    def forward(self, output: VQOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of one batch.

        Args:
            output: the VQ-VAE's output.
            x: the input images.

        Returns:
            ``{"loss", "loss_recon", "loss_quant"}``.
        """
        rec = F.mse_loss(output.x_raw.float(), x.float())
        quant = output.quantization_loss.float().mean()
        loss = rec + self.quantization_weight * quant
        return {"loss": loss, "loss_recon": rec.detach(), "loss_quant": quant.detach()}


class VQGANLoss(nn.Module):
    """VQ-GAN loss (Esser et al.) with MONAI's ``PatchDiscriminator`` and ``PatchAdversarialLoss``.

    Generator: ``L1(x, x') + perceptual_weight * LPIPS + commitment + w * L_adv`` where ``L_adv`` is the
    generator's adversarial loss on the patch discriminator's logits and ``w = adv_weight``, or, with
    ``adaptive_weight``, ``adv_weight * ||grad L_rec|| / (||grad L_adv|| + 1e-4)`` (Eq. 3.14 of the seed thesis)
    with the gradients taken with respect to the reconstruction (the decoder's output) rather than its last
    layer's weights. The discriminator (3 stride-2 and 2 stride-1 4x4 convolutions, as in the thesis'
    Table 4.2) and its Adam optimiser live in this module; the trainer calls :meth:`discriminator_step`
    after each generator step. They are created on the first batch (channels and device of the data) and are
    not part of the saved model or of resumable checkpoints.

    The perceptual loss needs pretrained weights (LPIPS or torchvision models) that are downloaded on first use;
    it is off by default (``perceptual_weight=0``) so that training works offline. Asking for it without the
    weights raises a clear error.

    Args:
        adv_weight: weight of the adversarial term.
        adaptive_weight: scale it by the ratio of gradient norms (see above).
        adv_start: generator steps before the adversarial terms (and discriminator updates) start.
        disc_channels: width of the discriminator's first layer.
        disc_layers: stride-2 layers of the discriminator.
        disc_lr: discriminator learning rate (Adam, betas 0.5 and 0.9).
        criterion: ``"least_squares"``, ``"hinge"`` or ``"bce"`` (MONAI's ``PatchAdversarialLoss``).
        quantization_weight: weight of the commitment loss.
        perceptual_weight: weight of MONAI's ``PerceptualLoss`` (0: off).
        perceptual_network: its network (``"alex"``, ``"vgg"``, ``"squeeze"``, ...).

    Returns (from ``forward``):
        ``{"loss", "loss_recon", "loss_quant", "loss_adv", "adv_weight"}`` (+ ``"loss_perceptual"``).
    """

    def __init__(
        self,
        adv_weight: float = 0.01,
        adaptive_weight: bool = False,
        adv_start: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_lr: float = 2e-4,
        criterion: str = "least_squares",
        quantization_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual_network: str = "alex",
    ) -> None:
        super().__init__()
        if adv_weight < 0 or perceptual_weight < 0 or adv_start < 0:
            raise AEFlowInputError("adv_weight, perceptual_weight and adv_start must be >= 0")
        self.adv_weight = float(adv_weight)
        self.adaptive_weight = bool(adaptive_weight)
        self.adv_start = int(adv_start)
        self.disc_channels = int(disc_channels)
        self.disc_layers = int(disc_layers)
        self.disc_lr = float(disc_lr)
        self.quantization_weight = float(quantization_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.adversarial = PatchAdversarialLoss(criterion=criterion)
        self.discriminator: PatchDiscriminator | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.perceptual: nn.Module | None = None
        if self.perceptual_weight > 0:
            try:
                from monai.losses import PerceptualLoss

                self.perceptual = PerceptualLoss(spatial_dims=2, network_type=perceptual_network)
            except Exception as err:  # missing lpips package, no network access, no cached weights
                raise AEFlowInputError(
                    f"the perceptual loss needs pretrained {perceptual_network!r} weights that could not be loaded "
                    f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                    "set perceptual_weight=0 to train without it"
                ) from None

    def _ensure_modules(self, x: torch.Tensor) -> PatchDiscriminator:
        """Create the discriminator (and its optimiser) on the first batch, and keep it on the data's device."""
        if self.discriminator is None:
            self.discriminator = PatchDiscriminator(
                spatial_dims=2, channels=self.disc_channels, in_channels=x.shape[1], num_layers_d=self.disc_layers
            ).to(x.device)
            self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.disc_lr, betas=(0.5, 0.9))
        elif next(self.discriminator.parameters()).device != x.device:
            self.discriminator.to(x.device)
        if self.perceptual is not None:
            self.perceptual.to(x.device)
        return self.discriminator

    @property
    def adversarial_active(self) -> bool:
        """Whether the adversarial terms are on (after ``adv_start`` generator steps)."""
        return self.steps > self.adv_start

    def forward(self, output: VQOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator's loss of one batch (counts a generator step when gradients are on).

        Args:
            output: the VQ-GAN's output.
            x: the input images.

        Returns:
            ``{"loss", "loss_recon", "loss_quant", "loss_adv", "adv_weight"}`` (+ ``"loss_perceptual"``).
        """
        disc = self._ensure_modules(x)
        if torch.is_grad_enabled():
            self.steps += 1
        x_rec = output.x_raw
        rec = F.l1_loss(x_rec.float(), x.float())
        quant = output.quantization_loss.float().mean()
        rec_total = rec
        out: dict[str, torch.Tensor] = {"loss_recon": rec.detach(), "loss_quant": quant.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(x_rec.float(), x.float())
            rec_total = rec_total + self.perceptual_weight * perceptual
            out["loss_perceptual"] = perceptual.detach()
        loss = rec_total + self.quantization_weight * quant
        weight = torch.zeros((), device=x.device)
        g_adv = torch.zeros((), device=x.device)
        if self.adversarial_active and self.adv_weight > 0:
            flags = [p.requires_grad for p in disc.parameters()]
            for p in disc.parameters():  # the generator step does not need the discriminator's gradients
                p.requires_grad_(False)
            try:
                g_adv = self.adversarial(disc(x_rec.float())[-1], target_is_real=True, for_discriminator=False)
            finally:
                for p, flag in zip(disc.parameters(), flags, strict=True):
                    p.requires_grad_(flag)
            weight = torch.tensor(self.adv_weight, device=x.device)
            if self.adaptive_weight and x_rec.requires_grad:
                g_rec = torch.autograd.grad(rec_total, x_rec, retain_graph=True)[0]
                g_gan = torch.autograd.grad(g_adv, x_rec, retain_graph=True)[0]
                ratio = g_rec.float().norm() / (g_gan.float().norm() + 1e-4)
                weight = self.adv_weight * ratio.clamp(0.0, 1e4).detach()
            loss = loss + weight * g_adv
        out.update({"loss_adv": g_adv.detach(), "adv_weight": weight.detach()})
        return {"loss": loss, **out}

    def discriminator_step(self, output: VQOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update of the patch discriminator on the real batch and its (detached) reconstructions.

        Args:
            output: the generator's output of this iteration.
            x: the real images.

        Returns:
            ``{"loss_disc": ...}`` (empty before ``adv_start`` steps).
        """
        if not self.adversarial_active or self.adv_weight == 0:
            return {}
        disc = self._ensure_modules(x)
        disc.train()
        self.disc_optimizer.zero_grad(set_to_none=True)
        real = self.adversarial(disc(x.float().detach())[-1], target_is_real=True, for_discriminator=True)
        fake = self.adversarial(disc(output.x_raw.float().detach())[-1], target_is_real=False, for_discriminator=True)
        loss = 0.5 * (real + fake)
        loss.backward()
        self.disc_optimizer.step()
        return {"loss_disc": loss.detach()}


def make_vqvae_loss(training: Mapping[str, Any]) -> nn.Module:
    """The VQ-VAE's loss from the training settings.

    Args:
        training: ``loss_options={"quantization_weight": ...}`` (default 1).

    Returns:
        A :class:`VQVAELoss`.
    """
    return VQVAELoss(**loss_options(training, {"quantization_weight": 1.0}, "vqvae"))


def make_vqgan_loss(training: Mapping[str, Any]) -> nn.Module:
    """The VQ-GAN's loss from the training settings.

    Args:
        training: ``lr`` (the discriminator's default learning rate) and ``loss_options`` (the keyword
            arguments of :class:`VQGANLoss`).

    Returns:
        A :class:`VQGANLoss`.
    """
    defaults = {
        "adv_weight": 0.01,
        "adaptive_weight": False,
        "adv_start": 0,
        "disc_channels": 64,
        "disc_layers": 3,
        "disc_lr": float(training.get("lr", 2e-4)),
        "criterion": "least_squares",
        "quantization_weight": 1.0,
        "perceptual_weight": 0.0,
        "perceptual_network": "alex",
    }
    return VQGANLoss(**loss_options(training, defaults, "vqgan"))


VQVAE_SPEC = ModelSpec(
    name="vqvae",
    network_cls=VQVAENet,
    make_loss=make_vqvae_loss,
    score=reconstruction_score,
    description="VQ-VAE (MONAI VQVAE, EMA codebook); reconstruction error",
    defaults={"in_channels": 1},
)
"""The VQ-VAE in the registry."""

VQGAN_SPEC = ModelSpec(
    name="vqgan",
    network_cls=VQGANNet,
    make_loss=make_vqgan_loss,
    score=reconstruction_score,
    description="VQ-GAN (MONAI VQVAE + PatchDiscriminator, no perceptual loss by default); reconstruction error",
    defaults={"in_channels": 1},
)
"""The VQ-GAN in the registry."""
