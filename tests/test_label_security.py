"""MONAI Label app against a real server on loopback: it reads only its datastore, checks requests, stays responsive.

Each test sends what an adversarial but fair client would: a server path instead of a datastore id, ids of files
that exist and that do not, malformed ``params``, a garbage upload, and more requests than the queue holds.
Skipped when MONAI Label is not installed (see the README, section MONAI Label).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

from label_server import LocalLabelServer  # noqa: E402

from monai_aeflow.label.routes import InferQueue, QueueFull  # noqa: E402
from monai_aeflow.label.validation import IMAGE_NOT_FOUND, RequestError, parse_params, resolve_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "aeflow_label"
START_DEADLINE_S = 240.0


def _start(root: Path, studies: Path, model: Path, **conf: str) -> LocalLabelServer:
    app = Path(shutil.copytree(APP_DIR, root / "app", ignore=shutil.ignore_patterns("bin", "lib", "logs", "model")))
    tmp = root / "server_tmp"
    tmp.mkdir()
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "TMPDIR": str(tmp)}
    srv = LocalLabelServer(app, studies, {"model": model, "device": "cpu", **conf}, log_file=root / "log", env=env)
    srv.start()
    srv.wait_ready(timeout=START_DEADLINE_S)
    return srv


@pytest.fixture(scope="module")
def server(small_volume_model, tmp_path_factory):
    """A server over one lesioned study, with a readable NIfTI (and its brain mask) outside the datastore."""
    root = tmp_path_factory.mktemp("label_security")
    studies = root / "studies"
    studies.mkdir()
    record = small_volume_model["lesioned"][0]
    shutil.copy(record["image"], studies / "lesioned.nii.gz")
    outside = root / "private"
    outside.mkdir()
    shutil.copy(record["image"], outside / "secret.nii.gz")
    shutil.copy(record["brain_mask"], outside / "secret_mask.nii.gz")
    srv = _start(root, studies, small_volume_model["model"])
    try:
        yield {"server": srv, "url": srv.url, "outside": outside, "tmp": root / "server_tmp", "record": record}
    finally:
        srv.stop()


def _post(url: str, image: str | None = None, params: str | None = None, files=None, timeout: float = 300):
    query = {} if image is None else {"image": image}
    data = None if params is None else {"params": params}
    return requests.post(f"{url}/infer/aeflow", params=query, data=data, files=files, timeout=timeout)


def _log_since(srv: LocalLabelServer, start: int) -> str:
    return srv.log_file.read_text(errors="replace")[start:]


# -- unit level: the request checks --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    ["{not json", "[1,2,3]", "null", '{"image": 12345}', '{"image": "/etc/passwd"}', '"text"', '{"save_label": 3}'],
)
def test_parse_params_refuses_what_is_not_a_checked_object(text):
    with pytest.raises(RequestError) as err:
        parse_params(text)
    assert err.value.status == 400 and "\n" not in err.value.message


def test_parse_params_keeps_only_known_keys_with_their_types():
    assert parse_params("") == {} and parse_params(None) == {}
    out = parse_params('{"brain_mask": "brainmask", "save_label": "true", "result_extension": ".nrrd", "device": "x"}')
    assert out == {"brain_mask": "brainmask", "save_label": True}
    with pytest.raises(RequestError, match="label tag"):
        parse_params('{"brain_mask": "/data/mask.nii.gz"}')
    with pytest.raises(RequestError, match="label tag"):
        parse_params('{"label_tag": "../../etc"}')


def test_infer_queue_bounds_pending_jobs_and_passes_results_and_errors():
    gate = threading.Event()
    jobs = InferQueue(max_pending=2)
    first = jobs.submit(lambda: gate.wait(30) and "done")
    second = jobs.submit(lambda: 1 / 0)
    assert jobs.pending == 2
    with pytest.raises(QueueFull):
        jobs.submit(lambda: None)
    gate.set()
    assert first.result(30) == "done"
    with pytest.raises(ZeroDivisionError):
        second.result(30)
    deadline = time.monotonic() + 10
    while jobs.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs.pending == 0
    assert jobs.submit(lambda: 7).result(30) == 7


class _Store:
    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def get_image_uri(self, image_id: str) -> str:
        return self.files.get(image_id, "")


def test_resolve_image_takes_only_ids_the_datastore_holds(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"x")
    store = _Store({"scan": str(scan)})
    assert resolve_image(store, "scan") == str(scan)
    for bad in (str(scan), "/etc/passwd", "no_such_id", "", ".", "..", "../scan", "scan/..", None, 12345):
        with pytest.raises(RequestError) as err:
            resolve_image(store, bad)
        assert (err.value.status, err.value.message) == (404, IMAGE_NOT_FOUND)


# -- a real server ---------------------------------------------------------------------------------------------------
def test_server_never_reads_a_path_the_client_names(server):
    url, outside = server["url"], server["outside"]
    secret = str(outside / "secret.nii.gz")
    # the query's image as an absolute path of a readable volume: not a datastore id
    res = _post(url, image=secret)
    assert res.status_code == 404, res.text[:500]
    assert res.json()["detail"] == IMAGE_NOT_FOUND
    # the same path through params (image and brain_mask)
    res = _post(url, image="lesioned", params=json.dumps({"image": secret}))
    assert res.status_code == 400, res.text[:500]
    res = _post(url, image="lesioned", params=json.dumps({"brain_mask": str(outside / "secret_mask.nii.gz")}))
    assert res.status_code == 400, res.text[:500]
    # a tag the image has no label for
    res = _post(url, image="lesioned", params=json.dumps({"brain_mask": "brainmask"}))
    assert res.status_code == 404, res.text[:500]
    # whole-slide inference reaches the same app: refused
    res = requests.post(f"{url}/infer/wsi/aeflow", params={"image": secret}, json={}, timeout=60)
    assert res.status_code in (400, 404, 422), res.text[:500]
    # a datastore id still works
    res = _post(url, image="lesioned")
    assert res.status_code == 200, res.text[:500]


def test_server_answers_unknown_ids_alike_whether_or_not_a_file_exists(server):
    url, outside = server["url"], server["outside"]
    ids = [
        "/etc/shadow",
        "/etc/passwd",
        "/no/such/file.nii.gz",
        str(outside / "secret.nii.gz"),
        str(outside / "missing.nii.gz"),
        "no_such_id",
        ".",
        "..",
        "../studies/lesioned",
    ]
    answers = set()
    for image in ids:
        res = _post(url, image=image, timeout=60)
        answers.add((res.status_code, res.text))
    assert len(answers) == 1, answers
    status, text = answers.pop()
    assert status == 404 and json.loads(text)["detail"] == IMAGE_NOT_FOUND


@pytest.mark.parametrize("params", ["{not json", "[1,2,3]", "null", '{"image": 12345}', '{"timeout": "soon"}'])
def test_server_answers_malformed_params_with_400_and_no_traceback(server, params):
    srv = server["server"]
    start = len(srv.log_file.read_text(errors="replace"))
    res = _post(server["url"], image="lesioned", params=params, timeout=60)
    assert res.status_code == 400, res.text[:500]
    detail = res.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    assert "Traceback" not in _log_since(srv, start)


def test_server_removes_uploaded_files_after_a_failed_request(server, tmp_path):
    url, tmp = server["url"], server["tmp"]
    before = set(tmp.iterdir())
    garbage = b"\x1f\x8b\x08\x00 this is not a volume" * 50
    res = _post(url, files={"file": ("scan.nii.gz", garbage, "application/octet-stream")}, timeout=120)
    assert res.status_code == 400, res.text[:500]
    assert "\n" not in res.json()["detail"]
    time.sleep(0.5)
    assert set(tmp.iterdir()) == before, sorted(p.name for p in set(tmp.iterdir()) - before)
    # a successful upload leaves nothing either (the answer's label file goes once it is sent)
    with open(server["record"]["image"], "rb") as fh:
        res = _post(url, files={"file": ("../../x/scan.nii.gz", fh, "application/octet-stream")})
    assert res.status_code == 200, res.text[:500]
    deadline = time.monotonic() + 10
    while set(tmp.iterdir()) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(tmp.iterdir()) == before


def test_server_guards_monai_labels_own_datastore_model_and_batch_routes(server, small_volume_model):
    """MONAI Label's datastore routes join ids and tags to paths unchecked, its model routes replace or rename the
    served file, and its batch inference fails on a CPU server: the app guards all of them."""
    url, srv, record = server["url"], server["server"], server["record"]
    root = server["tmp"].parent
    start = len(srv.log_file.read_text(errors="replace"))
    scan = Path(record["image"]).read_bytes()
    mask = Path(record["brain_mask"]).read_bytes()
    for route in ("/datastore/", "/datastore/image"):  # a new image named ../x: outside the studies folder
        res = requests.put(
            f"{url}{route}", params={"image": "../evilA"}, files={"file": ("a.nii.gz", scan)}, timeout=60
        )
        assert res.status_code == 400 and "image must be a datastore id" in res.json()["detail"], res.text[:300]
    for query in ({"image": "lesioned", "tag": "../../evil3"}, {"image": "../evilB", "tag": "final"}):
        res = requests.put(f"{url}/datastore/label", params=query, files={"label": ("l.nii.gz", mask)}, timeout=60)
        assert res.status_code == 400, res.text[:300]
    res = requests.delete(f"{url}/datastore/", params={"id": "../studies"}, timeout=60)
    assert res.status_code == 400, res.text[:300]
    assert (
        not (root / "evilA.nii.gz").exists() and not (root / "evil3").exists() and not (root / "evilB.nii.gz").exists()
    )
    # what an annotator does still works: save a label of a datastore image and read it back
    res = requests.put(
        f"{url}/datastore/label",
        params={"image": "lesioned", "tag": "audit"},
        files={"label": ("l.nii.gz", mask)},
        timeout=60,
    )
    assert res.status_code == 200, res.text[:300]
    res = requests.get(f"{url}/datastore/label", params={"label": "lesioned", "tag": "audit"}, timeout=60)
    assert res.status_code == 200 and res.content == mask
    # the served model file is neither replaced nor renamed
    model = Path(small_volume_model["model"])
    before = model.read_bytes()
    res = requests.put(f"{url}/model/aeflow", files={"file": ("m.pt", b"garbage")}, timeout=60)
    assert res.status_code == 403 and "--conf model" in res.json()["detail"], res.text[:300]
    assert requests.delete(f"{url}/model/aeflow", timeout=60).status_code == 403
    assert model.read_bytes() == before
    res = requests.post(f"{url}/batch/infer/aeflow", params={"images": "all", "run_sync": "true"}, json={}, timeout=60)
    assert res.status_code == 400 and "POST /infer/<model>" in res.json()["detail"], res.text[:300]
    assert "Traceback" not in _log_since(srv, start)


def test_server_answers_name_no_server_path(server):
    url, srv = server["url"], server["server"]
    root = str(server["tmp"].parent)
    res = _post(url, image="lesioned", params="[" * 100000, timeout=60)  # nested too deeply for json
    assert res.status_code == 400, res.text[:300]
    garbage = b"\x1f\x8b\x08\x00 not a volume" * 50
    res = _post(url, files={"file": ("scan.nii.gz", garbage, "application/octet-stream")}, timeout=120)
    assert res.status_code == 400 and res.json()["detail"].startswith("the uploaded image: "), res.text[:300]
    assert root not in res.text and "server_tmp" not in res.text
    label, result = srv.infer("aeflow", "lesioned", timeout=300)
    assert label is not None, result
    assert result["input"] == "lesioned" and result["model"]["model_file"] == "model.pt", result["model"]
    assert root not in json.dumps(result)
    info = requests.get(f"{url}/info/", timeout=60).json()
    assert info["models"]["aeflow"]["model_file"] == "model.pt" and root not in json.dumps(info["models"])


def test_server_refuses_an_unknown_model(server):
    res = requests.post(f"{server['url']}/infer/other", params={"image": "lesioned"}, timeout=60)
    assert res.status_code == 404 and "aeflow" in res.json()["detail"]


def _brats_sized(record: dict, path: Path) -> Path:
    """The synthetic volume resampled to BraTS' 240 x 240 x 155 grid."""
    img = nib.load(record["image"])
    data = img.get_fdata(dtype=np.float32)
    factors = np.array((240, 240, 155)) / np.array(data.shape)
    big = ndimage.zoom(data, factors, order=1).astype(np.float32)
    affine = img.affine @ np.diag([*(1 / factors), 1.0])
    nib.save(nib.Nifti1Image(big, affine), str(path))
    return path


