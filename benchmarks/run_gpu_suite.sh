#!/usr/bin/env bash
# The GPU benchmarks of issue #6 in one command, on one 4-GPU host (4x H100 80GB or 4x H200;
# on fewer GPUs the larger scaling runs are skipped, the disaggregated part needs 2):
#
#   PYTHONPATH=$PWD benchmarks/run_gpu_suite.sh OUT_DIR          # from the repository root
#   benchmarks/run_gpu_suite.sh OUT_DIR --small                  # CPU smoke test of the whole suite
#
# In order (the cheapest first), each under its own time limit, going on to the next when one fails:
#   3b  scaleN.json    torchrun --nproc_per_node N bench_train_gpu.py --seqs 8192, N = 1, 2, 4
#                      (FSDP2, train.compile auto = on), started as `python3 -m torch.distributed.run`
#   3d  capture.json   bench_capture_gpu.py on GPU 0: capture vs plain forward of a random 8B-shaped target
#   3c  disagg.json    bench_disagg_gpu.py: producer on GPU 0 + consumer on GPU 1 (two processes,
#                      shared folder), then the colocated training step on the same features on GPU 1
# Everything printed goes to OUT_DIR/suite.log, which ends with a compact summary; OUT_DIR holds
# 6 files in all (suite.log and 5 JSON). Scratch data (up to ~55 GB: features, checkpoints) goes
# to $WORK (default: a new folder under /tmp), removed at the end.
#
# Budget: 7.5 minutes on 4x H200 with eager training (2026-11-26); 15 minutes at most (SUITE_BUDGET_S, default 900 s;
# a part gets at most its own limit and what is left of the budget, and is skipped with < 30 s left):
#   3b   ~55 s each eager, ~90 s compiled (limit 150 s): start-up, CPU init of the draft and compilation
#                                dominate; 2 warm-up + 5 steps at 8k
#   3d   ~1 min   (limit 150 s): 8B init on the GPU, 4 passes over 96 x 2048 tokens, 6 GiB written
#   3c   ~3.5 min (limit 420 s): three CPU builds of the random 8B target in parallel (~2 min on a
#                                core like the dev VM's), capture + 80 training steps, the reference's
#                                80 steps, 2 checkpoints and exports
set -uo pipefail  # no -e: a failed part is recorded and the suite goes on

OUT=${1:?usage: benchmarks/run_gpu_suite.sh OUT_DIR [--small]}
SMALL=${2:-}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK=${WORK:-$(mktemp -d -t draftflow-gpu-suite-XXXXXX)}
mkdir -p "$WORK"
LOG="$OUT/suite.log"
BUDGET=${SUITE_BUDGET_S:-900}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast stays off (see bench_train_gpu.py and the host's rules).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
trap 'rm -rf "$WORK"' EXIT

STATUS=()
START=$SECONDS

# run_part NAME LIMIT_S COMMAND...: run under min(LIMIT_S, budget left), output into the log.
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    ((left < limit)) && limit=$left
    if ((limit < 30)); then
        echo "=== $name: skipped, ${left} s of the budget left" | tee -a "$LOG"
        STATUS+=("$name: skipped (budget)")
        return
    fi
    echo "=== $name (limit ${limit} s, $((SECONDS - START)) s into the suite): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local what="ok"
    ((rc == 124 || rc == 137)) && what="TIMED OUT"
    ((rc != 0 && rc != 124 && rc != 137)) && what="FAILED"
    echo "=== $name: $what (exit $rc) after $((SECONDS - t0)) s" | tee -a "$LOG"
    STATUS+=("$name: $what (exit $rc, $((SECONDS - t0)) s)")
}

{
    echo "suite start $(date -u +%FT%TZ), budget ${BUDGET} s, work $WORK, out $OUT"
    nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    df -h "$WORK" | tail -n 1
} 2>&1 | tee -a "$LOG"

