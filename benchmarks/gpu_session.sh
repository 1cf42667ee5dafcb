#!/usr/bin/env bash
# The one prepared script for a session that is lent the H200 (issue 22): whole-loop images/s of
# ours vs the official DETR loop, and the GPU preset's stages, in one device call of ~8 minutes.
#
# The device machine has PyTorch 2.11 (CUDA 13), torchvision, scipy, PIL, yaml, tqdm, matplotlib,
# psutil, nvidia-ml-py (see /work/.library/device/KINDS.md) but not pycocotools, nor any network.
# So, in the session's own checkout (the folder the run tool sends), once:
#
#   1. the tool call   fetch github:facebookresearch/detr     (-> /work/.mirror/facebookresearch+detr/repo)
#   2. the shell      bash benchmarks/gpu_session.sh prepare /work/.mirror/facebookresearch+detr/repo
#      -> .official/ (the official code, git archive) and .whl/ (the pycocotools wheel for the
#         device's Python 3.12), both listed in .git/info/exclude, never committed
#   3. the tool call   run  command="bash benchmarks/gpu_session.sh device"
#                           carry=[".official", ".whl"]  timeout_s=570
#      (device time: ~1-2 min machine start + ~8 min here; leaves a rerun of parts, e.g.
#       GPU_SESSION_PARTS="loop_big compile" bash benchmarks/gpu_session.sh device)
#   4. the tool call   give_back   (unless rerunning at once)
#
# Results: $OUT/session.log (everything), $OUT/loop_b2.json, loop_big.json, loop_syncs.json,
# loop_compile.json (benchmarks/train_loop.py rows), $OUT/pipeline.json (benchmarks/pipeline_time.py),
# $OUT/parts.tsv (each part's seconds and exit code); the tables are printed again at the end.
# Each part runs under `timeout`; one that would start with < 30 s of the budget left is skipped.
# Try it here on the CPU: GPU_SESSION_DEVICE=cpu GPU_SESSION_PRESET=tiny OUT=/tmp/o \
#   bash benchmarks/gpu_session.sh device
set -u
cd "$(dirname "$0")/.."

prepare() {
    local mirror=${1:?usage: gpu_session.sh prepare /work/.mirror/facebookresearch+detr/repo}
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    rm -rf .official && mkdir -p .official .whl
    git --git-dir="$mirror" archive HEAD | tar -x -C .official
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11
    [[ -s $exclude && -n $(tail -c1 "$exclude") ]] && echo >>"$exclude"  # end the last line
    for path in /.official/ /.whl/; do
        grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
    done
    du -sh .official .whl
    git status --short | grep -E '\.official|\.whl' && echo "WARNING: not ignored" || true
}

OUT=${OUT:-$PWD/gpu_session_out}
BUDGET=${GPU_SESSION_BUDGET:-480}   # seconds for all parts; the run call's limit is 600
DEVICE=${GPU_SESSION_DEVICE:-cuda}
PRESET=${GPU_SESSION_PRESET:-paper}
PARTS=${GPU_SESSION_PARTS:-"env loop_b2 loop_big pipeline syncs compile"}
START=$(date +%s)
LOG=$OUT/session.log

part() {  # part NAME CAP_SECONDS COMMAND...: run it under timeout, logged, unless time is short
    local name=$1 cap=$2 left rc t0
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 30)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
        printf '%s\tskipped\t0\n' "$name" >>"$OUT/parts.tsv"
        return 0
    fi
    ((cap > left)) && cap=$left
    echo "== $name (cap ${cap}s, ${left}s left): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" | tee -a "$OUT/parts.tsv"
}

device() {
    mkdir -p "$OUT"
    : >"$LOG"
    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
    if ! python3 -c "import pycocotools" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "no pycocotools: carry .whl"; exit 1; }
        export PYTHONPATH=$PWD:/tmp/site
    fi
    local official=() loop=(python3 benchmarks/train_loop.py --device "$DEVICE"
                             --preset "$PRESET" --data /tmp/gpu_session_data)
    if [[ -f .official/main.py ]]; then
        official=(--official .official)
    else
        echo "no .official/: official rows skipped (see the top of this script)" | tee -a "$LOG"
    fi
    part env 60 bash -c 'nvidia-smi; nproc; free -g; python3 -c "import torch, torchvision;
print(torch.__version__, torchvision.__version__, torch.version.cuda,
      torch.cuda.is_available() and torch.cuda.get_device_name())"'
    # The acceptance rows: the official loop at its defaults (batch 2, fp32) against ours.
    part loop_b2 120 "${loop[@]}" "${official[@]}" --batch-size 2 --precision fp32,bf16 \
        --steps 20 --warmup 5 --json "$OUT/loop_b2.json"
    # Equal larger batches: the official loop (fp32, its only precision) against ours.
    part loop_big 170 "${loop[@]}" "${official[@]}" --batch-size 8,16 --precision fp32,bf16 \
        --steps 10 --warmup 3 --json "$OUT/loop_big.json"
    local pipe=(python3 benchmarks/pipeline_time.py --workers 12 --json "$OUT/pipeline.json")
    if [[ $PRESET == tiny ]]; then
        pipe+=(--params params.yaml --epochs 1 --num-train 16 --num-val 8)
    else
        pipe+=(--params configs/gpu_demo.yaml --epochs 2 --num-train 960 --num-val 100)
    fi
    part pipeline 150 "${pipe[@]}"
    # Host-device syncs per step of ours, and the lines that cause them (issue 22, item 2).
    part syncs 90 "${loop[@]}" --batch-size 16 --precision bf16 --steps 3 --warmup 2 \
        --sync-debug --json "$OUT/loop_syncs.json"
    # Last, as the riskiest: torch.compile (dynamic shapes) of our model at batch 16, bf16.
    part compile 200 "${loop[@]}" --batch-size 16 --precision bf16 --compile --steps 10 \
        --warmup 5 --json "$OUT/loop_compile.json"
    echo "== tables (total $(($(date +%s) - START)) s)"
    grep -h -E '^  ((ours|official) .* img/s|syncs per step)' "$LOG" || true  # rows as they ended
    grep -h -A12 '^row ' "$LOG" | grep -v '^(x off' || true
    grep -h -E '"(train_img_s|AP|AP50|prepare|train|evaluate)"' "$OUT/pipeline.json" 2>/dev/null
    cat "$OUT/parts.tsv"
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    device) device ;;
    *) echo "usage: $0 prepare MIRROR_GIT_DIR | device   (see the top of this file)" >&2; exit 2 ;;
esac
