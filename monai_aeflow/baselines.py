"""Losses, anomaly scores and registration of the baseline models (:mod:`monai_aeflow.networks.baselines`).

Each baseline is scored as in its paper, behind AE-FLOW's interface (``score(network, x, beta, map_kind)``,
higher = more anomalous):

==============  ==========================================================  =====================================
model           training loss                                               image score / pixel map
==============  ==========================================================  =====================================
``ae``          MSE                                                         mean squared error / ``|x - x'|``
``vae``         ``(SSE + kl_weight * KL) / N`` (negative ELBO, N pixels)    negative ELBO per pixel / ``|x - x'|``
``pchvae``      Eq. 9 of Zimmerer et al. (three reconstruction terms, two   negative ELBO per pixel / ``|x - x'|``
                KL terms), divided by N
``vqvae``       MSE + commitment loss (EMA codebook)                        mean squared error / ``|x - x'|``
``vqgan``       L1 + commitment + adversarial (patch discriminator)         mean squared error / ``|x - x'|``
``flowonly``    per-dimension flow NLL (AE-FLOW with alpha = 1)             ``-exp(mean_d log N(z'))`` (AE-FLOW's
                                                                            S_flow, beta = 1) / likelihood map
``intensity``   none (nothing is trained)                                   maximum / the median-filtered image
==============  ==========================================================  =====================================

The ELBO scores use the posterior means (a deterministic, single-pass estimate). Reconstruction models also
accept ``map_kind="ssim"`` (1 - SSIM map). Loss settings come from ``training["loss_options"]`` (a dict;
unknown keys are refused), e.g. ``{"kl_weight": 0.5}``.
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
from monai_aeflow.losses import flow_nll_per_dim
from monai_aeflow.models import ModelSpec, register_model
from monai_aeflow.networks.aeflow import AEFlowOutput
from monai_aeflow.networks.baselines import (
    PCHVAE,
    ConvAutoEncoder,
    DenseVAE,
    FlowOnlyAEFlow,
    IntensityBaseline,
    PCHVAEOutput,
    VAEOutput,
    VQGANNet,
    VQOutput,
    VQVAENet,
)
from monai_aeflow.scores import flow_score, residual_map, ssim, ssim_anomaly_map

__all__ = [
    "BASELINE_NAMES",
    "THESIS_VAE_CONFIG",
    "gaussian_kl",
    "likelihood_map",
    "ReconstructionLoss",
    "VAELoss",
    "PCHVAELoss",
    "VQVAELoss",
    "VQGANLoss",
    "FlowOnlyLoss",
    "reconstruction_score",
    "vae_score",
    "pchvae_score",
    "flow_only_score",
    "intensity_score",
    "register_baselines",
]

BASELINE_NAMES: tuple[str, ...] = ("intensity", "ae", "vae", "pchvae", "vqvae", "vqgan", "flowonly")
"""Registry names of the baselines, in the order of comparison tables."""

THESIS_VAE_CONFIG: dict[str, Any] = {"in_channels": 1, "image_size": [95, 79], "latent_dim": 128}
"""The VAE of the seed thesis (Table 4.3: 1,915,041 parameters for latent 128 at 95 x 79)."""

_RECON_MAPS = ("residual", "ssim")


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over all but the batch axis.

    Args:
        mu: posterior means (B, ...).
        logvar: posterior log-variances, same shape.

    Returns:
        The divergence per sample (B,), in nats.
    """
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def _sse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences per sample (B,)."""
    return (x.float() - y.float()).pow(2).flatten(1).sum(1)


def _options(training: Mapping[str, Any], allowed: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The loss options of ``training["loss_options"]`` over ``allowed`` defaults; unknown keys are refused."""
    given = dict(training.get("loss_options") or {})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise AEFlowInputError(
            f"unknown loss option(s) {', '.join(unknown)} for model {model!r}; "
            f"choose from {', '.join(sorted(allowed)) or 'none'}"
        )
    return {**allowed, **given}


def _recon_map(x: torch.Tensor, x_rec: torch.Tensor, map_kind: str) -> torch.Tensor:
    if map_kind == "residual":
        return residual_map(x, x_rec)
    if map_kind == "ssim":
        return ssim_anomaly_map(x, x_rec)
    raise ValueError(f"unknown anomaly map kind {map_kind!r} for a reconstruction model; choose one of {_RECON_MAPS}")


