"""A PACS round trip: Orthanc (DICOMweb) -> MONAI Label with the AE-FLOW app -> DICOM SEG back in Orthanc.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``, installed by ``.ci/run``) runs on a free loopback
port with a temporary configuration and storage. A synthetic DICOM series (a lesioned volume of
``tests/conftest.py`` written with pydicom) and, when ``../shared/data`` is present, the real series
``dicom_t1_series`` are uploaded over DICOMweb (STOW-RS); a MONAI Label server is started with Orthanc's DICOMweb
address as its studies; each series is scored through ``POST /infer/aeflow``, and the DICOM SEG (and Parametric Map)
stored back in Orthanc for that study is searched (QIDO-RS), retrieved (WADO-RS) and checked against the series.
"""

from __future__ import annotations

import json
import os
import shutil
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monailabel")
pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
requests = pytest.importorskip("requests")

from dicom_series import write_series  # noqa: E402
from dicomweb_client.api import DICOMwebClient  # noqa: E402
from label_server import LocalLabelServer  # noqa: E402
from orthanc_server import ORTHANC, PLUGIN, LocalOrthanc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
REQUEST_TIMEOUT_S = 600.0

pytestmark = pytest.mark.skipif(
    ORTHANC is None or PLUGIN is None,
    reason="Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
    ".ci/run installs them)",
)


def _upload(client: DICOMwebClient, folder: Path) -> dict[str, str]:
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.endswith(".nfo")]
    datasets = [ds for ds in datasets if "PixelData" in ds]
    client.store_instances(datasets)
    first = datasets[0]
    return {
        "study": str(first.StudyInstanceUID),
        "series": str(first.SeriesInstanceUID),
        "frame_of_reference": str(first.FrameOfReferenceUID),
        "instances": {str(ds.SOPInstanceUID) for ds in datasets},
        "folder": folder,
        "n": len(datasets),
        "shape": (int(first.Columns), int(first.Rows), len(datasets)),
    }


@pytest.fixture(scope="module")
def pacs(small_volume_model, tmp_path_factory):
    """Orthanc holding the series, and a MONAI Label server whose datastore is Orthanc's DICOMweb address."""
    root = tmp_path_factory.mktemp("pacs")
    orthanc = LocalOrthanc(root / "orthanc").start()
    try:
        client = DICOMwebClient(url=orthanc.dicomweb)
        write_series(small_volume_model["lesioned"][0]["image"], root / "synthetic_series")
        series = {"synthetic": _upload(client, root / "synthetic_series")}
        real = Path(os.environ.get("AEFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / "dicom_t1_series"
        if real.is_dir():
            series["real"] = _upload(client, real)
        ignore = shutil.ignore_patterns("bin", "lib", "logs", "model", "__pycache__")
        app = Path(shutil.copytree(ROOT / "apps" / "aeflow_label", root / "app", ignore=ignore))
        env = {
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"),
        }
        conf = {"model": small_volume_model["model"], "device": "cpu"}
        label = LocalLabelServer(app, orthanc.dicomweb, conf, log_file=root / "label.log", env=env)
        label.start()
        try:
            label.wait_ready(timeout=300)
            yield {"orthanc": orthanc, "client": client, "label": label, "series": series, "root": root}
        finally:
            label.stop()
    finally:
        orthanc.stop()


def _check_stored(client: DICOMwebClient, stored: dict, source: dict, sop_class: str, modality: str) -> None:
    """The object named in the result is in Orthanc, in the source's study, and references the source series."""
    assert stored["StudyInstanceUID"] == source["study"] and stored["Modality"] == modality
    found = client.search_for_series(study_instance_uid=source["study"], search_filters={"Modality": modality})
    series_uids = [item["0020000E"]["Value"][0] for item in found]
    assert stored["SeriesInstanceUID"] in series_uids, series_uids
    (obj,) = client.retrieve_series(source["study"], stored["SeriesInstanceUID"])
    assert obj.SOPClassUID == sop_class and obj.FrameOfReferenceUID == source["frame_of_reference"]
    (ref,) = obj.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == source["series"]
    assert {str(i.ReferencedSOPInstanceUID) for i in ref.ReferencedInstanceSequence} == source["instances"]
    assert int(obj.NumberOfFrames) == source["n"]


def _round_trip(pacs: dict, which: str, tmp_path: Path) -> None:
    source = pacs["series"][which]
    client = pacs["client"]
    listed = client.search_for_series(search_filters={"Modality": "MR"})
    assert source["series"] in [item["0020000E"]["Value"][0] for item in listed]
    content, result = pacs["label"].infer("aeflow", source["series"], timeout=REQUEST_TIMEOUT_S)
    assert content is not None, result
    (tmp_path / "mask.nii.gz").write_bytes(content)
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert mask.shape == source["shape"]  # the series' own grid (columns, rows, slices)
    stored = result["dicom"]
    _check_stored(client, stored["seg"], source, SEG_STORAGE, "SEG")
    _check_stored(client, stored["pmap"], source, PARAMETRIC_MAP_STORAGE, stored["pmap"]["Modality"])
    seg = client.retrieve_series(source["study"], stored["seg"]["SeriesInstanceUID"])[0]
    assert int(seg.pixel_array.sum()) == int(np.asanyarray(mask.dataobj).sum()) == result["lesion_voxels"]


def test_orthanc_round_trip_synthetic_series(pacs, tmp_path):
    _round_trip(pacs, "synthetic", tmp_path)


def test_orthanc_round_trip_real_series(pacs, tmp_path):
    if "real" not in pacs["series"]:
        pytest.skip("../shared/data/dicom_t1_series not present")
    _round_trip(pacs, "real", tmp_path)


def test_label_answers_output_dicom_seg_for_a_series(pacs):
    source = pacs["series"]["synthetic"]
    res = requests.post(
        f"{pacs['label'].url}/infer/aeflow",
        params={"image": source["series"], "output": "dicom_seg"},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert res.status_code == 200, res.text[:2000]
    assert res.headers["content-type"].startswith("application/dicom")
    seg = pydicom.dcmread(BytesIO(res.content))
    assert seg.SOPClassUID == SEG_STORAGE and seg.StudyInstanceUID == source["study"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source["series"]
    # the heat-map task scores DICOMweb series too
    levels, result = pacs["label"].infer("aeflow_levels", source["series"], timeout=REQUEST_TIMEOUT_S)
    assert levels is not None and "dicom" not in result and result["levels"]["labels"] is not None
