"""Dataset indexers: turn public datasets, as downloaded, into lists of MONAI data dicts.

Every record has the keys ``"image"`` (path, or list of paths for several channels), ``"mask"``
(brain mask path or ``None``: the mask is then made from the nonzero voxels), ``"label"`` (lesion
label path or ``None``; an ``int`` 0/1 for 2D image folders), ``"subject_id"`` and ``"modality"``.
Some indexers add keys (``"site"`` for IXI, ``"session"`` for ATLAS, ``"split"`` and
``"class_name"`` for 2D folders). Records are sorted by subject id, so indexing is deterministic.

A folder in which an indexer recognises nothing, or a case that lacks the requested modality,
raises :class:`monai_aeflow.errors.AEFlowInputError`: a dataset is never half-built silently.

:func:`make_record` lives in :mod:`monai_aeflow.data.records` and :func:`index_image_folder_2d` in
:mod:`monai_aeflow.data.image_folder_2d`; both stay importable from here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai_aeflow.data.image_folder_2d import index_image_folder_2d
from monai_aeflow.data.io import ITK_SUFFIXES, NIFTI_SUFFIXES, is_dicom_series_dir
from monai_aeflow.data.records import _check_root, make_record
from monai_aeflow.errors import AEFlowInputError

__all__ = [
    "BRATS_MODALITIES",
    "BRATS_REGIONS",
    "BRATS_REGION_LABELS",
    "brats_label_scheme",
    "brats_region_labels",
    "with_brats_region",
    "make_record",
    "index_brats",
    "index_ixi",
    "index_atlas",
    "index_folder",
    "index_image_folder_2d",
    "INDEXERS",
    "index_dataset",
]

BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1c", "t2", "flair")
"""Canonical modality names accepted by :func:`index_brats`."""

BRATS_REGIONS: tuple[str, ...] = ("wt", "tc", "et")
"""BraTS evaluation regions: whole tumour (every tumour label), tumour core, enhancing tumour."""

BRATS_REGION_LABELS: dict[str, dict[str, tuple[int, ...] | None]] = {
    # 1 necrosis / non-enhancing core, 2 oedema, 3 non-enhancing tumour, 4 enhancing tumour (OTMultiClass)
    "2013-2015": {"wt": None, "tc": (1, 3, 4), "et": (4,)},
    # 1 necrotic and non-enhancing tumour core, 2 oedema, 4 enhancing tumour (seg)
    "2017-2021": {"wt": None, "tc": (1, 4), "et": (4,)},
    # 1 non-enhancing tumour core, 2 surrounding FLAIR hyperintensity, 3 enhancing tumour (seg)
    "2023+": {"wt": None, "tc": (1, 3), "et": (3,)},
}
"""Label values of each region in each BraTS label naming (``None``: every non-zero label, ``label > 0``)."""

_MODALITY_ALIASES = {
    "t1": "t1",
    "t1n": "t1",
    "t1w": "t1",
    "t1c": "t1c",
    "t1ce": "t1c",
    "t1gd": "t1c",
    "t1post": "t1c",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2f": "flair",
    "t2flair": "flair",
}

# BraTS 2018-2021: BraTS2021_00000_t1.nii.gz; 2023+: BraTS-GLI-00000-000-t1n.nii.gz
_BRATS_2018 = re.compile(r"^(?P<case>.+?)_(?P<seq>t1|t1ce|t2|flair|seg)\.nii(\.gz)?$", re.IGNORECASE)
_BRATS_2023 = re.compile(r"^(?P<case>BraTS-.+?)-(?P<seq>t1n|t1c|t2w|t2f|seg)\.nii(\.gz)?$", re.IGNORECASE)
# BraTS 2013/2015 as distributed with deepmedic (Flair_subtrMeanDivStd.nii.gz, OTMultiClass.nii.gz, ...)
_BRATS_2015_FILE = re.compile(
    r"^(?P<seq>flair|t1c|t1|t2|otmulticlass|ot|brainmask)(?:[_.].*)?\.(nii|nii\.gz|mha)$", re.IGNORECASE
)
# original BraTS 2015 release: VSD.Brain.XX.O.MR_Flair.54512.mha, VSD.Brain_3more.XX.O.OT.54517.mha
_BRATS_2015_VSD = re.compile(r"^VSD\..*\.(?:MR_(?P<seq>Flair|T1c|T1|T2)|(?P<ot>OT))\.\d+\.mha$", re.IGNORECASE)

_IXI = re.compile(
    r"^(?P<prefix>.*?)(?P<subject>IXI\d{3}-(?P<site>[A-Za-z]+)-\d{4})[-_](?P<seq>T1|T2|PD|MRA)"
    r"(?P<suffix>[^/]*?)\.nii(\.gz)?$"
)
_ATLAS_IMAGE = re.compile(
    r"^(?P<stem>(?P<subject>sub-[A-Za-z0-9]+)(?:_ses-(?P<session>[A-Za-z0-9]+))?.*?)_T1w\.nii(\.gz)?$"
)


def _modalities(modality: str | Sequence[str]) -> list[str]:
    names = [modality] if isinstance(modality, str) else list(modality)
    out = []
    for name in names:
        canonical = _MODALITY_ALIASES.get(name.lower().replace("-", "").replace("_", ""))
        if canonical is None:
            raise AEFlowInputError(f"unknown MRI modality {name!r}; choose from {', '.join(BRATS_MODALITIES)}")
        out.append(canonical)
    if not out:
        raise AEFlowInputError("no modality given")
    return out


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))


def brats_label_scheme(label: str | os.PathLike) -> str:
    """The BraTS label naming of a segmentation file, from its name.

    Args:
        label: the segmentation path (``OTMultiClass.nii.gz`` or ``VSD....OT....mha``: 2013-2015;
            ``BraTS2021_00000_seg.nii.gz``: 2017-2021; ``BraTS-GLI-00000-000-seg.nii.gz``: 2023+).

    Returns:
        A key of :data:`BRATS_REGION_LABELS`.

    Raises:
        AEFlowInputError: a name that is none of these.
    """
    name = Path(label).name
    if (m := _BRATS_2023.match(name)) and m["seq"].lower() == "seg":
        return "2023+"
    if (m := _BRATS_2018.match(name)) and m["seq"].lower() == "seg" and m["case"].lower().startswith("brats"):
        return "2017-2021"
    if ((m := _BRATS_2015_VSD.match(name)) and m["ot"]) or (
        (m := _BRATS_2015_FILE.match(name)) and m["seq"].lower() in ("otmulticlass", "ot")
    ):
        return "2013-2015"
    raise AEFlowInputError("not a BraTS segmentation name: the tumour regions are unknown for it", path=label)


def brats_region_labels(scheme: str, region: str) -> tuple[int, ...] | None:
    """The label values of a BraTS region in a label naming.

    Args:
        scheme: ``"2013-2015"``, ``"2017-2021"`` or ``"2023+"``.
        region: ``"wt"`` (whole tumour), ``"tc"`` (tumour core) or ``"et"`` (enhancing tumour).

    Returns:
        The values, or ``None`` for the whole tumour (every non-zero label).

    Raises:
        AEFlowInputError: an unknown scheme or region.
    """
    if region not in BRATS_REGIONS:
        raise AEFlowInputError(f"unknown BraTS region {region!r}; choose from {', '.join(BRATS_REGIONS)}")
    if scheme not in BRATS_REGION_LABELS:
        raise AEFlowInputError(f"unknown BraTS label naming {scheme!r}; choose from {', '.join(BRATS_REGION_LABELS)}")
    return BRATS_REGION_LABELS[scheme][region]


def with_brats_region(records: Sequence[dict[str, Any]], region: str = "wt") -> list[dict[str, Any]]:
    """Records whose lesion label is a BraTS region: ``region_labels`` holds the region's labels.

    The label naming of each record is read from its segmentation's file name (:func:`brats_label_scheme`).
    The whole tumour changes nothing (``label > 0``); records without a label are left as they are.
    :class:`~monai_aeflow.data.transforms.BinarizeLabeld` then keeps only those values as lesion. Training
    records must not get a region: their healthy slices are free of every tumour label.

    Args:
        records: indexer records.
        region: ``"wt"``, ``"tc"`` or ``"et"``.

    Returns:
        New records (copies), with ``region`` and ``region_labels`` for tc and et.

    Raises:
        AEFlowInputError: an unknown region, or a label that is not a BraTS segmentation.
    """
    brats_region_labels("2013-2015", region)  # checks the region
    out = []
    for record in records:
        record = dict(record)
        label = record.get("label")
        if region != "wt" and isinstance(label, str | os.PathLike):
            record["region"] = region
            record["region_labels"] = list(brats_region_labels(brats_label_scheme(label), region) or ())
        out.append(record)
    return out


def index_brats(
    root: str | os.PathLike,
    modality: str | Sequence[str] = "flair",
    require_label: bool = False,
    region: str = "wt",
) -> list[dict[str, Any]]:
    """Index a BraTS folder in the 2013/2015, 2018-2021 or 2023+ naming.

    Recognised layouts (searched recursively, one case per folder):

    - 2013/2015 (deepmedic copy): ``<case>/Flair_subtrMeanDivStd.nii.gz``, ``T1c_...``, ``T1_...``,
      ``T2_...``, ``OTMultiClass.nii.gz`` and ``brainmask.nii.gz``; or the original release
      ``<case>/VSD.Brain.XX.O.MR_Flair.<id>/VSD....mha`` with ``...OT.<id>.mha``;
    - 2018-2021: ``BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``;
    - 2023+: ``BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``.

    The tumour is ``label > 0`` (see :class:`~monai_aeflow.data.transforms.BinarizeLabeld`) for the whole
    tumour; ``region="tc"`` or ``"et"`` keeps the labels of the tumour core or the enhancing tumour in the
    naming of the case (:data:`BRATS_REGION_LABELS`): the records get ``region`` and ``region_labels``. Use it for
    evaluation records only; training slices must be free of every tumour label (see :func:`with_brats_region`).

    Args:
        root: dataset folder.
        modality: ``"flair"``, ``"t1"``, ``"t1c"``, ``"t2"`` (aliases such as ``"t2f"``, ``"t1ce"``
            and ``"t1n"`` are accepted), or a list of them for a multi-channel image.
        require_label: raise when a case has no segmentation (validation releases have none).
        region: ``"wt"`` (whole tumour, default), ``"tc"`` (tumour core) or ``"et"`` (enhancing tumour).

    Returns:
        one record per case; ``"label"`` is the segmentation path or ``None``, ``"mask"`` the
        brain mask path of the 2015 copy or ``None`` (brain = nonzero voxels).

    Raises:
        AEFlowInputError: when nothing is recognised, or a case lacks the modality or the label.
    """
    root_path = _check_root(root)
    wanted = _modalities(modality)
    brats_region_labels("2013-2015", region)  # an unknown region fails before the folder is searched
    cases: dict[Path, dict[str, Any]] = {}

    def _case(folder: Path, case_id: str, scheme: str) -> dict[str, Any]:
        return cases.setdefault(folder / case_id, {"id": case_id, "scheme": scheme, "files": {}, "dir": folder})

    for path in _files(root_path, NIFTI_SUFFIXES + (".mha",)):
        name = path.name
        if match := _BRATS_2023.match(name):
            seq = match["seq"].lower()
            key = "seg" if seq == "seg" else _MODALITY_ALIASES[seq]
            _case(path.parent, match["case"], "2023")["files"][key] = path
        elif (match := _BRATS_2018.match(name)) and match["case"].lower().startswith("brats"):
            seq = match["seq"].lower()
            key = "seg" if seq == "seg" else _MODALITY_ALIASES[seq]
            _case(path.parent, match["case"], "2018")["files"][key] = path
        elif match := _BRATS_2015_VSD.match(name):
            case_dir = path.parent.parent if path.parent.name.startswith("VSD.") else path.parent
            key = "seg" if match["ot"] else _MODALITY_ALIASES[match["seq"].lower()]
            _case(case_dir.parent, case_dir.name, "2015")["files"][key] = path
        elif match := _BRATS_2015_FILE.match(name):
            seq = match["seq"].lower()
            key = {"otmulticlass": "seg", "ot": "seg", "brainmask": "mask"}.get(seq, _MODALITY_ALIASES.get(seq))
            files = _case(path.parent.parent, path.parent.name, "2015")["files"]
            if key in files and key != "seg":
                raise AEFlowInputError(f"two {key} files: {files[key].name} and {name}", path=path.parent)
            if key == "seg" and "seg" in files and seq == "ot":
                continue  # OTMultiClass wins over a plain OT file
            files[key] = path

    # a 2015-style folder must hold at least one image and be a case (not e.g. a stray brainmask)
    cases = {k: v for k, v in cases.items() if any(m in v["files"] for m in BRATS_MODALITIES)}
    if not cases:
        raise AEFlowInputError(
            "no BraTS case recognised (expected e.g. BraTS2021_00000_flair.nii.gz, "
            "BraTS-GLI-00000-000-t2f.nii.gz or <case>/Flair*.nii.gz with OTMultiClass.nii.gz)",
            path=root_path,
        )
    records = []
    for case in sorted(cases.values(), key=lambda c: c["id"]):
        files, where = case["files"], case["dir"] / case["id"] if case["scheme"] == "2015" else case["dir"]
        missing = [m for m in wanted if m not in files]
        if missing:
            raise AEFlowInputError(f"BraTS case {case['id']} has no {'/'.join(missing)} image", path=where)
        if require_label and "seg" not in files:
            raise AEFlowInputError(f"BraTS case {case['id']} has no segmentation", path=where)
        images = [files[m] for m in wanted]
        records.append(
            make_record(
                images[0] if len(images) == 1 else images,
                subject_id=case["id"],
                modality="+".join(wanted),
                mask=files.get("mask"),
                label=files.get("seg"),
            )
        )
    return with_brats_region(records, region)


def index_ixi(root: str | os.PathLike, modality: str = "T1") -> list[dict[str, Any]]:
    """Index IXI volumes (healthy subjects), e.g. ``IXI002-Guys-0828-T1.nii.gz``.

    Prefixes and suffixes around the IXI name are allowed (``hd_bet_IXI002-Guys-0828-T1.nii.gz``,
    ``IXI012-HH-1211_T1_brain.nii.gz``). A file whose extra text contains ``mask`` is the brain mask
    of the image with the same subject and modality (``hd_bet_mask_IXI002-Guys-0828-T1.nii.gz``).

    Args:
        root: folder searched recursively.
        modality: ``"T1"``, ``"T2"``, ``"PD"`` or ``"MRA"``.

    Returns:
        one record per subject, with ``"label"`` ``None`` and the acquisition ``"site"``
        (``Guys``, ``HH``, ``IOP``).

    Raises:
        AEFlowInputError: when no IXI volume of that modality is found, or a subject has several.
    """
    root_path = _check_root(root)
    seq = modality.upper()
    if seq not in ("T1", "T2", "PD", "MRA"):
        raise AEFlowInputError(f"unknown IXI modality {modality!r}; choose from T1, T2, PD, MRA")
    images: dict[str, list[Path]] = {}
    masks: dict[str, list[Path]] = {}
    sites: dict[str, str] = {}
    for path in _files(root_path, NIFTI_SUFFIXES):
        match = _IXI.match(path.name)
        if not match or match["seq"] != seq:
            continue
        extra = (match["prefix"] + match["suffix"]).lower()
        target = masks if "mask" in extra else images
        target.setdefault(match["subject"], []).append(path)
        sites[match["subject"]] = match["site"]
    if not images:
        raise AEFlowInputError(
            f"no IXI {seq} volume recognised (expected e.g. IXI002-Guys-0828-{seq}.nii.gz)", path=root_path
        )
    records = []
    for subject in sorted(images):
        for kind, found in (("image", images[subject]), ("mask", masks.get(subject, []))):
            if len(found) > 1:
                names = ", ".join(p.name for p in found)
                raise AEFlowInputError(f"several {seq} {kind}s for {subject}: {names}", path=found[0].parent)
        mask = masks.get(subject, [None])[0]
        records.append(
            make_record(images[subject][0], subject, seq.lower(), mask=mask, label=None, site=sites[subject])
        )
    return records


def index_atlas(root: str | os.PathLike, require_label: bool = False) -> list[dict[str, Any]]:
    """Index ATLAS v2 (stroke lesions, BIDS names).

    Images are ``sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz``; the lesion label is the
    file with the same prefix ending in ``_label-L_desc-T1lesion_mask.nii.gz``; a brain mask ending
    in ``_desc-brain_mask.nii.gz`` next to it is used when present (ATLAS T1w images are defaced,
    not skull-stripped).

    Args:
        root: folder searched recursively (e.g. ``ATLAS_2/Training``).
        require_label: raise when an image has no lesion mask (the test release has none).

    Returns:
        one record per image, with ``"session"`` (``None`` when the name has no ``ses-`` entity) and
        ``"site"`` (the cohort ``r001`` of ``sub-r001s001``, or ``None``).

    Raises:
        AEFlowInputError: when no ATLAS image is found or a label is required and missing.
    """
    root_path = _check_root(root)
    records = []
    for path in _files(root_path, NIFTI_SUFFIXES):
        match = _ATLAS_IMAGE.match(path.name)
        if not match:
            continue
        stem = match["stem"]
        labels = sorted(path.parent.glob(f"{stem}_label-*_desc-T1lesion_mask.nii*"))
        masks = sorted(path.parent.glob(f"{stem}_desc-brain_mask.nii*"))
        if len(labels) > 1:
            raise AEFlowInputError(
                f"several lesion masks for {path.name}: {[p.name for p in labels]}", path=path.parent
            )
        if require_label and not labels:
            raise AEFlowInputError("ATLAS image has no *_desc-T1lesion_mask file", path=path)
        records.append(
            make_record(
                path,
                match["subject"],
                "t1",
                mask=masks[0] if masks else None,
                label=labels[0] if labels else None,
                session=match["session"],
                site=site.group(1) if (site := re.match(r"sub-(r\d+)s\d+", match["subject"])) else None,
            )
        )
    if not records:
        raise AEFlowInputError(
            "no ATLAS v2 image recognised (expected sub-<id>_ses-<n>_space-<space>_T1w.nii.gz)", path=root_path
        )
    return sorted(records, key=lambda r: (r["subject_id"], r["session"] or "", r["image"]))


_MATCH_SUFFIXES = ("", "_mask", "-mask", "_brainmask", "_brain_mask", "_seg", "-seg", "_label", "-label", "_lesion")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1] + ITK_SUFFIXES:  # .nii.gz before .nii
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volume_entries(folder: Path) -> list[Path]:
    entries = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.name.lower().endswith(NIFTI_SUFFIXES + (".mha", ".mhd", ".nrrd")):
            entries.append(entry)
        elif entry.is_dir() and is_dicom_series_dir(entry):
            entries.append(entry)
    return entries


def _match_by_name(images: list[Path], folder: Path | None, what: str, strict: bool) -> dict[Path, Path | None]:
    if folder is None:
        return dict.fromkeys(images)
    folder = _check_root(folder)
    candidates = {_stem(p): p for p in _volume_entries(folder)}
    found: dict[Path, Path | None] = {}
    unmatched = []
    for image in images:
        stem = _stem(image)
        match = next((candidates[stem + s] for s in _MATCH_SUFFIXES if stem + s in candidates), None)
        found[image] = match
        if match is None:
            unmatched.append(image.name)
    if strict and unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise AEFlowInputError(f"no {what} matches {len(unmatched)} image(s) by name: {shown}", path=folder)
    return found


def index_folder(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    labels_dir: str | os.PathLike | None = None,
    modality: str = "unknown",
    strict: bool = True,
) -> list[dict[str, Any]]:
    """Index a generic folder of volumes, with optional brain masks and lesion labels matched by name.

    Images are the NIfTI/MetaImage/NRRD files and DICOM series sub-folders of ``images_dir``. A mask
    or label matches an image when its name, without extension, is the image's name or the image's
    name plus ``_mask``, ``_brainmask``, ``_seg``, ``_label`` (...). When ``images_dir`` has an
    ``images`` sub-folder, that is used, and ``masks``/``labels`` sub-folders next to it are taken
    as the brain masks and lesion labels unless given.

    Args:
        images_dir: the folder of volumes (or its parent holding ``images/``).
        masks_dir: folder of brain masks, or ``None``.
        labels_dir: folder of lesion labels, or ``None``.
        modality: modality name stored in each record.
        strict: raise when a given masks/labels folder has no match for some image (otherwise the
            record gets ``None``).

    Returns:
        one record per volume; the subject id is the file name without extension.

    Raises:
        AEFlowInputError: when the folder holds no volume or a match is missing in strict mode.
    """
    folder = _check_root(images_dir)
    if is_dicom_series_dir(folder):
        return [make_record(folder, folder.name, modality, mask=masks_dir, label=labels_dir)]
    if (folder / "images").is_dir():
        masks_dir = masks_dir if masks_dir is not None else (folder / "masks" if (folder / "masks").is_dir() else None)
        labels_dir = (
            labels_dir if labels_dir is not None else (folder / "labels" if (folder / "labels").is_dir() else None)
        )
        folder = folder / "images"
    images = _volume_entries(folder)
    if not images:
        raise AEFlowInputError("no volume found (expected .nii/.nii.gz files or DICOM series folders)", path=folder)
    masks = _match_by_name(images, Path(masks_dir) if masks_dir is not None else None, "brain mask", strict)
    labels = _match_by_name(images, Path(labels_dir) if labels_dir is not None else None, "label", strict)
    return [make_record(p, _stem(p), modality, mask=masks[p], label=labels[p]) for p in images]


INDEXERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "brats": index_brats,
    "ixi": index_ixi,
    "atlas": index_atlas,
    "folder": index_folder,
    "images2d": index_image_folder_2d,
}
"""Indexers by dataset name, for configuration files and the command line."""


def index_dataset(kind: str, root: str | os.PathLike, **kwargs: Any) -> list[dict[str, Any]]:
    """Index a dataset by name (``"brats"``, ``"ixi"``, ``"atlas"``, ``"folder"``, ``"images2d"``).

    Args:
        kind: key of :data:`INDEXERS`.
        root: dataset folder.
        kwargs: options of the indexer (e.g. ``modality="t1"``).

    Returns:
        the records of the indexer.

    Raises:
        AEFlowInputError: for an unknown kind or what the indexer raises.
    """
    if kind not in INDEXERS:
        raise AEFlowInputError(f"unknown dataset kind {kind!r}; choose from {', '.join(INDEXERS)}")
    return INDEXERS[kind](root, **kwargs)
