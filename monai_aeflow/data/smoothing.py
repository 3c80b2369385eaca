"""Edge-preserving smoothing of volumes with ITK (the optional smoothing step of the volume preprocessing)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_aeflow.data.transforms import _as_meta, _present

__all__ = ["CurvatureFlowd"]


class CurvatureFlowd(MapTransform):
    """Edge-preserving smoothing with ITK's ``CurvatureFlowImageFilter``, channel by channel.

    The voxel spacing of the metadata is given to ITK, so that the flow is computed in mm.

    Args:
        keys: image keys to smooth.
        iterations: number of flow iterations.
        time_step: time step of the flow (stable for <= 0.125 in 3D at unit spacing).
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        iterations: int = 5,
        time_step: float = 0.0625,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.iterations = iterations
        self.time_step = time_step

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import itk

        d = dict(data)
        for key in _present(self, d):
            image = d[key]
            spatial = image.ndim - 1
            if isinstance(image, MetaTensor):
                spacing = [float(s) for s in image.pixdim[:spatial]]
            else:
                spacing = [1.0] * spatial
            channels = []
            for channel in torch.as_tensor(image).detach().cpu().numpy().astype(np.float32):
                # ITK arrays index (z, y, x): transpose so that ITK's x is the first MONAI axis
                itk_image = itk.image_from_array(np.ascontiguousarray(channel.T))
                itk_image.SetSpacing(spacing)
                smoothed = itk.curvature_flow_image_filter(
                    itk_image, number_of_iterations=self.iterations, time_step=self.time_step
                )
                channels.append(itk.array_from_image(smoothed).T)
            d[key] = _as_meta(np.stack(channels), image, dtype=torch.float32)
        return d
