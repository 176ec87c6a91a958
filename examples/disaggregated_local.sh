#!/usr/bin/env bash
# Disaggregated DraftFlow on one machine: a producer (runs the target, writes features)
# and a consumer (trains the draft) as two separate processes that share nothing but a
# folder, then a colocated run of the same config to show both drafts are bit-identical.
#
#   examples/disaggregated_local.sh [KEY=VALUE ...]     # extra overrides go to every run
#   WORK=/some/dir examples/disaggregated_local.sh      # keep everything under /some/dir
#
# On two hosts the commands are the same; only features.root must be a folder both reach
# (see docs/disaggregated.md). Takes about two minutes on 2 CPU cores.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="$HERE/tiny.yaml"
WORK="${WORK:-$(mktemp -d -t draftflow-disagg-XXXXXX)}"
mkdir -p "$WORK"

# Producer and consumer must hold the same secret: it signs the manifest.
export DRAFTFLOW_SECRET="${DRAFTFLOW_SECRET:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}"

# One config for both roles: tiny.yaml plus these overrides. 20 steps of 4 samples cross
# an epoch of the 74 training samples, so the consumer re-reads retained features.
COMMON=(train.max_steps=20 train.progress=false train.tensorboard=false "$@")
DISAGG=(features.backend=shared_dir "features.root=$WORK/features" "train.output_dir=$WORK/consumer-run")

echo "work folder: $WORK"

# 1. The consumer starts first; it waits (features.wait_timeout_s) for the producer's manifest.
draftflow train -c "$CONFIG" --role consumer "${COMMON[@]}" "${DISAGG[@]}" >"$WORK/consumer.log" 2>&1 &
CONSUMER_PID=$!
# If this script stops early, do not leave the consumer waiting for a producer.
trap 'kill "$CONSUMER_PID" 2>/dev/null || true' EXIT
echo "consumer started (pid $CONSUMER_PID), log: $WORK/consumer.log"

# 2. The producer: prepares the data, runs the target, publishes features and signed refs.
echo "producer running, log: $WORK/producer.log"
if ! draftflow train -c "$CONFIG" --role producer "${COMMON[@]}" "${DISAGG[@]}" >"$WORK/producer.log" 2>&1; then
    echo "producer failed:" >&2
    tail -n 20 "$WORK/producer.log" >&2
    exit 1
fi
echo "producer done: $(draftflow store ls -c "$CONFIG" "${COMMON[@]}" "${DISAGG[@]}" | sed -n 2p | xargs)"

# 3. Wait for the consumer to finish training and export.
if ! wait "$CONSUMER_PID"; then
    echo "consumer failed:" >&2
    tail -n 20 "$WORK/consumer.log" >&2
    exit 1
fi
trap - EXIT
echo "consumer done; the draft (SGLang/vLLM EAGLE3 folder) is in $WORK/consumer-run/final"

# 4. The same config, colocated (one process, local store), for comparison.
echo "colocated run, log: $WORK/colocated.log"
draftflow train -c "$CONFIG" "${COMMON[@]}" "features.root=$WORK/colocated-features" \
    "train.output_dir=$WORK/colocated-run" >"$WORK/colocated.log" 2>&1

# 5. Bit-for-bit comparison of the two exported drafts.
python3 - "$WORK/consumer-run/final/model.safetensors" "$WORK/colocated-run/final/model.safetensors" <<'EOF'
import sys
import torch
from safetensors.torch import load_file

a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
if differ:
    sys.exit(f"drafts differ in {differ}")
print(f"disaggregated and colocated drafts are bit-identical ({len(a)} tensors)")
EOF
