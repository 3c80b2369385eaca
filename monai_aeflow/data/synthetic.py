"""Seeded generator of brain-like 3D MRI volumes, the embedded default data of the demo and the tests.

Each subject is a small head phantom: an ellipsoidal head with scalp, skull (with a marrow layer) and an
extra-axial CSF layer around a brain made of white matter, a folded cortical grey-matter ribbon with
CSF-filled sulci and an interhemispheric fissure, butterfly-shaped lateral ventricles, a third ventricle
and deep grey nuclei (caudate, putamen, thalamus). The head radii, a small rotation and translation, a
smooth random displacement field, the ventricle size, the cortical folding, the tissue intensities, the
bias field and the noise level all differ between subjects.

Lesions (tumour- or MS-like) are irregular blobs placed mostly in white matter, hyper-intense on FLAIR
and hypo-intense on T1 by default. The anatomy, the lesions and the acquisition (bias field and noise)
come from separate random streams derived from the subject seed, so ``make_subject(s, lesion=True)`` is
the healthy ``make_subject(s, lesion=False)`` with lesions added: outside the lesions and a partial-volume
margin of two voxels the two images are identical. FLAIR and T1 subjects with the same seed share their
anatomy and masks.

The anatomy is laid out in proportion to the field of view (it is scaled isotropically so that the head
fills the in-plane field of view), so a smaller ``shape`` gives the same subject at a lower resolution.
Sizes quoted in voxels (lesion radii of about 3 to 12 voxels) refer to the default geometry, a
128 x 128 x 80 grid of 1.5 mm voxels.

:func:`generate_synthetic_images` writes axial slices of such subjects as a 2D image folder of PNG files
(``normal/``, ``abnormal/``), the synthetic data of the 2D bundle.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.fileio import atomic_write, make_folder

__all__ = [
    "SyntheticSubject",
    "TISSUE_LABELS",
    "make_subject",
    "generate_cohort",
    "extract_slices",
    "make_slices",
    "generate_synthetic_images",
    "SYNTHETIC_IMAGES_INDEX",
]

#: Codes of the ``tissue`` map of a :class:`SyntheticSubject`.
TISSUE_LABELS: dict[str, int] = {
    "background": 0,
    "scalp": 1,
    "skull": 2,
    "marrow": 3,
    "csf": 4,
    "ventricle": 5,
    "grey_matter": 6,
    "white_matter": 7,
    "deep_grey": 8,
    "lesion": 9,
}

_BG, _SCALP, _SKULL, _MARROW, _CSF, _VENT, _GM, _WM, _DGM, _LES = range(10)
_PARENCHYMA = (_GM, _WM, _DGM)

# Mean tissue intensities before bias field and noise (background, scalp, skull, marrow, csf, ventricle,
# grey matter, white matter, deep grey); each subject jitters them by a few hundredths.
_TISSUE_INTENSITY = {
    "flair": np.array([0.0, 0.72, 0.05, 0.22, 0.07, 0.06, 0.65, 0.48, 0.56], dtype=np.float32),
    "t1": np.array([0.0, 0.90, 0.05, 0.45, 0.10, 0.09, 0.50, 0.80, 0.62], dtype=np.float32),
}

# Field of view of the default geometry (128 x 128 x 80 voxels of 1.5 mm) in mm; the anatomy is designed
# in this frame ("canonical mm") and scaled to the requested grid.
_DEFAULT_SHAPE = (128, 128, 80)
_DEFAULT_SPACING = (1.5, 1.5, 1.5)
_DEFAULT_FOV = np.array(_DEFAULT_SHAPE, dtype=float) * np.array(_DEFAULT_SPACING)
_CANONICAL_VOXEL_MM = 1.5


@dataclass
class SyntheticSubject:
    """One synthetic head volume with its masks.

    Args:
        subject_id: identifier, e.g. ``"synth-000"``.
        image: float32 ``(X, Y, Z)`` intensities in ``[0, 1]`` in RAS voxel order, exactly 0 outside the head.
        brain_mask: uint8 ``(X, Y, Z)`` brain (parenchyma, sulci, fissure and ventricles) as 0/1.
        head_mask: uint8 ``(X, Y, Z)`` whole head including scalp and skull as 0/1 (superset of ``brain_mask``).
        label: uint8 ``(X, Y, Z)`` lesion ground truth as 0/1, all zero for a healthy subject.
        affine: float64 ``4 x 4`` RAS affine with diagonal spacing, volume centre near 0 mm.
        contrast: ``"flair"`` or ``"t1"``.
        tissue: uint8 ``(X, Y, Z)`` tissue map with the codes of :data:`TISSUE_LABELS` (lesion voxels are
            coded ``9``), or None.
    """

    subject_id: str
    image: np.ndarray
    brain_mask: np.ndarray
    head_mask: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    contrast: str
    tissue: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------------
# random streams and smooth random fields
# --------------------------------------------------------------------------------------------------------


def _derive_seed(*keys: int) -> int:
    """A 32-bit seed derived from a tuple of non-negative integers (stable across platforms)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def _subject_seed(seed: int, index: int, stream: int = 0) -> int:
    """Seed of the ``index``-th subject of a cohort or slice set drawn with ``seed``."""
    return _derive_seed(seed, 7919 + stream, index)


