"""The intensity-threshold baseline (the median-filtered image is the anomaly map) and its median filter."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IntensityOutput", "IntensityBaseline", "median_filter_2d"]


class IntensityOutput(NamedTuple):
    """What :class:`IntensityBaseline` returns.

    Attributes:
        x_rec: the input (there is no reconstruction), so that tools that show reconstructions still work.
        anomaly_map: the median-filtered image averaged over channels (B, 1, H, W).
    """

    x_rec: torch.Tensor
    anomaly_map: torch.Tensor


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` on each side with ``scipy.ndimage``'s ``"reflect"``.

    The axis is extended as ``d c b a | a b c d | d c b a`` (period ``2 n``), also when ``pad > n``.
    """
    idx = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def _pad_symmetric(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Mirror padding of the last two axes that repeats the edge sample (``scipy.ndimage`` mode ``"reflect"``)."""
    if pad == 0:
        return x
    x = x.index_select(-2, _reflect_index(x.shape[-2], pad, x.device))
    return x.index_select(-1, _reflect_index(x.shape[-1], pad, x.device))


def median_filter_2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size x size`` median filter of each image and channel, with symmetric ("reflect") borders.

    Equals ``scipy.ndimage.median_filter(x, size=(1, 1, size, size), mode="reflect")``.

    Args:
        x: (B, C, H, W) images.
        size: odd window side (1: no filtering).

    Returns:
        The filtered images, same shape and dtype.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"median filter size must be a positive odd number, got {size}")
    if size == 1:
        return x
    b, c, h, w = x.shape
    r = size // 2
    padded = _pad_symmetric(x, r)
    patches = F.unfold(padded.reshape(b * c, 1, h + 2 * r, w + 2 * r), size)  # (B*C, size*size, H*W)
    return patches.median(dim=1).values.reshape(b, c, h, w)


class IntensityBaseline(nn.Module):
    """The intensity-threshold baseline: the median-filtered image itself is the anomaly map.

    Hyper-intense lesions on FLAIR are the brightest tissue of a skull-stripped, [0, 1]-normalised slice, so
    thresholding the (denoised) intensity is a strong reference that a learned model has to beat. The map is
    the ``median_size x median_size`` median of the image, averaged over channels; the image score is its
    maximum (see :func:`monai_aeflow.models.intensity.intensity_score`). Nothing is trained.

    Args:
        in_channels: image channels.
        median_size: odd side of the median filter (1: raw intensities).

    Example::

        net = IntensityBaseline(median_size=5)
        net(torch.rand(2, 1, 64, 64)).anomaly_map.shape  # (2, 1, 64, 64)
    """

    size_multiple = 1
    reconstructs = False

    def __init__(self, in_channels: int = 1, median_size: int = 5) -> None:
        super().__init__()
        if median_size < 1 or median_size % 2 == 0:
            raise ValueError(f"median_size must be a positive odd number, got {median_size}")
        self.in_channels = in_channels
        self.median_size = median_size
        # not trained; gives the network a device and a dtype (``next(net.parameters())``)
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.hparams: dict[str, Any] = {"in_channels": in_channels, "median_size": median_size}

    def forward(self, x: torch.Tensor) -> IntensityOutput:
        """Median-filter the images and average over channels.

        Args:
            x: (B, in_channels, H, W) images.

        Returns:
            An :class:`IntensityOutput` (the input and the float32 anomaly map).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"IntensityBaseline expects (B, {self.in_channels}, H, W) inputs, got {tuple(x.shape)}")
        amap = median_filter_2d(x.float(), self.median_size).mean(1, keepdim=True)
        return IntensityOutput(x, amap)
