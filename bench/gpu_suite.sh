#!/usr/bin/env bash
# The GPU suite: every GPU check and benchmark of the project in one call, one table at the end.
#
# On one H100 it runs, each step under its own time limit (a failed or slow step becomes a row
# saying so, and the table still prints), in at most BUDGET_S seconds (default 470, ~8 minutes):
#   pytest    pytest -m gpu (tests/test_gpu.py: fast paths on the GPU agree with fp32/CPU)
#   stage1    bench/masks_throughput.py: SAM vit_h (random weights), the reference way
#             (Sam.__call__, fp32, segment_anything's attention) vs ours fp32 / bf16 /
#             bf16 + SDPA attention / + torch.compile, and each variant's masks vs the reference's
#   stage2    bench/embeds_throughput.py: maxvit_rmlp_pico_rw_256 (random weights) vs the reference loop
#   stage3    bench/train_throughput.py: config_IMAGENETTE model step vs the reference maths, +- compile
#   e2e       bench/end_to_end.py: stages 1-3 through their CLIs on 200 generated 64 px toy images
#   sam2      bench/masks_throughput.py: SAM 2.1 Hiera-L (random weights), SAM2ImagePredictor one image at a
#             time vs ours fp32 / bf16, and the masks vs the predictor's (last: it gets what the budget leaves)
# Every figure is printed beside its baseline measured in the same run, with the device and the
# torch version. Logs and the table go to --out (default runs/gpu_suite/): table.md, logs.tar.gz.
#
# How to run it on a lent GPU machine (the device tool; it has Python 3.12 with torch, timm,
# Lightning, absl, pytest, but not segment_anything nor sam2, and no network):
#   1. here, once (the wheels are git-ignored, so they must be carried; all are pure Python, ~0.7 MB):
#        SAM2_BUILD_CUDA=0 python -m pip wheel segment-anything==1.0 sam2==1.1.0 hydra-core==1.3.8 omegaconf==2.3.1 \
#            iopath==0.1.10 antlr4-python3-runtime==4.9.3 portalocker==4.4.2 --no-deps -w .whl/
#   2. the device call:
#        run(command="bash bench/gpu_suite.sh --out $OUT", carry=[".whl"], timeout_s=560)
#      The script installs the wheels of .whl/ (into a temporary folder on PYTHONPATH) when
#      segment_anything or sam2 is missing. $OUT comes back with table.md and logs.tar.gz.
# CPU dry run (tiny models, 20 images; 1.5-2.5 minutes on 2 cores shared with other jobs, about 85 s of CPU
# time; tests/test_gpu_suite.py runs it and checks every row has a figure):
#        bash bench/gpu_suite.sh --dry_run
#
# Options: --dry_run, --out DIR, --budget SECONDS (default 470; 900 for the dry run).
# Environment: PYTHON (default python3).

set -uo pipefail  # no -e: a failing step must not stop the suite
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT_DIR=runs/gpu_suite
BUDGET_S=""
while (($#)); do
    case $1 in
        --dry_run) DRY_RUN=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --out=*) OUT_DIR=${1#--out=} ;;
        --budget) BUDGET_S=$2; shift ;;
        --budget=*) BUDGET_S=${1#--budget=} ;;
        *) echo "error: unknown option $1 (use --dry_run, --out DIR, --budget SECONDS)" >&2; exit 2 ;;
    esac
    shift
done

# the real suite must fit 8 minutes of a lent machine; the dry run checks that every row still prints, however
# slow a shared CPU is today
BUDGET_S=${BUDGET_S:-$((DRY_RUN ? 900 : 470))}
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
START=$(date +%s)
export PYTHONUNBUFFERED=1
# the project itself: installed here by `pipenv sync`, not on the lent machines (no network to build it): import it from src/
if ! "$PY" -c "import partwhole" 2>/dev/null; then export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
: >"$WORK/expected.tsv"