def test_info_answers_in_2s_while_16_large_requests_queue_and_the_17th_gets_503(small_volume_model, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    _brats_sized(small_volume_model["lesioned"][0], studies / "brats.nii.gz")
    srv = _start(tmp_path, studies, small_volume_model["model"], max_queue="16")
    try:
        answers: list[int] = []

        def send() -> None:
            try:
                answers.append(_post(srv.url, image="brats", timeout=600).status_code)
            except requests.RequestException:
                pass  # the server is stopped before the queue drains

        threads = [threading.Thread(target=send, daemon=True) for _ in range(16)]
        for t in threads:
            t.start()
        slowest, pending = 0.0, 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            info = requests.get(f"{srv.url}/info/", timeout=30)
            slowest = max(slowest, time.monotonic() - t0)
            assert info.status_code == 200
            pending = info.json()["aeflow_queue"]["pending"]
            if pending == 16:
                break
            time.sleep(0.1)
        assert pending == 16, (pending, answers)
        t0 = time.monotonic()
        res = _post(srv.url, image="brats", timeout=30)
        assert res.status_code == 503, res.text[:500]
        assert time.monotonic() - t0 < 2.0
        assert "Retry-After" in res.headers
        for _ in range(5):
            t0 = time.monotonic()
            assert requests.get(f"{srv.url}/info/", timeout=30).status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.2)
        assert slowest < 2.0, slowest
    finally:
        srv.stop()


@pytest.mark.parametrize("readme", [ROOT / "README.md", APP_DIR / "README.md"])
def test_readmes_bind_the_server_to_loopback_and_explain_authentication(readme):
    text = readme.read_text()
    joined = text.replace("\\\n", " ")
    starts = [m.start() for m in re.finditer(r"monailabel start_server --app", joined)]
    assert starts
    auth = joined.find("MONAI_LABEL_AUTH_ENABLE=true")
    for pos in starts:
        command = joined[pos : joined.index("\n", pos)]
        # loopback, or another host only once authentication has been turned on
        assert "--host 127.0.0.1" in command or (0 <= auth < pos and "--host" in command), command
    assert "--host 127.0.0.1" in joined[starts[0] : joined.index("\n", starts[0])]
    assert "MONAI_LABEL_AUTH_ENABLE" in text