def likelihood_map(z_prime: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-location anomaly map of a flow: ``1 - exp(-mean_c z'^2 / 2)``, bilinearly upsampled.

    This is FastFlow's map ``-exp(mean_c log N(z'_c))`` up to a positive factor and shift, made non-negative
    (0 where ``z' = 0``, towards 1 for unlikely features) so that it goes through the evaluation protocol
    like a residual.

    Args:
        z_prime: flow output (B, C, h, w).
        size: output (H, W).

    Returns:
        The map (B, 1, H, W) in [0, 1).
    """
    local = 1.0 - torch.exp(-0.5 * z_prime.float().pow(2).mean(1, keepdim=True))
    return F.interpolate(local, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------------


class ReconstructionLoss(nn.Module):
    """Reconstruction loss of an autoencoder: ``"mse"``, ``"l1"`` or ``"ssim"`` (``1 - SSIM``).

    Args:
        kind: the loss.

    Returns (from ``forward``):
        ``{"loss", "loss_recon"}``.
    """

    def __init__(self, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "l1", "ssim"):
            raise AEFlowInputError(f"reconstruction loss must be 'mse', 'l1' or 'ssim', got {kind!r}")
        self.kind = kind

    def forward(self, output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x_rec, x = output.x_rec.float(), x.float()
        if self.kind == "mse":
            loss = F.mse_loss(x_rec, x)
        elif self.kind == "l1":
            loss = F.l1_loss(x_rec, x)
        else:
            loss = 1.0 - ssim(x_rec, x).mean()
        return {"loss": loss, "loss_recon": loss.detach()}


class VAELoss(nn.Module):
    """Negative ELBO of a VAE with a Gaussian decoder of variance 1/2, per pixel.

    ``L = mean_batch (SSE(x, x') + kl_weight * KL(q(z|x) || N(0, I))) / N`` with N the number of image
    values (C * H * W); ``kl_weight = 1`` is the ELBO.

    Args:
        kl_weight: weight of the KL term (beta of a beta-VAE).

    Returns (from ``forward``):
        ``{"loss", "loss_recon", "loss_kl"}`` (per pixel).
    """

    def __init__(self, kl_weight: float = 1.0) -> None:
        super().__init__()
        if kl_weight < 0:
            raise AEFlowInputError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = float(kl_weight)

    def forward(self, output: VAEOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x[0].numel()
        rec = _sse(output.x_rec, x).mean() / n
        kl = gaussian_kl(output.mu, output.logvar).mean() / n
        loss = rec + self.kl_weight * kl
        return {"loss": loss, "loss_recon": rec.detach(), "loss_kl": kl.detach()}


class PCHVAELoss(nn.Module):
    """The pchVAE loss, Eq. 9 of Zimmerer et al., per pixel.

    ``L = [l1 ||x - x_high||^2 + l2 ||x - (x_high + x_low)||^2 + l3 ||g1(f1(x_low))||^2 + l4 KL(z1) + l5 KL(z2)] / N``
    with squared L2 norms (Gaussian decoders of constant variance), batch means and N = C * H * W. The paper
    chooses ``l2 = l3``; all weights default to 1.

    Args:
        weights: ``(l1, l2, l3, l4, l5)``.

    Returns (from ``forward``):
        ``{"loss", "loss_high", "loss_recon", "loss_zero", "loss_kl_high", "loss_kl_low"}``.
    """

    def __init__(self, weights: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__()
        weights = tuple(float(w) for w in weights)
        if len(weights) != 5 or any(w < 0 for w in weights):
            raise AEFlowInputError(f"pchVAE loss weights must be five numbers >= 0, got {weights}")
        self.weights = weights

    def forward(self, output: PCHVAEOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if output.x_zero is None:
            raise ValueError("the pchVAE loss needs x_zero: run the network in training mode (or with_zero=True)")
        n = x[0].numel()
        terms = {
            "loss_high": _sse(output.x_high, x).mean() / n,
            "loss_recon": _sse(output.x_high.float() + output.x_low.float(), x).mean() / n,
            "loss_zero": output.x_zero.float().pow(2).flatten(1).sum(1).mean() / n,
            "loss_kl_high": gaussian_kl(output.mu1, output.logvar1).mean() / n,
            "loss_kl_low": gaussian_kl(output.mu2, output.logvar2).mean() / n,
        }
        loss = sum(w * t for w, t in zip(self.weights, terms.values(), strict=True))
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


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


class FlowOnlyLoss(nn.Module):
    """Per-dimension negative log-likelihood of the flow (AE-FLOW's loss with alpha = 1).

    Returns (from ``forward``):
        ``{"loss", "loss_flow"}``.
    """

    def forward(self, output: AEFlowOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = flow_nll_per_dim(output.z_prime, output.log_det).mean()
        return {"loss": loss, "loss_flow": loss.detach()}


# --------------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------------


def reconstruction_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Reconstruction-error scorer (autoencoder, VQ-VAE, VQ-GAN): mean squared error per image.

    Args:
        network: the model.
        x: (B, C, H, W) images in [0, 1].
        beta: unused (no flow).
        map_kind: ``"residual"`` (``|x - x'|``) or ``"ssim"`` (1 - SSIM).

    Returns:
        ``{"score", "anomaly_map", "recon"}``.
    """
    x_rec = network(x).x_rec.float()
    x = x.float()
    return {
        "score": (x - x_rec).pow(2).flatten(1).mean(1),
        "anomaly_map": _recon_map(x, x_rec, map_kind),
        "recon": x_rec,
    }


def vae_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Negative ELBO per pixel of a :class:`DenseVAE` (posterior mean, decoder variance 1/2).

    Args:
        network: the VAE.
        x: (B, C, H, W) images.
        beta: unused.
        map_kind: ``"residual"`` or ``"ssim"``.

    Returns:
        ``{"score", "score_nll", "score_kl", "anomaly_map", "recon"}``; ``score = score_nll + score_kl``.
    """
    out: VAEOutput = network(x)
    n = x[0].numel()
    x_rec = out.x_rec.float()
    nll = _sse(x_rec, x) / n
    kl = gaussian_kl(out.mu, out.logvar) / n
    return {
        "score": nll + kl,
        "score_nll": nll,
        "score_kl": kl,
        "anomaly_map": _recon_map(x.float(), x_rec, map_kind),
        "recon": x_rec,
    }


def pchvae_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Negative ELBO per pixel of a :class:`PCHVAE`: ``(SSE(x, x_high + x_low) + KL(z1) + KL(z2)) / N``.

    Args:
        network: the pchVAE.
        x: (B, C, H, W) images.
        beta: unused.
        map_kind: ``"residual"`` or ``"ssim"``.

    Returns:
        ``{"score", "score_nll", "score_kl", "anomaly_map", "recon"}``.
    """
    out: PCHVAEOutput = network(x)
    n = x[0].numel()
    nll = _sse(out.x_high.float() + out.x_low.float(), x) / n
    kl = (gaussian_kl(out.mu1, out.logvar1) + gaussian_kl(out.mu2, out.logvar2)) / n
    x_rec = out.x_rec.float()
    return {
        "score": nll + kl,
        "score_nll": nll,
        "score_kl": kl,
        "anomaly_map": _recon_map(x.float(), x_rec, map_kind),
        "recon": x_rec,
    }


def flow_only_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Likelihood scorer of :class:`FlowOnlyAEFlow`: AE-FLOW's flow score with beta = 1.

    The image score is ``S_flow = -exp(mean_d log N(z'_d; 0, 1))``; the pixel map is :func:`likelihood_map`
    for every ``map_kind`` (the model has no reconstruction to take a residual of).

    Args:
        network: the flow-only model.
        x: (B, C, H, W) images.
        beta: unused (always 1).
        map_kind: ignored (see above).

    Returns:
        ``{"score", "score_flow", "anomaly_map", "recon"}`` (``recon`` is the input).
    """
    out: AEFlowOutput = network(x)
    s_flow = flow_score(out.z_prime)
    return {
        "score": s_flow,
        "score_flow": s_flow,
        "anomaly_map": likelihood_map(out.z_prime, tuple(x.shape[-2:])),
        "recon": x.float(),
    }


def intensity_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Intensity baseline: the map is the median-filtered image, the image score its maximum.

    Args:
        network: an :class:`IntensityBaseline`.
        x: (B, C, H, W) images in [0, 1] (skull-stripped: the brightest tissue is then the lesion on FLAIR).
        beta: unused.
        map_kind: ignored (one map).

    Returns:
        ``{"score", "anomaly_map", "recon"}`` (``recon`` is the input).
    """
    out = network(x)
    amap = out.anomaly_map.float()
    return {"score": amap.flatten(1).amax(1), "anomaly_map": amap, "recon": x.float()}


# --------------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------------


def _ae_loss(training: Mapping[str, Any]) -> nn.Module:
    opts = _options(training, {"recon_loss": str(training.get("recon_loss", "mse"))}, "ae")
    return ReconstructionLoss(opts["recon_loss"])


def _vae_loss(training: Mapping[str, Any]) -> nn.Module:
    return VAELoss(**_options(training, {"kl_weight": 1.0}, "vae"))


def _pchvae_loss(training: Mapping[str, Any]) -> nn.Module:
    opts = _options(training, {"weights": [1.0, 1.0, 1.0, 1.0, 1.0]}, "pchvae")
    return PCHVAELoss(tuple(opts["weights"]))


def _vqvae_loss(training: Mapping[str, Any]) -> nn.Module:
    return VQVAELoss(**_options(training, {"quantization_weight": 1.0}, "vqvae"))


def _vqgan_loss(training: Mapping[str, Any]) -> nn.Module:
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
    return VQGANLoss(**_options(training, defaults, "vqgan"))


def _flow_only_loss(training: Mapping[str, Any]) -> nn.Module:
    _options(training, {}, "flowonly")
    return FlowOnlyLoss()


class NothingToTrain(nn.Module):
    """The "loss" of a model without trainable parameters: calling it raises a clear error."""

    def forward(self, output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise AEFlowInputError("the intensity baseline has nothing to train; save it as it is (aeflow-cli train does)")


def _no_loss(training: Mapping[str, Any]) -> nn.Module:
    return NothingToTrain()


def register_baselines() -> None:
    """Add the baselines to the model registry of :mod:`monai_aeflow.models` (called on its first use)."""
    specs = [
        ModelSpec(
            name="intensity",
            network_cls=IntensityBaseline,
            make_loss=_no_loss,
            score=intensity_score,
            description="intensity threshold: the median-filtered image as the anomaly map (nothing trained)",
            size_multiple=1,
            defaults={"in_channels": 1, "median_size": 5},
        ),
        ModelSpec(
            name="ae",
            network_cls=ConvAutoEncoder,
            make_loss=_ae_loss,
            score=reconstruction_score,
            description="convolutional autoencoder with AE-FLOW's decoder; reconstruction error",
            size_multiple=16,
            defaults={"in_channels": 1},
        ),
        ModelSpec(
            name="vae",
            network_cls=DenseVAE,
            make_loss=_vae_loss,
            score=vae_score,
            description="VAE with a dense latent (seed thesis: 5x5 stride-2 blocks, latent 128); negative ELBO",
            size_multiple=1,
            defaults={"in_channels": 1, "image_size": [128, 128], "latent_dim": 128},
        ),
        ModelSpec(
            name="pchvae",
            network_cls=PCHVAE,
            make_loss=_pchvae_loss,
            score=pchvae_score,
            description="pchVAE (Zimmerer et al.): high- and low-level VAE branches, Eq. 9 loss; negative ELBO",
            size_multiple=16,
            defaults={"in_channels": 1},
        ),
        ModelSpec(
            name="vqvae",
            network_cls=VQVAENet,
            make_loss=_vqvae_loss,
            score=reconstruction_score,
            description="VQ-VAE (MONAI VQVAE, EMA codebook); reconstruction error",
            size_multiple=8,
            defaults={"in_channels": 1},
        ),
        ModelSpec(
            name="vqgan",
            network_cls=VQGANNet,
            make_loss=_vqgan_loss,
            score=reconstruction_score,
            description="VQ-GAN (MONAI VQVAE + PatchDiscriminator, no perceptual loss by default); "
            "reconstruction error",
            size_multiple=8,
            defaults={"in_channels": 1},
        ),
        ModelSpec(
            name="flowonly",
            network_cls=FlowOnlyAEFlow,
            make_loss=_flow_only_loss,
            score=flow_only_score,
            description="flow-only AE-FLOW (alpha = beta = 1): FastFlow-style likelihood model",
            size_multiple=16,
            defaults={"in_channels": 1, "backbone": "wide_resnet50_2"},
        ),
    ]
    for spec in specs:
        register_model(spec)