def _kernel_matrix(coords: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian weights ``(len(coords), K)`` of kernel centres spaced ``sigma`` apart covering ``coords``."""
    lo, hi = float(coords.min()) - 2.5 * sigma, float(coords.max()) + 2.5 * sigma
    centres = np.arange(lo, hi + sigma, sigma)
    w = np.exp(-0.5 * ((coords[:, None] - centres[None, :]) / sigma) ** 2)
    # each row normalised so that a field of unit-variance coefficients has unit variance everywhere
    w /= np.sqrt((w**2).sum(axis=1, keepdims=True))
    return w.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, axes: Sequence[np.ndarray], sigma: float) -> np.ndarray:
    """Smooth Gaussian random field with unit variance on the grid spanned by the 1D ``axes`` (in mm).

    The field is a sum of Gaussian bumps of width ``sigma`` with random weights, evaluated separably (three
    small matrix products), so it costs little even on a full volume and is independent of the grid step.
    """
    wx, wy, wz = (_kernel_matrix(np.asarray(a, dtype=np.float64), sigma) for a in axes)
    coef = rng.standard_normal((wx.shape[1], wy.shape[1], wz.shape[1]), dtype=np.float32)
    t = np.tensordot(wx, coef, axes=(1, 0))  # (X, Ky, Kz)
    t = np.tensordot(t, wy, axes=(1, 1))  # (X, Kz, Y)
    t = np.tensordot(t, wz, axes=(1, 1))  # (X, Y, Z)
    return np.ascontiguousarray(t, dtype=np.float32)


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix from three angles (degrees) about x, y and z."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed random rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _ellipsoid_r2(
    q: Sequence[np.ndarray],
    centre: Sequence[float],
    radii: Sequence[float],
    rot: np.ndarray | None = None,
    bend: float = 0.0,
    side: float = 1.0,
) -> np.ndarray:
    """Squared normalised radius of points ``q`` (three broadcastable arrays) for an ellipsoid.

    ``rot`` rotates the ellipsoid axes; ``bend`` curves its long (y) axis sideways by ``side * bend`` mm at
    its ends (a crescent, as for the bodies of the lateral ventricles).
    """
    u = [q[i] - np.float32(centre[i]) for i in range(3)]
    if rot is not None:
        r = rot.astype(np.float32)
        u = [r[0, i] * u[0] + r[1, i] * u[1] + r[2, i] * u[2] for i in range(3)]
    if bend:
        u[0] = u[0] - np.float32(side * bend) * (u[1] / np.float32(radii[1])) ** 2
    return sum((u[i] / np.float32(radii[i])) ** 2 for i in range(3))


# --------------------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------------------


def _canonical_axes(shape: Sequence[int], spacing: Sequence[float]) -> tuple[list[np.ndarray], np.ndarray]:
    """Voxel-centre coordinates (canonical mm) along each axis, and the canonical voxel size."""
    fov = np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)
    k = max(_DEFAULT_FOV[0] / fov[0], _DEFAULT_FOV[1] / fov[1])
    cs = np.asarray(spacing, dtype=float) * k
    axes = [((np.arange(n) - (n - 1) / 2.0) * cs[i]).astype(np.float32) for i, n in enumerate(shape)]
    return axes, cs


def _make_anatomy(rng: np.random.Generator, axes: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Tissue map, masks and depth maps of one subject (canonical mm frame)."""
    f32 = np.float32
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]

    # head geometry: radii, position and pose
    radii = np.array([rng.uniform(72, 80), rng.uniform(80, 87), rng.uniform(58, 64)])
    # the vertex sits ~8 mm below the top of the default field of view; a shorter field of view is a slab
    # centred on the same level (through the ventricles), a taller one shows air above the head
    cz = min(-8.0, 52.0 - radii[2])
    shift = np.array([rng.uniform(-2, 2), rng.uniform(-2, 2), cz + rng.uniform(-2, 2)])
    rot = _rotation([rng.uniform(-6, 6), rng.uniform(-4, 4), rng.uniform(-6, 6)]).astype(f32)
    egg = rng.uniform(0.03, 0.09)  # narrower forehead than back of the head

    # smooth random displacement (mm), then head-frame coordinates q = R^T (p - t) + d(p)
    disp_amp = rng.uniform(2.0, 3.5)
    disp = [np.clip(_smooth_noise(rng, axes, 28.0), -2.0, 2.0) for _ in range(3)]
    px, py, pz = x - f32(shift[0]), y - f32(shift[1]), z - f32(shift[2])
    q = [rot[0, i] * px + rot[1, i] * py + rot[2, i] * pz + f32(disp_amp) * disp[i] for i in range(3)]
    qx, qy, qz = q

    # depth below the head surface along the ray from the head centre (mm, positive inside)
    rx_eff = f32(radii[0]) * (1.0 - f32(egg) * np.clip(qy / f32(radii[1]), -1.0, 1.0))
    f = np.sqrt((qx / rx_eff) ** 2 + (qy / f32(radii[1])) ** 2 + (qz / f32(radii[2])) ** 2)
    r = np.sqrt(qx**2 + qy**2 + qz**2)
    d_head = r / np.maximum(f, f32(1e-6)) - r

    t_scalp, t_skull, t_csf = rng.uniform(4.0, 6.0), rng.uniform(5.0, 7.0), rng.uniform(1.5, 2.5)
    csf_extra = np.clip(_smooth_noise(rng, axes, 12.0), 0, None) * f32(rng.uniform(0.5, 2.0))
    d_brain = d_head - f32(t_scalp + t_skull + t_csf) - csf_extra

    tissue = np.zeros(d_head.shape, dtype=np.uint8)
    head = d_head > 0
    tissue[head] = _SCALP
    inner_skull = d_head - f32(t_scalp)
    tissue[inner_skull > 0] = _SKULL
    tissue[(inner_skull > t_skull / 3) & (inner_skull < 2 * t_skull / 3)] = _MARROW
    tissue[inner_skull > t_skull] = _CSF
    brain = d_brain > 0

    # cortex: sulci are thin sheets around the zero set of a smooth random field, lined by grey matter
    sigma_fold = rng.uniform(2.9, 3.5)
    fold = _smooth_noise(rng, axes, sigma_fold)
    dist_sulc_sheet = np.abs(fold) * f32(sigma_fold / 1.22)
    w_sulc = f32(rng.uniform(0.6, 1.0))
    depth_sulc = f32(rng.uniform(7.0, 9.5)) + f32(2.0) * _smooth_noise(rng, axes, 15.0)
    below = np.maximum(d_brain - depth_sulc, 0)
    d_sulc = np.sqrt(np.maximum(dist_sulc_sheet - w_sulc, 0) ** 2 + below**2)
    sulcus = (dist_sulc_sheet < w_sulc) & (d_brain < depth_sulc)

    # interhemispheric fissure, interrupted by the corpus callosum and the deep structures below it
    w_fiss = f32(rng.uniform(0.8, 1.3))
    zc = f32(6.0)  # vertical level of the ventricles relative to the head centre
    cc_top, cc_half_len = zc + f32(rng.uniform(12.0, 15.0)), f32(rng.uniform(30.0, 36.0))
    mid = np.abs(qx - f32(1.2) * disp[0])
    cc_low = zc - f32(12.0)  # the callosum arches over the deep structures: the fissure stops above it
    fiss_region = ((qy + f32(3.0)) / cc_half_len) ** 2 + ((qz - cc_low) / (cc_top - cc_low)) ** 2 > 1
    fissure = (mid < w_fiss) & fiss_region
    d_fiss = np.where(fiss_region, mid - w_fiss, f32(1e3))

    t_gm = f32(rng.uniform(3.0, 3.8))
    d_cortex = np.minimum(np.minimum(d_brain, d_sulc), d_fiss)
    tissue[brain] = _WM
    tissue[brain & (d_cortex < t_gm)] = _GM
    tissue[brain & (sulcus | fissure)] = _CSF

    # deep grey nuclei (pairs), then the ventricles on top; evaluated in a box around the head centre
    box = tuple(
        slice(int(np.searchsorted(a, c - 55.0)), int(np.searchsorted(a, c + 55.0)))
        for a, c in zip(axes, shift, strict=True)
    )
    qb = [qi[box] for qi in q]
    sub_tissue, sub_brain = tissue[box], brain[box]
    v = rng.uniform(0.8, 1.6)  # ventricle size (atrophy)
    for side in (-1.0, 1.0):
        jitter = rng.uniform(-1.0, 1.0, size=3)
        nuclei = [
            ((side * (11 + 2 * v), 12, zc + 1), (4.5, 8.0, 8.5), side * -10.0),  # caudate head
            ((side * (22 + v), 2, zc - 7), (5.0, 13.0, 9.0), side * 8.0),  # putamen
            ((side * 9.0, -9, zc - 7), (7.0, 10.5, 8.0), side * -10.0),  # thalamus
        ]
        for centre, rads, yaw in nuclei:
            e = _ellipsoid_r2(qb, np.asarray(centre) + jitter, rads, rot=_rotation([0, 0, yaw]))
            sub_tissue[(e < 1) & sub_brain] = _DGM
    for side in (-1.0, 1.0):
        jitter = rng.uniform(-1.0, 1.0, size=3)
        parts = [
            ((side * (4 + 1.5 * v), -3, zc + 6), (3.0 * v, 23.0, 6.0 * v), 0.0, 4.0),  # body, crescent
            ((side * (7 + 2 * v), 17, zc + 2), (4.0 * v, 10.0, 6.5 * v), side * -22.0, 0.0),  # frontal horn
            ((side * (10 + 2 * v), -23, zc + 2), (3.5 * v, 11.0, 5.5 * v), side * 28.0, 0.0),  # atrium
        ]
        for centre, rads, yaw, bend in parts:
            rot_part = _rotation([0, 0, yaw])
            e = _ellipsoid_r2(qb, np.asarray(centre) + jitter, rads, rot=rot_part, bend=bend, side=side)
            sub_tissue[(e < 1) & sub_brain] = _VENT
    e3 = _ellipsoid_r2(qb, (0.0, -5.0, zc - 8), (1.0 * v, 11.0, 7.0))
    sub_tissue[(e3 < 1) & sub_brain] = _VENT

    return {"tissue": tissue, "head": head, "brain": brain, "d_brain": d_brain}


