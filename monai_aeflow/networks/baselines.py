"""Baseline networks from the anomaly-detection literature (backward-compatible re-exports).

The networks live in one module each, as in MONAI's ``monai.networks.nets``; this module re-exports them so
that ``from monai_aeflow.networks.baselines import X`` keeps working. Every network is built from keyword
arguments only, keeps them in ``self.hparams`` (what a model file stores to rebuild it) and returns a
``NamedTuple`` with an ``x_rec`` field (B, C, H, W) from ``forward``. Inputs are (B, C, H, W) images in
[0, 1]. Losses and scores live in :mod:`monai_aeflow.models`.

- :class:`ConvAutoEncoder` (:mod:`~monai_aeflow.networks.autoencoder`): convolutional autoencoder with
  AE-FLOW's decoder (reconstruction only).
- :class:`DenseVAE` (:mod:`~monai_aeflow.networks.vae`): VAE with a dense latent (the seed thesis: three 5x5
  stride-2 blocks, latent 128).
- :class:`PCHVAE` (:mod:`~monai_aeflow.networks.pchvae`): primary-components conditional hierarchical VAE
  (Zimmerer et al.): high- and low-level branches whose sum reconstructs the image.
- :class:`VQVAENet` and :class:`VQGANNet` (:mod:`~monai_aeflow.networks.vqvae`): MONAI's ``VQVAE`` (the
  VQ-GAN's discriminator belongs to its loss).
- :class:`FlowOnlyAEFlow` (:mod:`~monai_aeflow.networks.flow_only`): AE-FLOW without decoder
  (alpha = beta = 1), a FastFlow-style likelihood model.
- :class:`IntensityBaseline` (:mod:`~monai_aeflow.networks.intensity`): the median-filtered image itself as
  the anomaly map (no parameters to train).
"""

from __future__ import annotations

from monai_aeflow.networks.autoencoder import ConvAutoEncoder, ReconstructionOutput
from monai_aeflow.networks.blocks import reparameterize
from monai_aeflow.networks.flow_only import FlowOnlyAEFlow
from monai_aeflow.networks.intensity import IntensityBaseline, IntensityOutput, median_filter_2d
from monai_aeflow.networks.pchvae import PCHVAE, PCHVAEOutput
from monai_aeflow.networks.vae import DenseVAE, VAEOutput
from monai_aeflow.networks.vqvae import VQGANNet, VQOutput, VQVAENet

__all__ = [
    "ReconstructionOutput",
    "VAEOutput",
    "PCHVAEOutput",
    "VQOutput",
    "IntensityOutput",
    "ConvAutoEncoder",
    "DenseVAE",
    "PCHVAE",
    "VQVAENet",
    "VQGANNet",
    "FlowOnlyAEFlow",
    "IntensityBaseline",
    "median_filter_2d",
    "reparameterize",
]
