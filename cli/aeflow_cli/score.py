"""``aeflow-cli score``: anomaly maps, lesion masks and scores for NIfTI / DICOM volumes and 2D images."""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Any

import click

from aeflow_cli.common import run_guarded

__all__ = ["score"]

DEFAULT_MAX_VOXELS = 1024**3 // 2  # monai_aeflow.data.checks.DEFAULT_MAX_VOXELS, not imported: keeps --help fast
_SUMMARY_COLUMNS = ("name", "status", "volume_score", "max_slice_score", "lesion_voxels", "lesion_volume_ml", "seconds")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary_table(rows: list[dict[str, Any]]) -> str:
    header = list(_SUMMARY_COLUMNS)
    body = [[_fmt(r.get(c)) for c in header] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def _summary_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["input", *_SUMMARY_COLUMNS, "error"], extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in writer.fieldnames})
    return buf.getvalue()


def _run(
    paths: tuple[str, ...],
    model: str,
    out: Path,
    device: str,
    batch_size: int | None,
    threshold: float | None,
    mask: Path | None,
    overwrite: bool,
    workers: int | None,
    preview: bool,
    quiet: bool,
    max_voxels: int,
    accept_irregular_series: bool,
    dicom_out: bool = False,
    amp_dtype: str | None = None,
    distributed: bool | None = None,
    compile_network: bool = False,
    score_threads: int | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    from monai_aeflow.data.io import file_kind
    from monai_aeflow.errors import AEFlowInputError
    from monai_aeflow.fileio import atomic_write_text
    from monai_aeflow.inference.batch import check_resume, expand_inputs, score_paths
    from monai_aeflow.inference.distributed import agree, finish, gather_rows, init_sharding, shard
    from monai_aeflow.inference.outputs import lock_output_folder, remove_leftovers
    from monai_aeflow.inference.scorer import AnomalyScorer

    check_resume(resume, overwrite)  # before the output folder is locked
    inputs = expand_inputs(paths)
    if mask is not None and len(inputs) != 1:
        raise AEFlowInputError(f"--mask applies to one input, but {len(inputs)} inputs were given")
    extra_outputs = None
    if dicom_out:
        for path in inputs:
            if file_kind(path) != "dicom":
                raise AEFlowInputError(
                    "is not a DICOM series folder (--dicom-out needs DICOM series inputs)", path=path
                )
        from monai_aeflow.inference.dicom import require_highdicom, write_dicom_outputs

        require_highdicom()
        extra_outputs = write_dicom_outputs
    ctx = init_sharding(device, distributed)  # torchrun: this rank's device and every world_size-th input
    held = []

    def claim() -> None:  # rank 0: the output folder first, created, writable and ours before the model loads
        held.append(lock_output_folder(out))
        summary = out / "summary.csv"
        if len(inputs) > 1 and not (overwrite or resume) and summary.exists():
            raise AEFlowInputError("output exists (use --overwrite to replace it)", path=summary)

    try:
        agree(ctx, claim)
        scorer = AnomalyScorer(
            model,
            device=ctx.device,
            batch_size=batch_size,
            threshold=threshold,
            max_voxels=max_voxels,
            accept_irregular_series=accept_irregular_series,
            amp_dtype=amp_dtype,
            compile=compile_network,
        )
        if workers is None:  # an accelerator outpaces one decoding process
            workers = 1 if scorer.device.type == "cpu" else min(8, max(2, (os.cpu_count() or 2) // 2))
        if not quiet and ctx.rank == 0:
            source = "" if scorer.threshold_source is None else f" from {scorer.threshold_source}"
            click.echo(
                f"model {scorer.model_path} ({scorer.model_name}, threshold {_fmt(scorer.threshold)}{source})"
                f" on {scorer.device}; {len(inputs)} input(s) -> {out}"
                + (f" over {ctx.world_size} ranks" if ctx.distributed else ""),
                err=True,
            )
            if scorer.threshold is None:
                click.echo("no threshold stored in the model or given: lesion masks are not written", err=True)
        masks = {str(inputs[0]): str(mask)} if mask is not None else None
        rows = score_paths(
            scorer,
            shard(inputs, ctx),
            out,
            overwrite=overwrite,
            preview=preview,
            masks=masks,
            workers=workers,
            progress=not quiet and ctx.rank == 0,
            lock=False,
            extra_outputs=extra_outputs,
            score_threads=score_threads,
            resume=resume,
            resume_requires=("pmap",) if dicom_out else (),
        )
        rows = gather_rows(rows, ctx, inputs)
        if len(rows) > 1 and ctx.rank == 0:
            remove_leftovers(out, (), ("summary.csv",))
            atomic_write_text(out / "summary.csv", _summary_csv(rows))
        return rows
    finally:
        finish(ctx)
        for lock in held:
            lock.release()


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--model", "-m", required=True, help="Trained model file (.pt) or bundle folder (uses models/model.pt).")
@click.option(
    "--out",
    "-o",
    default="aeflow_scores",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(1),
    help="Slices per forward pass (default: 32 on CUDA, about 262k pixels per batch on CPU).",
)
@click.option("--threshold", type=float, default=None, help="Binarisation threshold (default: the model's).")
@click.option(
    "--mask",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Brain mask of the (single) input; default: from nonzero voxels.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (per-input files and summary.csv).")
@click.option(
    "--resume",
    is_flag=True,
    help="Go on with an interrupted or extended run: keep each input's complete outputs when they were written with "
    "this model file, threshold and post-processing (and the input is unchanged since), score the others, and "
    "write summary.csv of all inputs; outputs that differ are errors (use --overwrite for those).",
)
@click.option(
    "--workers",
    type=click.IntRange(0),
    default=None,
    help="Processes decoding the next inputs while the model runs (0: in this process; default 1 on the CPU, "
    "half the CPU cores (2 to 8) on CUDA).",
)
@click.option(
    "--score-threads",
    type=click.IntRange(1),
    default=None,
    help="Threads running the model on consecutive inputs, each on its own CUDA stream (default 1 on the CPU, 2 "
    "on CUDA); the outputs do not depend on it.",
)
@click.option("--no-preview", is_flag=True, help="Do not write the PNG previews.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary table.")
@click.option(
    "--max-voxels",
    type=click.IntRange(1),
    default=DEFAULT_MAX_VOXELS,
    show_default=True,
    help="Refuse an input whose header implies more voxels (times channels), before loading it.",
)
@click.option(
    "--accept-irregular-series",
    is_flag=True,
    help="Score a DICOM series with unreadable slice files or non-uniform slice spacing as loaded (readable "
    "slices at one spacing) instead of refusing it; NAME_scores.json records the problems (irregular_series).",
)
@click.option(
    "--dicom-out",
    is_flag=True,
    help="Also write NAME_seg.dcm (the lesion mask as DICOM SEG) and NAME_pmap.dcm (the anomaly map as a DICOM "
    "Parametric Map), referencing the source series; DICOM series inputs only (needs highdicom: the dicom extra).",
)
@click.option(
    "--amp-dtype",
    type=click.Choice(["bfloat16", "float16", "none"]),
    default=None,
    help="Autocast precision of the network (default: bfloat16 on CUDA, none on CPU). Flow densities, "
    "log-determinants and SSIM are float32 whatever it is.",
)
@click.option(
    "--distributed",
    is_flag=True,
    default=None,
    help="Shard the inputs across the processes of a torchrun launch (on by default under torchrun): "
    "torchrun --nproc_per_node N -m aeflow_cli score ...; rank 0 writes summary.csv.",
)
@click.option(
    "--compile",
    "compile_network",
    is_flag=True,
    help="torch.compile the network (fused kernels; the first batches of each shape wait for compilation, so it "
    "pays off over many inputs).",
)
def score(
    paths: tuple[str, ...],
    model: str,
    out: Path,
    device: str,
    batch_size: int | None,
    threshold: float | None,
    mask: Path | None,
    overwrite: bool,
    workers: int | None,
    no_preview: bool,
    quiet: bool,
    max_voxels: int,
    accept_irregular_series: bool,
    dicom_out: bool,
    amp_dtype: str | None,
    distributed: bool | None,
    compile_network: bool,
    score_threads: int | None,
    resume: bool,
) -> None:
    """Score volumes and images: anomaly map, lesion mask, scores JSON and preview per input.

    PATHS are NIfTI files, DICOM series folders, MetaImage/NRRD files, 2D images (PNG, JPEG, TIFF), folders
    of them, or glob patterns. For each input NAME, the output folder gets NAME_anomaly.nii.gz (float32, the
    input's shape and affine), NAME_mask.nii.gz (the post-processed lesion mask at the threshold),
    NAME_scores.json and NAME_preview.png (2D inputs: NAME_anomaly.tif and NAME_mask.png). With several
    inputs a summary.csv is written too. The exit code is 2 if any input failed; the others still complete.

    The output folder is checked (created, writable, not in use by another score run: it is locked) and an
    existing summary.csv refused without --overwrite (or --resume) before the model is loaded. Each input's files
    are written as a group, NAME_scores.json last: files that a killed run left without their scores JSON are
    redone without --overwrite. --resume goes on with a killed or extended run: complete outputs written with
    the same model file, threshold and post-processing are kept (their rows in summary.csv come from their
    scores JSON), the other inputs are scored. An input whose header implies more than --max-voxels voxels, and a DICOM
    series with unreadable slice files or non-uniform slice spacing (unless --accept-irregular-series), fail
    before loading.
    """
    rows = run_guarded(
        _run, paths, model, out, device, batch_size, threshold, mask, overwrite, workers, not no_preview, quiet,
        max_voxels, accept_irregular_series, dicom_out, amp_dtype, distributed or None, compile_network, score_threads,
        resume,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) > 0:  # rank 0 reports the whole run and exits with its code
        return
    failed = [r for r in rows if r["status"] != "ok"]
    if not quiet and len(rows) > 1:
        click.echo(_summary_table(rows))
    if not quiet and len(rows) == 1 and not failed:
        r = rows[0]
        click.echo(
            f"{r['name']}: volume score {_fmt(r['volume_score'])}, max slice score {_fmt(r['max_slice_score'])}, "
            f"lesion voxels {_fmt(r['lesion_voxels'])} -> {out}"
        )
    for r in rows:
        if r.get("note"):
            click.echo(f"{r['name']}: {r['note']}", err=True)
    kept = sum(bool(r.get("resumed")) for r in rows)
    if kept and not quiet:
        click.echo(f"{kept} of {len(rows)} inputs kept their outputs from an earlier run (--resume)", err=True)
    for r in failed:
        click.echo(f"Error: {r['error']}", err=True)
    if failed:
        if len(rows) > 1:
            click.echo(f"{len(failed)} of {len(rows)} inputs failed", err=True)
        sys.exit(2 if all(r.get("user_error") for r in failed) else 1)
