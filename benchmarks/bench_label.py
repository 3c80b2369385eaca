"""Latency of one MONAI Label infer request for a 240x240x155 volume, split into model time and server overhead.

Builds an AE-FLOW model file (random weights: the latency does not depend on training; a threshold is stored so
that the lesion mask and its post-processing run as in use) and one synthetic lesioned volume of 240x240x155
voxels (1 mm, the BraTS grid). Then, one after the other on the same machine:

- ``model``: :meth:`AnomalyScorer.score` called in-process on the volume (load, preprocessing, batched slice
  inference, map back to the input grid, post-processing and threshold): what ``aeflow-cli score`` spends per
  volume without writing files. ``network_seconds`` is the forward passes alone;
- ``request``: ``POST /infer/aeflow?image=<id>`` to a ``monailabel`` server on 127.0.0.1 running
  ``apps/aeflow_label``, timed by the client from sending the request to having the multipart answer;
- ``overhead`` = request - model: what MONAI Label adds (HTTP, datastore look-up, writing the mask and the map as
  NIfTI, storing the map in the datastore, multipart encoding). The server's own latencies
  (``result["latencies"]``: the task's inference and writing) are reported too, and
  ``server_overhead_seconds`` = request - the scorer's time inside the same request, which does not depend on
  how the load of the machine differs between the two measurements.

Then ``queue``: ``--queue N`` requests sent at once (the app's ``max_queue``), ``GET /info/`` timed while they wait
(against ``GET /info/`` on the idle server, measured in the same run) and the time of the answer ``503`` to one
more request: the server stays responsive while it scores.

The two are measured alternately (scorer, request, scorer, request, ...) so that the load of the machine weighs
on both alike; each figure is the median of ``--repeats`` runs after one warm-up run of each (the overhead is also
given from the minima). Prints one JSON object.

With ``--dicom`` (needs Orthanc and its DICOMweb plugin, ``apt-get install orthanc orthanc-dicomweb``), the volume is
also written as a DICOM series, uploaded to an Orthanc on a free loopback port, and a second server is started with
Orthanc as its DICOMweb datastore; there ``POST /infer/aeflow?image=<series>`` is timed alternately with the NIfTI
answer (the default: lesion mask as NIfTI and the result JSON) and with ``output=dicom_seg`` (the lesion mask as a
DICOM SEG), same series, same server (``dicom``).

Run: ``python benchmarks/bench_label.py [--backbone wide_resnet50_2|resnet18] [--size 256] [--repeats 3] [--queue 16]
[--dicom]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _make_model(path: Path, backbone: str, size: int) -> Path:
    from monai_aeflow.checkpoint import save_model
    from monai_aeflow.networks import AEFlow

    torch.manual_seed(0)
    config = {
        "preprocessing": {"spatial_size": [size, size], "percentiles": [1.0, 99.0], "orientation": "RAS"},
        "score": {"beta": 0.9, "map_kind": "residual"},
    }
    net = AEFlow(backbone=backbone, backbone_weights=None)
    return save_model(net, path, config=config, threshold=0.5, threshold_protocol={"method": "benchmark"})


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _timed_get(url: str) -> float:
    import requests

    start = time.perf_counter()
    requests.get(url, timeout=60).raise_for_status()
    return time.perf_counter() - start


def _queue_responsiveness(server, image_id: str, n: int) -> dict:
    """``GET /info/`` while ``n`` requests wait, against the idle server; the time of a ``503`` beyond the queue."""
    import requests

    info = f"{server.url}/info/"
    idle = [_timed_get(info) for _ in range(5)]

    def send() -> None:
        try:
            requests.post(f"{server.url}/infer/aeflow", params={"image": image_id}, timeout=3600)
        except requests.RequestException:
            pass  # the server is stopped before the queue drains

    for _ in range(n):
        threading.Thread(target=send, daemon=True).start()
    deadline, pending = time.monotonic() + 120, 0
    while pending < n and time.monotonic() < deadline:
        pending = requests.get(info, timeout=60).json()["aeflow_queue"]["pending"]
        time.sleep(0.05)
    busy = [_timed_get(info) for _ in range(10)]
    start = time.perf_counter()
    refused = requests.post(f"{server.url}/infer/aeflow", params={"image": image_id}, timeout=60)
    refused_s = time.perf_counter() - start
    return {
        "requests_queued": pending,
        "info_idle_seconds_median": _median(idle),
        "info_busy_seconds_median": _median(busy),
        "info_busy_seconds_max": round(max(busy), 3),
        "info_busy_over_idle": round(statistics.median(busy) / statistics.median(idle), 2),
        "beyond_queue_status": refused.status_code,
        "beyond_queue_seconds": round(refused_s, 3),
    }


def _dicom_comparison(args: argparse.Namespace, work: Path, app: Path, conf: dict, volume: Path, env: dict) -> dict:
    """Request latency on a DICOMweb (Orthanc) datastore: the NIfTI mask answer against the DICOM SEG answer."""
    import requests
    from dicom_series import write_series
    from dicomweb_client.api import DICOMwebClient
    from label_server import LocalLabelServer
    from orthanc_server import LocalOrthanc

    series = write_series(volume, work / "series")["SeriesInstanceUID"]
    with LocalOrthanc(work / "orthanc") as orthanc:
        import pydicom

        files = sorted((work / "series").iterdir())
        DICOMwebClient(url=orthanc.dicomweb).store_instances([pydicom.dcmread(f) for f in files])
        env = {
            **env,
            "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicom_cache"),
        }
        conf = {**conf, "dicom_store": "false"}
        with LocalLabelServer(app, orthanc.dicomweb, conf, log_file=work / "server_dicom.log", env=env) as server:
            server.wait_ready(timeout=600)

            def timed(output: str | None) -> tuple[float, int]:
                params = {"image": series, **({"output": output} if output else {})}
                start = time.perf_counter()
                res = requests.post(f"{server.url}/infer/aeflow", params=params, data={"params": "{}"}, timeout=1800)
                res.raise_for_status()
                return time.perf_counter() - start, len(res.content)

            timed(None), timed("dicom_seg")  # warm-up (the first also downloads the series into the cache)
            nifti, seg = [], []
            for _ in range(args.repeats):
                nifti.append(timed(None))
                seg.append(timed("dicom_seg"))
    nifti_s, seg_s = [t for t, _ in nifti], [t for t, _ in seg]
    return {
        "datastore": "Orthanc DICOMweb (loopback)",
        "slices": len(files),
        "nifti_request_seconds": _median(nifti_s),
        "dicom_seg_request_seconds": _median(seg_s),
        "dicom_seg_extra_seconds": round(statistics.median(seg_s) - statistics.median(nifti_s), 3),
        "nifti_answer_bytes": nifti[-1][1],
        "dicom_seg_bytes": seg[-1][1],
        "runs": {"nifti": [round(v, 3) for v in nifti_s], "dicom_seg": [round(v, 3) for v in seg_s]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="wide_resnet50_2", choices=["wide_resnet50_2", "resnet18"])
    parser.add_argument("--size", type=int, default=256, help="model input size (pixels)")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the scorer's (by device and size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--queue", type=int, default=16, help="requests sent at once (0: no queue measurement)")
    parser.add_argument("--dicom", action="store_true", help="also time DICOM SEG against NIfTI answers (Orthanc)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from monai_aeflow.data.synthetic import generate_cohort
    from monai_aeflow.inference import AnomalyScorer

    sys.path.insert(0, str(ROOT / "tests"))  # the test harness that runs a server
    from label_server import LocalLabelServer

    work = Path(tempfile.mkdtemp(prefix="bench_label_"))
    try:
        model = _make_model(work / "model.pt", args.backbone, args.size)
        cohort = generate_cohort(work / "data", 0, 1, seed=3, shape=tuple(args.shape), spacing=(1.0, 1.0, 1.0))
        studies = work / "studies"
        studies.mkdir()
        volume = studies / "case.nii.gz"
        shutil.copy(cohort[0]["image"], volume)

        # the scorer in this process, and a MONAI Label server over the same volume; measured alternately so that
        # the load of the machine affects both alike
        scorer = AnomalyScorer(model, device=args.device, batch_size=args.batch_size)
        app = Path(
            shutil.copytree(ROOT / "apps" / "aeflow_label", work / "app", ignore=shutil.ignore_patterns("__pycache__"))
        )
        conf = {"model": model, "device": args.device, "max_queue": max(args.queue, 1)}
        if args.batch_size is not None:
            conf["batch_size"] = args.batch_size
        env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        server = LocalLabelServer(app, studies, conf, log_file=work / "server.log", env=env)
        with server:
            start = time.perf_counter()
            server.wait_ready(timeout=600)
            startup_s = time.perf_counter() - start
            result = scorer.score(volume)  # warm-up
            server.infer("aeflow", "case")  # warm-up
            model_s, network_s, request_s, task_s, write_s = [], [], [], [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = scorer.score(volume)
                model_s.append(time.perf_counter() - start)
                network_s.append(result.scores["timing"]["model_seconds"])
                start = time.perf_counter()
                label, params = server.infer("aeflow", "case")
                request_s.append(time.perf_counter() - start)
                task_s.append(params["latencies"]["infer"])
                write_s.append(params["latencies"]["write"])
            label_bytes = len(label or b"")
            queue = _queue_responsiveness(server, "case", args.queue) if args.queue > 0 else None
        dicom = _dicom_comparison(args, work, app, conf, volume, env) if args.dicom else None
        scored_slices = result.scores["scored_slices"]

        model_med, request_med = _median(model_s), _median(request_s)
        report = {
            "benchmark": "monai label infer latency",
            "machine": {
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(),
            },
            "device": args.device,
            "model": {"backbone": args.backbone, "input_size": args.size, "batch_size": args.batch_size},
            "volume": {"shape": args.shape, "scored_slices": scored_slices},
            "repeats": args.repeats,
            "model_seconds": model_med,
            "network_seconds": _median(network_s),
            "request_seconds": request_med,
            "overhead_seconds": round(request_med - model_med, 3),
            "overhead_seconds_from_minima": round(min(request_s) - min(model_s), 3),
            "server_overhead_seconds": _median([r - t for r, t in zip(request_s, task_s, strict=True)]),
            "server_task_infer_seconds": _median(task_s),
            "server_task_write_seconds": _median(write_s),
            "server_startup_seconds": round(startup_s, 1),
            "label_bytes": label_bytes,
            "queue": queue,
            "dicom": dicom,
            "runs": {"model": [round(v, 3) for v in model_s], "request": [round(v, 3) for v in request_s]},
        }
        print(json.dumps(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
