"""Networks of monai-aeflow: pure ``nn.Module`` s without I/O or training logic.

One architecture per module, as in MONAI's ``monai.networks.nets``: :mod:`.aeflow` (with :mod:`.backbone`,
:mod:`.efficientnet_lite`, :mod:`.flow` and :mod:`.decoder`), and the baselines :mod:`.autoencoder`,
:mod:`.vae`, :mod:`.pchvae`, :mod:`.vqvae`, :mod:`.flow_only`, :mod:`.intensity`, and the peers :mod:`.dae`
(denoising autoencoder) and :mod:`.patchcore` (memory bank of pretrained patch features); shared building blocks in
:mod:`.blocks`. :mod:`.baselines` re-exports the baselines under their former import path.
"""

from monai_aeflow.networks.aeflow import AEFlow, AEFlowOutput
from monai_aeflow.networks.autoencoder import ConvAutoEncoder, ReconstructionOutput
from monai_aeflow.networks.backbone import (
    BACKBONES,
    FeatureEncoder,
    ResNetFeatureExtractor,
    load_backbone_weights,
)
from monai_aeflow.networks.dae import DAEOutput, DenoisingAutoEncoder
from monai_aeflow.networks.decoder import AEFlowDecoder
from monai_aeflow.networks.efficientnet_lite import EfficientNetLite0, EfficientNetLiteFeatureExtractor
from monai_aeflow.networks.flow import NormalizingFlow
from monai_aeflow.networks.flow_only import FlowOnlyAEFlow
from monai_aeflow.networks.intensity import IntensityBaseline, IntensityOutput
from monai_aeflow.networks.patchcore import PatchCore, PatchCoreOutput
from monai_aeflow.networks.pchvae import PCHVAE, PCHVAEOutput
from monai_aeflow.networks.vae import DenseVAE, VAEOutput
from monai_aeflow.networks.vqvae import VQGANNet, VQOutput, VQVAENet

__all__ = [
    "AEFlow",
    "AEFlowOutput",
    "AEFlowDecoder",
    "BACKBONES",
    "FeatureEncoder",
    "NormalizingFlow",
    "ResNetFeatureExtractor",
    "EfficientNetLite0",
    "EfficientNetLiteFeatureExtractor",
    "load_backbone_weights",
    "ConvAutoEncoder",
    "ReconstructionOutput",
    "DenseVAE",
    "VAEOutput",
    "PCHVAE",
    "PCHVAEOutput",
    "VQVAENet",
    "VQGANNet",
    "VQOutput",
    "FlowOnlyAEFlow",
    "IntensityBaseline",
    "IntensityOutput",
    "DenoisingAutoEncoder",
    "DAEOutput",
    "PatchCore",
    "PatchCoreOutput",
]