# segment_anything and sam2 are not on the lent machines: install the carried wheels where one is missing
if ! "$PY" -c "import segment_anything, sam2" 2>/dev/null; then
    wheels=(.whl/*.whl)
    if [[ -f ${wheels[0]} ]]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "${wheels[@]}" \
            && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "warning: segment_anything or sam2 is missing and .whl/ holds no wheels; build them here (see the" \
            "header of this script) and carry .whl: the stage 1 / sam2 rows will fail"
    fi
fi

if ((DRY_RUN)); then
    DEVICE=cpu
    export CUDA_VISIBLE_DEVICES=""
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    DEVICE=cuda
fi

# expect STEP KEY DESCRIPTION: a row the table must show (with a figure, or with why there is none)
expect() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$WORK/expected.tsv"; }

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in NAME.log, under LIMIT_S seconds or
# what is left of the budget, whichever is less; NAME.status says how it ended
step() {
    local name=$1 limit=$2
    shift 2
    ((DRY_RUN)) && limit=$((limit * 3))  # step limits are sized for the GPU; a shared CPU may be several times slower
    local left=$((BUDGET_S - ($(date +%s) - START)))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "skipped (suite budget of ${BUDGET_S} s spent)" >"$WORK/$name.status"
        echo "=== $name: skipped, the budget is spent"
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0))
    case $rc in
        0) echo "ok in ${took} s" ;;
        124 | 137) echo "timed out at ${limit} s" ;;
        *) echo "failed (exit $rc) after ${took} s" ;;
    esac >"$WORK/$name.status"
    tail -n 12 "$WORK/$name.log"
    echo "--- $name: $(cat "$WORK/$name.status")"
}

"$PY" - >"$WORK/header.txt" 2>&1 <<EOF
import platform, torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and "$DEVICE" == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
print(f"GPU suite{' (DRY RUN: CPU, tiny models; the figures mean nothing)' if $DRY_RUN else ''}: device {device}; "
      f"torch {torch.__version__}; CUDA {torch.version.cuda}; python {platform.python_version()}")
EOF
cat "$WORK/header.txt"

# ----------------------------------------------------------------------------- pytest -m gpu
expect pytest gpu_tests "pytest -m gpu"
step pytest 100 env CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-0}" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$WORK/pytest.xml" tests/
"$PY" bench/suite_table.py --junit "$WORK/pytest.xml" --key gpu_tests >>"$WORK/pytest.jsonl" 2>>"$WORK/pytest.log"

# ----------------------------------------------------------------------------- stage 1
VARIANTS=(fp32:reference fp32:sdpa bf16:reference bf16:sdpa bf16:sdpa:compile)
for v in "${VARIANTS[@]}"; do expect stage1 "$v" "stage 1 masks, ours $v"; done
if ((DRY_RUN)); then
    STAGE1=(--device cpu --model_type vit_tiny --num_images 2 --warmup 1 --batch_size 2 --reference_batch 2 --compile_backend eager
        --model_only)
else
    STAGE1=(--device cuda --model_type vit_h --num_images 48 --warmup 8 --batch_size 8 --reference_batch 5 --model_only)
fi
step stage1 200 "$PY" bench/masks_throughput.py "${STAGE1[@]}" "${VARIANTS[@]/#/--ours=}" --summary_json "$WORK/stage1.jsonl"

# ----------------------------------------------------------------------------- stage 2
if ((DRY_RUN)); then
    STAGE2=(--device cpu --model test_vit --images 1 --grid 2 --batch_size 8)
    FAST=(fast:bf16:8 fast:fp32:8)
else
    STAGE2=(--device cuda --model maxvit_rmlp_pico_rw_256 --images 2 --grid 14 --batch_size 256)
    FAST=(fast:bf16:256 fast:fp32:256)
fi
for key in "${FAST[@]}"; do expect stage2 "$key" "stage 2 masked images, ours ${key#fast:}"; done
step stage2 75 "$PY" bench/embeds_throughput.py "${STAGE2[@]}" --precision bf16 --also_fp32 --rounds 1 \
    --summary_json "$WORK/stage2.jsonl"

# ----------------------------------------------------------------------------- stage 3
for key in fp32 default compile; do expect stage3 "$key" "stage 3 training step, ours $key"; done
if ((DRY_RUN)); then
    STAGE3=(--device cpu --tiny --batch_size 4 --warmup 1 --iters 1 --compile --compile_backend eager)
else
    STAGE3=(--device cuda --batch_size 128 --warmup 3 --iters 10 --compile)
fi
step stage3 90 "$PY" bench/train_throughput.py "${STAGE3[@]}" --summary_json "$WORK/stage3.jsonl"

# ----------------------------------------------------------------------------- end to end
for key in data stage1 stage2 stage3 total; do expect e2e "$key" "end to end: $key"; done
if ((DRY_RUN)); then
    E2E=(--device cpu --sam_model_type vit_tiny --encoder test_vit --train_per_class 1 --val_per_class 1 --num_workers 0)
else
    E2E=(--device cuda --sam_model_type vit_h --train_per_class 15 --val_per_class 5)
fi
step e2e 100 "$PY" bench/end_to_end.py "${E2E[@]}" --summary_json "$WORK/e2e.jsonl"

# ----------------------------------------------------------------------------- SAM 2.1 (stage 1 with the other teacher)
SAM2_VARIANTS=(fp32:sdpa bf16:sdpa)
for v in "${SAM2_VARIANTS[@]}"; do expect sam2 "$v" "stage 1 SAM 2.1 masks, ours ${v%:sdpa}"; done
if ((DRY_RUN)); then
    SAM2=(--device cpu --model_type sam2.1_hiera_test --num_images 2 --warmup 1 --batch_size 2 --model_only)
else
    SAM2=(--device cuda --model_type sam2.1_hiera_large --num_images 24 --warmup 4 --batch_size 8 --model_only)
fi
step sam2 90 "$PY" bench/masks_throughput.py "${SAM2[@]}" "${SAM2_VARIANTS[@]/#/--ours=}" --summary_json "$WORK/sam2.jsonl"

# ----------------------------------------------------------------------------- the table
echo
"$PY" bench/suite_table.py "$WORK" | tee "$WORK/table.md"
echo
echo "suite wall time: $(($(date +%s) - START)) s (budget ${BUDGET_S} s); logs: $WORK"
mkdir -p "$OUT_DIR" && cp "$WORK/table.md" "$OUT_DIR/table.md" \
    && tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" --exclude=site . && echo "table and logs: $OUT_DIR/{table.md,logs.tar.gz}"
