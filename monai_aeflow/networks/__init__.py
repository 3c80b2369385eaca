"""Networks of monai-aeflow: pure ``nn.Module`` s without I/O or training logic."""

from monai_aeflow.networks.aeflow import AEFlow, AEFlowOutput
from monai_aeflow.networks.backbone import (
    BACKBONES,
    FeatureEncoder,
    ResNetFeatureExtractor,
    load_backbone_weights,
)
from monai_aeflow.networks.decoder import AEFlowDecoder
from monai_aeflow.networks.flow import NormalizingFlow

__all__ = [
    "AEFlow",
    "AEFlowOutput",
    "AEFlowDecoder",
    "BACKBONES",
    "FeatureEncoder",
    "NormalizingFlow",
    "ResNetFeatureExtractor",
    "load_backbone_weights",
]