PY=(python3)
SCALE_ARGS=(--seqs 8192 --warmup 2 --steps 5)
[[ -n "$SMALL" ]] && SCALE_ARGS=(--small --seqs 64 --warmup 1 --steps 2)
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
for n in 1 2 4; do
    if [[ -z "$SMALL" ]] && ((n > NGPU)); then
        echo "=== 3b scaling x$n: skipped, $NGPU GPU(s) here" | tee -a "$LOG"
        STATUS+=("3b scaling x$n: skipped ($NGPU GPUs)")
        continue
    fi
    run_part "3b scaling x$n" 150 "${PY[@]}" -m torch.distributed.run --standalone --nproc_per_node "$n" \
        "$HERE/bench_train_gpu.py" \
        "${SCALE_ARGS[@]}" --out "$OUT/scale$n.json"
done
run_part "3d capture" 150 "${PY[@]}" "$HERE/bench_capture_gpu.py" $SMALL --work "$WORK" --out "$OUT/capture.json"
run_part "3c disaggregated" 420 "${PY[@]}" "$HERE/bench_disagg_gpu.py" $SMALL --work "$WORK" --out "$OUT/disagg.json"

echo "=== summary ($((SECONDS - START)) s)" | tee -a "$LOG"
printf '%s\n' "${STATUS[@]}" | tee -a "$LOG"
python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
nan = float("nan")


def show(name, fmt):
    """Print one part's line from its JSON; a missing file or a partial result says so."""
    p = out / name
    if not p.exists():
        return print(f"{name}: missing")
    r = json.loads(p.read_text())
    try:
        print(fmt(r))
    except (KeyError, IndexError, TypeError) as e:
        print(f"{name}: incomplete ({type(e).__name__}: {e})")
    if r.get("error"):
        print(f"{name}: error: {r['error'][:300]}")
    return r


show("capture.json", lambda c: (
    f"3d capture: plain {c['plain']['tokens_per_s']:.0f} tok/s; capture {c['capture']['tokens_per_s']:.0f} "
    f"({c['capture']['vs_plain']:.2f}x); + store {c['capture_store']['tokens_per_s']:.0f} "
    f"({c['capture_store']['vs_plain']:.2f}x); disk write+fsync {c['disk']['write_fsync_gbps']:.2f} GB/s; "
    f"profile {', '.join(f'{k[:-2]} {v:.0%}' for k, v in c['profile']['shares'].items())}"))
show("disagg.json", lambda d: (
    f"3c disagg ({d['mode']}): consumer {d['consumer']['median_step_s']:.4f} s/step vs reference "
    f"{d['reference']['median_step_s']:.4f} -> {d['comparison']['step_ratio']:.3f}x; data wait "
    f"{d['consumer']['data_wait_share_all']:.2%} (after the first step's {d['consumer']['first_step_wait_s']:.2f} s "
    f"{d['consumer']['data_wait_share_after_first']:.2%}, steady {d['consumer']['data_wait_share_steady']:.2%}); "
    f"producer {d['pair']['producer_tokens_per_s'] or nan:.0f} tok/s; "
    f"{d['pair']['consumer_steps_while_producer_published']}/{d['consumer']['num_steps']} steps overlapped"))
scale = {}
for n in (1, 2, 4):
    r = show(f"scale{n}.json", lambda s: "\n".join(
        f"3b x{s['world_size']} seq {r['seq']}: " + (r["error"] if "error" in r else
        f"{r['tokens_per_s']:.0f} tok/s, {r['tokens_per_s_per_gpu']:.0f}/GPU, MFU {r.get('mfu', nan):.1%}, "
        f"peak {r['peak_gib']:.1f} GiB") for r in s["runs"]))
    if r and r.get("runs") and "tokens_per_s" in r["runs"][0]:
        scale[n] = r["runs"][0]["tokens_per_s"]
for n in (2, 4):
    if 1 in scale and n in scale:
        print(f"3b scaling 1->{n}: {scale[n] / (n * scale[1]):.1%} of linear")
EOF