# --------------------------------------------------------------------------------------------------------
# lesions
# --------------------------------------------------------------------------------------------------------


def _lesion_blob(
    rng: np.random.Generator, r_mm: float, cs: np.ndarray, centre: np.ndarray, shape: Sequence[int]
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Irregular blob (union of ellipsoids with a noisy boundary) around a voxel ``centre``.

    Returns the bounding-box slices, the boolean blob in the box and a texture field (unit variance).
    """
    half = np.ceil(1.7 * r_mm / cs).astype(int) + 1
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, np.asarray(shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    local = [((np.arange(lo[i], hi[i]) - centre[i]) * cs[i]).astype(np.float32) for i in range(3)]
    g = [local[0][:, None, None], local[1][None, :, None], local[2][None, None, :]]

    comps = [(np.zeros(3), r_mm * rng.uniform(0.75, 1.0, size=3))]
    for _ in range(int(rng.integers(0, 4))):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        comps.append((direction * r_mm * rng.uniform(0.4, 0.8), r_mm * rng.uniform(0.35, 0.65, size=3)))
    qn = None
    for c, rads in comps:
        e = np.sqrt(_ellipsoid_r2(g, c, rads, rot=_random_rotation(rng)))
        qn = e if qn is None else np.minimum(qn, e)
    sigma = max(1.5, r_mm / 3.0)
    edge = _smooth_noise(rng, local, sigma)
    blob = (qn + np.float32(0.2) * edge) < 1.0
    texture = _smooth_noise(rng, local, max(1.2, r_mm / 4.0))
    return box, blob, texture


def _add_lesions(
    rng: np.random.Generator,
    image: np.ndarray,
    tissue: np.ndarray,
    d_brain: np.ndarray,
    cs: np.ndarray,
    n_lesions: tuple[int, int],
    polarity: str,
    wm_level: float,
) -> np.ndarray:
    """Paint lesions into ``image`` and ``tissue`` in place; returns the uint8 label."""
    shape = image.shape
    label = np.zeros(shape, dtype=bool)
    n = int(rng.integers(n_lesions[0], n_lesions[1] + 1))
    wm_idx = np.flatnonzero(tissue == _WM)
    if wm_idx.size == 0:
        raise AEFlowInputError("the field of view contains no white matter to place lesions in")
    parenchyma = np.isin(tissue, _PARENCHYMA)
    for k in range(n):
        # radius in voxels of the default geometry: the first lesion is large, the others of any size
        r_vox = rng.uniform(6.0, 12.0) if k == 0 else float(np.exp(rng.uniform(np.log(3.0), np.log(12.0))))
        r_mm = r_vox * _CANONICAL_VOXEL_MM
        hyper = polarity == "hyper" or (polarity == "mixed" and rng.random() < 0.6)
        best = None
        for attempt in range(60):
            centre = np.array(np.unravel_index(wm_idx[rng.integers(wm_idx.size)], shape))
            if attempt < 40 and d_brain[tuple(centre)] < max(r_mm + 4.0, 10.0):
                continue
            box, blob, texture = _lesion_blob(rng, r_mm, cs, centre, shape)
            keep = blob & parenchyma[box] & ~label[box]
            # drop specks cut off by sulci or earlier lesions
            parts, n_parts = ndimage.label(keep)
            if n_parts > 1:
                sizes = np.bincount(parts.ravel())
                sizes[0] = 0
                keep = sizes[parts] >= max(0.1 * sizes.max(), 1)
            n_blob = max(int(blob.sum()), 1)
            kept = keep.sum() / n_blob
            in_wm = (tissue[box][keep] == _WM).mean() if keep.any() else 0.0
            score = min(kept / 0.8, 1.0) + min(in_wm / 0.6, 1.0)
            if best is None or score > best[0]:
                best = (score, box, keep, texture, centre)
            if score >= 2.0:
                break
        _, box, keep, texture, centre = best
        if not keep.any():  # degenerate tiny grids: at least the centre voxel
            keep[tuple(centre - np.array([b.start for b in box]))] = True
        if hyper:
            delta = rng.uniform(0.30, 0.45)
        else:  # darker than grey matter, brighter than CSF
            delta = -rng.uniform(0.35, 0.50) if wm_level > 0.6 else -rng.uniform(0.22, 0.32)
        value = np.float32(wm_level + delta) * (np.float32(1.0) + np.float32(0.08) * texture)
        region = image[box]
        region[keep] = value[keep]
        tissue[box][keep] = _LES
        label[box] |= keep
    return label.astype(np.uint8)


# --------------------------------------------------------------------------------------------------------
# acquisition: partial volume, bias field, noise
# --------------------------------------------------------------------------------------------------------


def _linear_interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` linear interpolation weights, corners aligned."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = pos - i0
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), i0] = 1 - frac
    if n_in > 1:
        m[np.arange(n_out), np.minimum(i0 + 1, n_in - 1)] += frac
    return m


def _acquire(image: np.ndarray, brain: np.ndarray, torch_seed: int, affine: np.ndarray) -> np.ndarray:
    """Multiply by a torchio bias field (mean 1 over the brain) and add torchio Gaussian noise."""
    import torchio as tio  # here, not at module level: scoring imports this package and needs no torchio

    shape = image.shape
    coarse = tuple(max(8, (n + 3) // 4) for n in shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        ones = tio.ScalarImage(tensor=torch.ones((1, *coarse)), affine=affine)
        field = tio.RandomBiasField(coefficients=0.25, order=3)(ones).data[0].numpy()
        # the polynomial field is evaluated on [-1, 1] per axis, so a corner-aligned upsampling is exact
        # up to the interpolation error of a smooth field
        mats = [_linear_interp_matrix(n, c) for n, c in zip(shape, coarse, strict=True)]
        t = np.tensordot(mats[0], field, axes=(1, 0))
        t = np.tensordot(t, mats[1], axes=(1, 1))
        field = np.tensordot(t, mats[2], axes=(1, 1)).astype(np.float32)
        field /= field[brain].mean() if brain.any() else field.mean()
        biased = tio.ScalarImage(tensor=torch.from_numpy(image * field)[None], affine=affine)
        noisy = tio.RandomNoise(mean=0.0, std=(0.008, 0.02))(biased).data[0].numpy()
    return np.ascontiguousarray(noisy, dtype=np.float32)


def _ras_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Diagonal RAS affine whose volume centre is at 0 mm."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=float) - 1) / 2.0 * np.asarray(spacing, dtype=float)
    return affine


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------


def _check_args(shape: Sequence[int], spacing: Sequence[float], contrast: str) -> None:
    if len(shape) != 3 or any(int(n) < 16 for n in shape):
        raise AEFlowInputError(f"shape must be three sizes of at least 16 voxels, got {tuple(shape)}")
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise AEFlowInputError(f"spacing must be three positive sizes in mm, got {tuple(spacing)}")
    if contrast not in _TISSUE_INTENSITY:
        raise AEFlowInputError(f"contrast must be 'flair' or 't1', got {contrast!r}")


def make_subject(
    seed: int,
    lesion: bool = True,
    shape: tuple[int, int, int] = (128, 128, 80),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    contrast: str = "flair",
    n_lesions: tuple[int, int] = (1, 3),
    subject_id: str | None = None,
    lesion_polarity: str | None = None,
    partial_volume_sigma: float | None = None,
) -> SyntheticSubject:
    """Generate one brain-like MRI volume.

    Args:
        seed: non-negative integer; the same seed gives the same subject. A lesioned subject and the
            healthy subject of the same seed share anatomy, bias field and noise.
        lesion: whether to add lesions.
        shape: grid size ``(X, Y, Z)``; axial slices lie along the last axis.
        spacing: voxel size in mm (sets the affine; the anatomy fills the field of view in proportion).
        contrast: ``"flair"`` (CSF dark, grey matter brighter than white matter) or ``"t1"`` (white matter
            bright, grey matter mid, CSF dark).
        n_lesions: inclusive range of the number of lesions drawn when ``lesion`` is True.
        subject_id: identifier; defaults to ``"synth-seed<seed>"``.
        lesion_polarity: ``"hyper"``, ``"hypo"`` or ``"mixed"``; defaults to ``"hyper"`` for FLAIR and
            ``"hypo"`` for T1.
        partial_volume_sigma: standard deviation (voxels) of the Gaussian partial-volume blur; drawn in
            ``[0.5, 0.8]`` per subject when None.

    Returns:
        the subject. Its label is the set of lesion voxels (those whose tissue intensity was replaced),
        always inside the brain mask; the default partial-volume blur spreads the lesion contrast by at
        most two voxels around it.

    Raises:
        AEFlowInputError: for an unknown contrast or polarity, an invalid shape, spacing, seed or range.
    """
    _check_args(shape, spacing, contrast)
    if int(seed) < 0:
        raise AEFlowInputError(f"seed must be non-negative, got {seed}")
    polarity = lesion_polarity or ("hyper" if contrast == "flair" else "hypo")
    if polarity not in ("hyper", "hypo", "mixed"):
        raise AEFlowInputError(f"lesion_polarity must be 'hyper', 'hypo' or 'mixed', got {polarity!r}")
    lo, hi = (int(v) for v in n_lesions)
    if lesion and not 1 <= lo <= hi:
        raise AEFlowInputError(f"n_lesions must be an inclusive range (min >= 1, min <= max), got {n_lesions}")
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)

    rng_anat = np.random.default_rng(_derive_seed(seed, 0))
    rng_contrast = np.random.default_rng(_derive_seed(seed, 1, 0 if contrast == "flair" else 1))
    rng_lesion = np.random.default_rng(_derive_seed(seed, 2))
    torch_seed = _derive_seed(seed, 3)

    axes, cs = _canonical_axes(shape, spacing)
    anat = _make_anatomy(rng_anat, axes)
    tissue, head, brain = anat["tissue"], anat["head"], anat["brain"]

    levels = _TISSUE_INTENSITY[contrast] + rng_contrast.uniform(-0.025, 0.025, size=9).astype(np.float32)
    levels[_BG] = 0.0
    image = levels[tissue]
    # faint white-matter texture, independent of the lesion stream
    texture = _smooth_noise(rng_anat, axes, 5.0)
    parenchyma = np.isin(tissue, _PARENCHYMA)
    image[parenchyma] += np.float32(0.015) * texture[parenchyma]

    if lesion:
        label = _add_lesions(rng_lesion, image, tissue, anat["d_brain"], cs, (lo, hi), polarity, float(levels[_WM]))
    else:
        label = np.zeros(shape, dtype=np.uint8)

    sigma = rng_anat.uniform(0.5, 0.8) if partial_volume_sigma is None else float(partial_volume_sigma)
    if sigma > 0:
        image = ndimage.gaussian_filter(image, sigma=sigma, truncate=2.5)
    affine = _ras_affine(shape, spacing)
    image = _acquire(image, brain, torch_seed, affine)
    np.clip(image, 0.0, 1.0, out=image)
    image[~head] = 0.0

    return SyntheticSubject(
        subject_id=subject_id if subject_id is not None else f"synth-seed{int(seed)}",
        image=image.astype(np.float32, copy=False),
        brain_mask=brain.astype(np.uint8),
        head_mask=head.astype(np.uint8),
        label=label,
        affine=affine,
        contrast=contrast,
        tissue=tissue,
    )


def _atomic_save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> None:
    """Write a NIfTI file under a temporary name in the same folder, then rename it into place."""
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.set_data_dtype(dtype)
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def generate_cohort(
    out_dir: str | os.PathLike,
    n_healthy: int = 4,
    n_lesion: int = 4,
    seed: int = 0,
    shape: tuple[int, int, int] = (128, 128, 80),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    contrast: str = "flair",
    progress: bool = False,
    **kwargs,
) -> list[dict]:
    """Generate a cohort of synthetic subjects and write them as NIfTI files with a ``cohort.csv`` index.

    Writes, for each subject, ``<id>_image.nii.gz`` (float32), ``<id>_brainmask.nii.gz``,
    ``<id>_headmask.nii.gz`` and ``<id>_label.nii.gz`` (uint8), with the subject's affine as qform and
    sform (code 1). Every file is written under a temporary name and renamed into place, so an interrupted
    run leaves no truncated file.

    Args:
        out_dir: output folder, created if missing.
        n_healthy: number of healthy subjects (ids ``synth-000`` onwards, written first).
        n_lesion: number of lesioned subjects (following ids).
        seed: cohort seed; subject ``i`` is drawn from a seed derived from ``(seed, i)``.
        shape: grid size of every subject.
        spacing: voxel size in mm.
        contrast: ``"flair"`` or ``"t1"``.
        progress: show a tqdm progress bar.
        kwargs: further arguments of :func:`make_subject` (``n_lesions``, ``lesion_polarity``, ...).

    Returns:
        one MONAI-style dict per subject: ``{"image", "brain_mask", "head_mask", "label"}`` as absolute path
        strings, ``"subject_id"`` (str) and ``"healthy"`` (bool).
    """
    _check_args(shape, spacing, contrast)
    if n_healthy < 0 or n_lesion < 0:
        raise AEFlowInputError(f"subject counts must be non-negative, got {n_healthy} and {n_lesion}")
    out = make_folder(out_dir)
    flags = [True] * int(n_healthy) + [False] * int(n_lesion)
    iterator = enumerate(flags)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(flags), desc="synthetic cohort", unit="subject")

    records, rows = [], []
    for index, healthy in iterator:
        sid = f"synth-{index:03d}"
        subject = make_subject(
            _subject_seed(seed, index),
            lesion=not healthy,
            shape=shape,
            spacing=spacing,
            contrast=contrast,
            subject_id=sid,
            **kwargs,
        )
        names = {
            "image": f"{sid}_image.nii.gz",
            "brain_mask": f"{sid}_brainmask.nii.gz",
            "head_mask": f"{sid}_headmask.nii.gz",
            "label": f"{sid}_label.nii.gz",
        }
        _atomic_save_nifti(subject.image, subject.affine, out / names["image"], np.float32)
        _atomic_save_nifti(subject.brain_mask, subject.affine, out / names["brain_mask"], np.uint8)
        _atomic_save_nifti(subject.head_mask, subject.affine, out / names["head_mask"], np.uint8)
        _atomic_save_nifti(subject.label, subject.affine, out / names["label"], np.uint8)
        record = {key: str((out / name).resolve()) for key, name in names.items()}
        record.update(subject_id=sid, healthy=healthy)
        records.append(record)
        rows.append({"subject_id": sid, **names, "healthy": int(healthy), "contrast": contrast})

    csv_path = out / "cohort.csv"
    fields = ["subject_id", "image", "brain_mask", "head_mask", "label", "healthy", "contrast"]

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(csv_path, write_csv)
    return records


def extract_slices(subjects: Sequence[SyntheticSubject], min_brain_fraction: float = 0.3) -> dict[str, np.ndarray]:
    """Axial slices (along the last axis) with enough brain, stacked over subjects.

    A slice is kept when its brain area is at least ``min_brain_fraction`` times the largest slice brain
    area of the same subject.

    Args:
        subjects: subjects with the same in-plane size ``(X, Y)``.
        min_brain_fraction: minimum brain area relative to the subject's largest axial brain area.

    Returns:
        ``{"image": float32 (N, 1, X, Y), "label": uint8 (N, 1, X, Y), "brain_mask": uint8 (N, 1, X, Y),
        "slice_label": int64 (N,), "subject_index": int64 (N,), "slice_index": int64 (N,)}``, where
        ``slice_label`` is 1 when the slice holds a lesion voxel.
    """
    if len(subjects) == 0:
        raise AEFlowInputError("extract_slices needs at least one subject")
    plane = subjects[0].image.shape[:2]
    images, labels, masks, subj_idx, slice_idx = [], [], [], [], []
    for i, s in enumerate(subjects):
        if s.image.shape[:2] != plane:
            raise AEFlowInputError(f"subject {s.subject_id} has in-plane size {s.image.shape[:2]}, not {plane}")
        area = s.brain_mask.reshape(-1, s.brain_mask.shape[2]).sum(axis=0)
        keep = np.flatnonzero(area >= min_brain_fraction * area.max())
        images.append(np.moveaxis(s.image[:, :, keep], 2, 0))
        labels.append(np.moveaxis(s.label[:, :, keep], 2, 0))
        masks.append(np.moveaxis(s.brain_mask[:, :, keep], 2, 0))
        subj_idx.append(np.full(keep.size, i, dtype=np.int64))
        slice_idx.append(keep.astype(np.int64))
    label = np.concatenate(labels).astype(np.uint8)[:, None]
    return {
        "image": np.ascontiguousarray(np.concatenate(images).astype(np.float32)[:, None]),
        "label": np.ascontiguousarray(label),
        "brain_mask": np.ascontiguousarray(np.concatenate(masks).astype(np.uint8)[:, None]),
        "slice_label": label.reshape(label.shape[0], -1).any(axis=1).astype(np.int64),
        "subject_index": np.concatenate(subj_idx),
        "slice_index": np.concatenate(slice_idx),
    }


def make_slices(
    n_subjects: int,
    lesion: bool,
    seed: int = 0,
    shape: tuple[int, int, int] = (128, 128, 80),
    **kwargs,
) -> dict[str, np.ndarray]:
    """Generate ``n_subjects`` subjects and return their axial slices (see :func:`extract_slices`).

    Healthy and lesioned sets drawn with the same ``seed`` come from different subjects (their seeds are
    derived from ``(seed, lesion, index)``), so a model trained on one never sees the anatomy of the other.

    Args:
        n_subjects: number of subjects.
        lesion: whether the subjects have lesions.
        seed: seed of the set.
        shape: grid size of every subject.
        kwargs: ``min_brain_fraction`` for :func:`extract_slices`; anything else goes to :func:`make_subject`
            (``spacing``, ``contrast``, ``n_lesions``, ``lesion_polarity``, ...).

    Returns:
        the slice dictionary of :func:`extract_slices`.
    """
    if n_subjects < 1:
        raise AEFlowInputError(f"n_subjects must be at least 1, got {n_subjects}")
    min_fraction = kwargs.pop("min_brain_fraction", 0.3)
    stream = 1 if lesion else 0
    subjects = [
        make_subject(_subject_seed(seed, i, stream=stream), lesion=lesion, shape=shape, **kwargs)
        for i in range(int(n_subjects))
    ]
    return extract_slices(subjects, min_brain_fraction=min_fraction)


SYNTHETIC_IMAGES_INDEX = "synthetic_images.csv"
"""Index file of :func:`generate_synthetic_images` (written last: its presence marks a finished folder)."""


def generate_synthetic_images(
    out_dir: str | os.PathLike,
    n_healthy: int = 8,
    n_lesion: int = 6,
    shape: Sequence[int] = (64, 64, 40),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    seed: int = 0,
    min_lesion_pixels: int = 12,
    min_brain_fraction: float = 0.5,
) -> list[dict[str, Any]]:
    """Write a 2D image folder (``normal/`` and ``abnormal/`` PNG files) of synthetic axial brain slices.

    Normal images are the slices of healthy synthetic subjects; abnormal images are the slices of lesioned
    subjects that hold at least ``min_lesion_pixels`` lesion pixels. File names start with the subject id
    (``synth-h000_z012.png``, ``synth-l003_z020.png``) so that splits keep the slices of a subject together.
    ``synthetic_images.csv`` (file, subject, label) is written last.

    Args:
        out_dir: the folder to create.
        n_healthy: healthy subjects.
        n_lesion: lesioned subjects.
        shape: volume grid of the synthetic subjects (the image size is ``shape[:2]``).
        spacing: voxel size in mm.
        seed: seed of the cohort.
        min_lesion_pixels: lesion pixels an abnormal slice must hold.
        min_brain_fraction: keep slices whose brain area is at least this fraction of the largest.

    Returns:
        One row per image: ``{"file", "subject_id", "label"}``.
    """
    from PIL import Image

    root = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for lesion, count, prefix, folder in ((False, n_healthy, "h", "normal"), (True, n_lesion, "l", "abnormal")):
        if count <= 0:
            continue
        (root / folder).mkdir(parents=True, exist_ok=True)
        slices = make_slices(
            int(count),
            lesion=lesion,
            seed=seed,
            shape=tuple(shape),
            spacing=tuple(spacing),
            min_brain_fraction=min_brain_fraction,
        )
        lesion_pixels = slices["label"].reshape(slices["label"].shape[0], -1).sum(1)
        for i in range(slices["image"].shape[0]):
            if lesion and lesion_pixels[i] < min_lesion_pixels:
                continue
            subject = f"synth-{prefix}{int(slices['subject_index'][i]):03d}"
            name = f"{subject}_z{int(slices['slice_index'][i]):03d}.png"
            pixels = np.clip(np.rint(slices["image"][i, 0] * 255.0), 0, 255).astype(np.uint8)
            atomic_write(root / folder / name, lambda tmp, p=pixels: Image.fromarray(p).save(tmp, format="PNG"))
            rows.append({"file": f"{folder}/{name}", "subject_id": subject, "label": int(lesion)})

    def _index(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "subject_id", "label"])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(root / SYNTHETIC_IMAGES_INDEX, _index)
    return rows
