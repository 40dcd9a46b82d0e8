#!/usr/bin/env bash
# The device check: on one GPU, in under 8 minutes, the GPU-marked tests and three benchmarks, one line per figure.
#
#   benchmarks/device_check.sh              # GPU if torch sees one, else the CPU quick versions (a few minutes)
#   benchmarks/device_check.sh --cpu        # the CPU path even where a GPU is present
#   benchmarks/device_check.sh --logs DIR   # keep each part's full output in DIR (default: a temporary folder)
#
# Parts, each under its own `timeout` (seconds, GPU / CPU), run whatever happened to the ones before:
#   tests        pytest -m gpu (tests/test_devices.py: ridge cuda vs cpu, mixed precision, NCCL, BatchTransform);
#                on a CPU they are collected and skipped, with the reason              130 / 120
#   head_epoch   benchmarks/head_epoch.py: an epoch of the linear head, LightningModule vs a bare loop, the
#                loader alone and the host time per batch; on a GPU --device cuda at n=9000, 4096 features,
#                30,000 voxels (the head and its AdamW state: 1.5 GB, two checkpoints an epoch), 3 epochs,
#                2 repeats; on a CPU its --quick with 1 repeat of 2 epochs                  120 / 150
#   extract      benchmarks/extract.py --device cuda: extraction pipeline vs bare forward, host cost
#                per image (CPU: --quick)                                                   120 / 150
#   ridge        benchmarks/ridge.py --summary: our RidgeCV vs himalaya's, torch_cuda backend on a GPU,
#                torch backend on a CPU (smaller sizes)                                    100 / 120
# A script or option that is not present yet is reported as "skipped: ... not present".
# Environment: PY (python; default .venv/bin/python), DEVICE_CHECK_WORKERS (extract's loader workers, GPU: 8).
# Exit status: 0 when every part that ran passed, 1 when any failed or timed out, 2 for a bad argument.
set -u

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

force_cpu=0
logs=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) force_cpu=1 ;;
        --logs) [ $# -ge 2 ] || { echo "error: --logs needs a folder" >&2; exit 2; }; logs=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 2
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
if [ -z "$logs" ]; then
    logs=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX") || exit 2
fi
mkdir -p "$logs" || { echo "error: cannot create the log folder $logs" >&2; exit 2; }

gpu=0
if [ "$force_cpu" = 0 ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    gpu=1
fi
started=$(date +%s)
failed=()

# part NAME LIMIT FILTER COMMAND...: run COMMAND under `timeout LIMIT`, its output in $logs/NAME.log; print the
# lines matching the extended regex FILTER; a failure or a timeout is reported with the log's last lines.
part() {
    local name=$1 limit=$2 filter=$3 t0 rc lines
    shift 3
    t0=$(date +%s)
    echo "[$name] $*"
    timeout --kill-after=15 "$limit" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    lines=$(grep -E -- "$filter" "$logs/$name.log")
    [ -n "$lines" ] && printf '%s\n' "$lines" | sed "s/^ */[$name]   /"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "[$name] FAILED: timed out after ${limit}s (log: $logs/$name.log)"
        failed+=("$name")
    elif [ "$rc" != 0 ]; then
        echo "[$name] FAILED: exit status $rc (log: $logs/$name.log); its last lines:"
        tail -n 5 "$logs/$name.log" | sed "s/^/[$name]   | /"
        failed+=("$name")
    else
        [ -n "$lines" ] || echo "[$name]   (no figure lines; see $logs/$name.log)"
        echo "[$name] ok ($(( $(date +%s) - t0 )) s)"
    fi
}

skip() { echo "[$1] skipped: $2"; }

has_option() {  # has_option SCRIPT OPTION: the script exists and its --help names the option (help read once)
    local help="$logs/help_$(basename "$1").txt"
    [ -f "$1" ] || return 1
    [ -f "$help" ] || timeout 120 "$PY" "$1" --help >"$help" 2>/dev/null
    grep -q -- "$2" "$help"
}

if [ "$gpu" = 1 ]; then
    echo "device check on $("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"); logs in $logs"
else
    why="no CUDA device visible to torch"
    [ "$force_cpu" = 1 ] && why="--cpu"
    echo "device check on the CPU ($why): skipped the GPU parts — the gpu tests are collected and skipped, the" \
         "benchmarks run their CPU quick versions; logs in $logs"
fi

# 1. GPU-marked tests
part tests "$([ "$gpu" = 1 ] && echo 130 || echo 120)" \
    '^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|errors?|deselected)' \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/

# 2. head epoch
script=benchmarks/head_epoch.py
filter='s/epoch|loader alone|GPU epoch|host time per batch|threads'
if [ ! -f "$script" ]; then
    skip head_epoch "$script not present"
elif [ "$gpu" = 1 ] && has_option "$script" --device; then
    part head_epoch 120 "$filter" "$PY" "$script" --device cuda --n 9000 --features 4096 --voxels 30000 \
        --epochs 3 --repeats 2 --no-progress-bar
elif [ "$gpu" = 1 ]; then
    skip head_epoch "$script --device not present (the CPU quick version instead)"
    part head_epoch 90 "$filter" "$PY" "$script" --quick --repeats 2 --no-progress-bar
else
    part head_epoch 150 "$filter" "$PY" "$script" --quick --repeats 1 --epochs 2 --no-progress-bar
fi

# 3. feature extraction
script=benchmarks/extract.py
filter='img/s|host per image|cache write|images \('
if [ ! -f "$script" ]; then
    skip extract "$script not present"
elif ! has_option "$script" --quick; then
    skip extract "$script --device/--quick not present"
elif [ "$gpu" = 1 ] && has_option "$script" --device; then
    part extract 120 "$filter" "$PY" "$script" --device cuda --images 512 --batch 128 \
        --workers "${DEVICE_CHECK_WORKERS:-8}" --repeats 2
elif [ "$gpu" = 1 ]; then
    skip extract "$script --device not present"
else
    part extract 150 "$filter" "$PY" "$script" --quick
fi

# 4. ridge vs himalaya
script=benchmarks/ridge.py
filter='^ridge |FAILED'
if ! has_option "$script" --summary; then
    skip ridge "$script --summary not present"
elif [ "$gpu" = 1 ]; then
    part ridge 100 "$filter" "$PY" "$script" --device cuda --repeats 2 --summary
else
    part ridge 120 "$filter" "$PY" "$script" --device cpu --himalaya-backend torch --n 2000 --d 256 --voxels 4000 \
        --repeats 1 --summary
fi

took=$(( $(date +%s) - started ))
if [ ${#failed[@]} -gt 0 ]; then
    echo "device check: FAILED: ${failed[*]} (${took} s; logs in $logs)"
    exit 1
fi
echo "device check: ok (${took} s; logs in $logs)"
