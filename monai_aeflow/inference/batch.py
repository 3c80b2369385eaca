"""Scoring many inputs: expanding the command-line inputs and :func:`score_paths` over a locked output folder."""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from monai_aeflow.data.io import IMAGE_2D_SUFFIXES, file_kind, is_dicom_series_dir
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.inference.outputs import (
    kept_outputs,
    lock_output_folder,
    output_name,
    output_paths,
    output_state,
    remove_leftovers,
    write_outputs,
)
from monai_aeflow.inference.result import ScoreResult
from monai_aeflow.inference.scorer import AnomalyScorer
from monai_aeflow.inference.writer import BackgroundWriter

__all__ = ["check_resume", "expand_inputs", "score_paths"]


ACCELERATOR_WRITE_THREADS = 4
"""Writer threads of :func:`score_paths` when the scorer runs on an accelerator."""

ACCELERATOR_SCORE_THREADS = 2
"""Scoring threads of :func:`score_paths` when the scorer runs on CUDA: while one thread's volume waits for the
device (its network, inverse transforms and post-processing are queued on the thread's own CUDA stream), the
other prepares and launches the next volume, so the Python work between kernels no longer leaves the GPU idle."""


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand the command-line inputs: files, DICOM series folders, folders of them, and glob patterns.

    A folder that is not itself a DICOM series contributes its supported files and DICOM sub-folders (one
    level, sorted). A pattern with ``*``, ``?`` or ``[`` is expanded with :mod:`glob` (``**`` recursive).
    Paths that do not exist are kept, so that scoring reports them as failed inputs.

    Args:
        paths: what the user gave.

    Returns:
        The inputs, in order, without duplicates.

    Raises:
        AEFlowInputError: a pattern or folder that matches nothing.
    """
    out: list[Path] = []
    for raw in paths:
        text = os.fspath(raw)
        if any(c in text for c in "*?[") and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise AEFlowInputError("pattern matches no file", path=text)
            out += [Path(m) for m in matches]
            continue
        p = Path(text)
        if p.is_dir() and not is_dicom_series_dir(p):
            found = []
            for entry in sorted(p.iterdir()):
                if entry.is_dir() and is_dicom_series_dir(entry):
                    found.append(entry)
                elif entry.is_file() and _supported(entry):
                    found.append(entry)
            if not found:
                raise AEFlowInputError("folder holds no NIfTI, DICOM series, MetaImage, NRRD or 2D image", path=p)
            out += found
        else:
            out.append(p)
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _supported(path: Path) -> bool:
    try:
        return file_kind(path) in ("nifti", "itk", "image2d")
    except AEFlowInputError:
        return False


def check_resume(resume: bool, overwrite: bool) -> None:
    """Refuse ``resume`` (keep existing outputs) together with ``overwrite`` (replace them).

    Args:
        resume: keep the complete outputs of an earlier run.
        overwrite: replace existing outputs.

    Raises:
        AEFlowInputError: both are asked for.
    """
    if resume and overwrite:
        raise AEFlowInputError("--resume keeps existing outputs and --overwrite replaces them: give one of them")


def score_paths(
    scorer: AnomalyScorer,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    preview: bool = True,
    masks: Mapping[str, str | os.PathLike] | None = None,
    workers: int = 1,
    progress: bool = True,
    lock: bool = True,
    extra_outputs: Callable[..., Mapping[str, Path]] | None = None,
    write_threads: int | None = None,
    score_threads: int | None = None,
    resume: bool = False,
    resume_requires: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Score many inputs: decoding in worker processes, the model in this one, writing in background threads.

    A failing input (missing, corrupt, 4D, too large, irregular DICOM series, wrong channel count, existing
    outputs without ``overwrite``) is recorded and the others still complete. The output folder is locked for
    the whole call (:func:`lock_output_folder`), so that two runs cannot interleave their files; temporaries
    of an interrupted run are removed, and outputs it left incomplete (see :func:`output_state`) are redone
    without ``overwrite`` (the row's ``note`` says so).

    Args:
        scorer: the scorer.
        inputs: input files / DICOM folders (see :func:`expand_inputs`).
        out_dir: output folder.
        overwrite: replace existing outputs.
        preview: write PNG previews.
        masks: optional brain mask per input (keyed by the input path as given).
        workers: worker processes decoding and preprocessing the next inputs (a torch ``DataLoader``; 0: in
            this process). Outputs are written in background threads (at most two results waiting per thread).
        progress: show a progress bar.
        lock: lock the output folder here; pass False when the caller already holds
            :func:`lock_output_folder` for ``out_dir``.
        extra_outputs: further files per input, written with its group (``extra`` of :func:`write_outputs`, e.g.
            :func:`~monai_aeflow.inference.dicom.write_dicom_outputs`).
        write_threads: threads writing outputs (None: 1 on the CPU, where the scorer is the slower side, and
            :data:`ACCELERATOR_WRITE_THREADS` when the scorer runs on an accelerator, which outpaces one writer
            compressing ``.nii.gz`` files). The rows keep the order of ``inputs``.
        score_threads: threads running the scorer, each on its own CUDA stream (None: 1, or
            :data:`ACCELERATOR_SCORE_THREADS` when the scorer runs on CUDA). The outputs do not depend on it.
        resume: keep the complete outputs of an earlier run instead of failing on them, when they are what this
            run would write (see :func:`~monai_aeflow.inference.outputs.kept_outputs`: same model file, threshold
            and post-processing, files intact, input unchanged); their rows come from their scores JSON with
            ``resumed`` True. Incompatible with ``overwrite``.
        resume_requires: keys of ``output_files`` a kept group must hold (``("pmap",)`` with DICOM outputs).

    Returns:
        One dict per input: ``input``, ``name``, ``status`` (``"ok"`` or ``"error"``), ``error``,
        ``volume_score``, ``max_slice_score``, ``lesion_voxels``, ``lesion_volume_ml``, ``seconds``,
        ``model_seconds``, ``outputs``, ``resumed`` and, when incomplete outputs were replaced, ``note``.

    Raises:
        AEFlowInputError: two inputs share an output name, the output folder is not writable or in use, or both
            ``resume`` and ``overwrite`` are asked for.
    """
    check_resume(resume, overwrite)
    masks = dict(masks or {})
    names: dict[str, str] = {}
    for p in inputs:
        n = output_name(p)
        if n in names:
            raise AEFlowInputError(f"two inputs would write the same outputs '{n}' (also {names[n]})", path=p)
        names[n] = str(p)
    out_root = Path(out_dir)
    folder_lock = lock_output_folder(out_root) if lock else None
    try:
        return _score_locked(
            scorer,
            inputs,
            out_root,
            names,
            overwrite,
            preview,
            masks,
            workers,
            progress,
            extra_outputs,
            write_threads,
            score_threads,
            resume,
            resume_requires,
        )
    finally:
        if folder_lock is not None:
            folder_lock.release()


class _Loads(torch.utils.data.Dataset):
    """The inputs as a dataset: item ``i`` is input ``i`` checked and preprocessed, or the reason it failed
    (a message and whether it is the user's error: exceptions do not always survive the trip from a worker)."""

    def __init__(self, scorer: AnomalyScorer, inputs: Sequence[str | os.PathLike], out_root: Path, overwrite: bool,
                 masks: Mapping[str, str | os.PathLike], resume: bool = False,
                 resume_requires: Sequence[str] = ()) -> None:  # fmt: skip
        self.scorer, self.inputs, self.out_root, self.overwrite, self.masks = scorer, inputs, out_root, overwrite, masks
        self.resume, self.resume_requires = resume, tuple(resume_requires)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.inputs[i]
        start = time.perf_counter()
        item: dict[str, Any] = {"index": i, "data": None, "error": None, "user_error": False, "incomplete": False}
        item["kept"] = None
        try:
            kind = "image2d" if str(path).lower().endswith(IMAGE_2D_SUFFIXES) else "volume"
            state = output_state(output_name(path), self.out_root, kind)
            item["incomplete"] = state == "incomplete"
            if state == "complete" and self.resume and not self.overwrite:
                sc = self.scorer
                pp = sc.postprocess_config.to_dict()
                item["kept"] = kept_outputs(
                    output_name(path), self.out_root, kind, path, sc.identity["model_sha256"], sc.threshold, pp,
                    self.resume_requires,
                )  # fmt: skip
                item["load_seconds"] = time.perf_counter() - start
                return item
            if state == "complete" and not self.overwrite:
                dest = next(p for p in output_paths(output_name(path), self.out_root, kind).values() if p.exists())
                raise AEFlowInputError("output exists (use --overwrite to replace it)", path=dest)
            item["data"] = self.scorer.preprocess(path, self.masks.get(str(path)))
        except Exception as err:  # recorded per input; user errors are AEFlowInputError
            item.update(_failure(err))
        item["load_seconds"] = time.perf_counter() - start
        return item


def _failure(exc: BaseException) -> dict[str, Any]:
    """How a failed input is recorded: ``user_error`` (an :class:`AEFlowInputError`, reported as its message) and
    ``error`` (the message, prefixed with the exception type for anything else)."""
    user = isinstance(exc, AEFlowInputError)
    return {"user_error": user, "error": str(exc) if user else f"{type(exc).__name__}: {exc}"}


def _kept_row(scores: Mapping[str, Any]) -> dict[str, Any]:
    """The row of an input whose earlier outputs a resumed run keeps, from their scores JSON."""
    row = {k: scores.get(k) for k in ("volume_score", "max_slice_score", "lesion_voxels", "lesion_volume_ml")}
    timing = dict(scores.get("timing") or {})
    return {**row, "status": "ok", "resumed": True, "model_seconds": timing.get("model_seconds"),
            "outputs": dict(scores.get("outputs") or {})}  # fmt: skip


def _image_group_size(scorer: AnomalyScorer, image: torch.Tensor) -> int:
    """How many decoded 2D images share forward passes: the scorer's batch (its device's default when unset)."""
    from monai_aeflow.inference.volume import default_batch_size

    h, w = (int(v) for v in image.shape[-2:])
    return max(1, scorer.batch_size or default_batch_size(scorer.device, h, w))


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item


@contextlib.contextmanager
def _own_stream(device: torch.device, streams: threading.local) -> Iterator[None]:
    """Run the block on this thread's CUDA stream of ``device`` (a no-op elsewhere)."""
    if device.type != "cuda":
        yield
        return
    if getattr(streams, "stream", None) is None:
        streams.stream = torch.cuda.Stream(device)
    with torch.cuda.stream(streams.stream):
        yield


def _score_locked(
    scorer: AnomalyScorer,
    inputs: Sequence[str | os.PathLike],
    out_root: Path,
    names: Mapping[str, str],
    overwrite: bool,
    preview: bool,
    masks: Mapping[str, str | os.PathLike],
    workers: int,
    progress: bool,
    extra_outputs: Callable[..., Mapping[str, Path]] | None = None,
    write_threads: int | None = None,
    score_threads: int | None = None,
    resume: bool = False,
    resume_requires: Sequence[str] = (),
) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    if write_threads is None:
        write_threads = 1 if scorer.device.type == "cpu" else ACCELERATOR_WRITE_THREADS
    if score_threads is None:
        score_threads = ACCELERATOR_SCORE_THREADS if scorer.device.type == "cuda" else 1
    if score_threads < 1:
        raise ValueError(f"at least one scoring thread is needed, got {score_threads}")

    remove_leftovers(out_root, names)
    queue = list(inputs)
    loader = torch.utils.data.DataLoader(
        _Loads(scorer, queue, out_root, overwrite, masks, resume, resume_requires),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=max(0, workers),
        prefetch_factor=2 if workers > 0 else None,
    )
    bar = tqdm(total=len(queue), desc="score", unit="input", disable=not progress)
    rows: list[dict[str, Any]] = []
    bar_lock = threading.Lock()
    streams = threading.local()

    def tick() -> None:  # from this thread, the scoring and the writer threads
        with bar_lock:
            bar.update(1)
            bar.set_postfix_str(f"{sum(r['status'] == 'error' for r in rows)} failed")

    def write(row: dict[str, Any], result: ScoreResult, started: float) -> None:
        try:
            written = write_outputs(result, out_root, overwrite=overwrite, preview=preview, extra=extra_outputs)
            row.update(status="ok", outputs={k: str(v) for k, v in written.items()})
            row["timing"]["write_seconds"] = time.perf_counter() - started
        except Exception as exc:  # the input fails, nothing half-written (write_outputs stages the group)
            row.update(status="error", **_failure(exc))
        row["seconds"] += time.perf_counter() - started
        tick()

    def score_one(row: dict[str, Any], item: dict[str, Any], writer: BackgroundWriter) -> None:
        start = time.perf_counter()
        try:
            with _own_stream(scorer.device, streams):
                result = scorer.score_preprocessed(item["data"])
        except Exception as exc:  # one bad input must not stop the others
            row.update(status="error", **_failure(exc))
            row["seconds"] += time.perf_counter() - start
            tick()
            return
        hand_over(row, item, result, time.perf_counter() - start, writer)

    def score_group(group: list[tuple[dict[str, Any], dict[str, Any]]], writer: BackgroundWriter) -> None:
        """2D images of one size through shared forward passes; if that fails, each one alone (so that a bad
        image fails by itself)."""
        if len(group) == 1:
            score_one(*group[0], writer)
            return
        start = time.perf_counter()
        try:
            with _own_stream(scorer.device, streams):
                results = scorer.score_preprocessed_many([item["data"] for _, item in group])
        except Exception:
            for row, item in group:
                score_one(row, item, writer)
            return
        each = (time.perf_counter() - start) / len(group)
        for (row, item), result in zip(group, results, strict=True):
            hand_over(row, item, result, each, writer)

    def hand_over(
        row: dict[str, Any], item: dict[str, Any], result: ScoreResult, seconds: float, writer: BackgroundWriter
    ) -> None:
        s = result.scores
        row.update(
            status="writing",
            volume_score=s["volume_score"],
            max_slice_score=s["max_slice_score"],
            lesion_voxels=s["lesion_voxels"],
            lesion_volume_ml=s["lesion_volume_ml"],
            model_seconds=s["timing"]["model_seconds"],
            timing={"load_seconds": item["load_seconds"], **s["timing"]},
        )
        if item["incomplete"]:
            row["note"] = "replaced the incomplete outputs of an interrupted run"
        row["seconds"] += seconds
        writer.put(row, result, time.perf_counter())

    slots = threading.BoundedSemaphore(score_threads)  # inputs being scored at once (decoded ones wait in the loader)
    pending: list[Future] = []
    warm = False
    images: list[tuple[dict[str, Any], dict[str, Any]]] = []  # consecutive decoded 2D images, scored together
    with BackgroundWriter(write, max_pending=2 * write_threads, threads=write_threads) as writer:
        # the scoring threads end before the writer does: every result they hand over is written
        pool = ThreadPoolExecutor(score_threads, thread_name_prefix="aeflow-score") if score_threads > 1 else None

        def dispatch(group: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
            nonlocal warm
            if pool is None or not warm:  # the first input alone: compilation and autotuning happen once
                score_group(group, writer)
                warm = any(row["status"] != "error" for row, _ in group)
                return
            slots.acquire()
            future = pool.submit(score_group, group, writer)
            future.add_done_callback(lambda _: slots.release())
            pending.append(future)
            for done in [f for f in pending if f.done()]:
                pending.remove(done)
                done.result()  # a writer that stopped raises here

        def flush_images() -> None:
            if images:
                dispatch(list(images))
                images.clear()

        try:
            for item in loader:
                path = queue[item["index"]]
                row: dict[str, Any] = {"input": str(path), "name": output_name(path), "status": "error", "error": None}
                row.update(seconds=item["load_seconds"], resumed=False)
                rows.append(row)
                if item["error"] is not None:
                    row.update(error=item["error"], user_error=item["user_error"])
                    tick()
                    continue
                if item["kept"] is not None:
                    row.update(_kept_row(item["kept"]))
                    tick()
                    continue
                if item["data"]["kind"] == "image2d" and warm:
                    if images and tuple(item["data"]["image"].shape) != tuple(images[0][1]["data"]["image"].shape):
                        flush_images()
                    images.append((row, item))
                    if len(images) >= _image_group_size(scorer, item["data"]["image"]):
                        flush_images()
                    continue
                flush_images()
                dispatch([(row, item)])
            flush_images()
            for future in pending:
                future.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    return rows
