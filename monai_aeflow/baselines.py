"""Deprecated: the baselines' losses and scores now live in one file per model in :mod:`monai_aeflow.models`.

This module re-exports its former names (``from monai_aeflow.baselines import VAELoss`` keeps working) and
emits a ``DeprecationWarning`` on import. New code imports from the model files:

==============  ===========================================================================================
model           module
==============  ===========================================================================================
``ae``          :mod:`monai_aeflow.models.ae` (``ReconstructionLoss``)
``vae``         :mod:`monai_aeflow.models.vae` (``VAELoss``, ``vae_score``, ``THESIS_VAE_CONFIG``)
``pchvae``      :mod:`monai_aeflow.models.pchvae` (``PCHVAELoss``, ``pchvae_score``)
``vqvae``       :mod:`monai_aeflow.models.vqvae` (``VQVAELoss``, ``VQGANLoss``; also ``vqgan``)
``flowonly``    :mod:`monai_aeflow.models.flow_only` (``FlowOnlyLoss``, ``flow_only_score``)
``intensity``   :mod:`monai_aeflow.models.intensity` (``intensity_score``, ``NothingToTrain``)
shared          :mod:`monai_aeflow.models.common` (``gaussian_kl``, ``likelihood_map``, ``reconstruction_score``)
==============  ===========================================================================================
"""

from __future__ import annotations

import warnings

from monai_aeflow.models import BUILTIN_SPECS, DEFAULT_MODEL, register_model
from monai_aeflow.models.ae import ReconstructionLoss
from monai_aeflow.models.common import RECON_MAPS as _RECON_MAPS
from monai_aeflow.models.common import gaussian_kl, likelihood_map, reconstruction_score
from monai_aeflow.models.common import loss_options as _options
from monai_aeflow.models.common import recon_map as _recon_map
from monai_aeflow.models.common import sse as _sse
from monai_aeflow.models.flow_only import FlowOnlyLoss, flow_only_score
from monai_aeflow.models.intensity import NothingToTrain, intensity_score
from monai_aeflow.models.pchvae import PCHVAELoss, pchvae_score
from monai_aeflow.models.vae import THESIS_VAE_CONFIG, VAELoss, vae_score
from monai_aeflow.models.vqvae import VQGANLoss, VQVAELoss

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

# former private names, kept for code that reached into this module
_COMPAT = (NothingToTrain, _RECON_MAPS, _options, _recon_map, _sse)

warnings.warn(
    "monai_aeflow.baselines is deprecated: import from monai_aeflow.models and its model files "
    "(monai_aeflow.models.vae, ...)",
    DeprecationWarning,
    stacklevel=2,
)

BASELINE_NAMES: tuple[str, ...] = tuple(spec.name for spec in BUILTIN_SPECS if spec.name != DEFAULT_MODEL)
"""Registry names of the baselines, in the order of comparison tables."""


def register_baselines() -> None:
    """Register the built-in baselines again (they are registered on import of :mod:`monai_aeflow.models`).

    Kept for compatibility: it restores the baselines' specs in the registry, replacing same-named entries.
    """
    for spec in BUILTIN_SPECS:
        if spec.name != DEFAULT_MODEL:
            register_model(spec)
