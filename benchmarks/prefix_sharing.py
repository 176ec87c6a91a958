"""Would storing shared prefixes once pay? (issue 15, item 4)

A sample's features at position t depend only on its tokens 0..t (the target is
causal), so samples that begin with the same tokens have the same features there
(up to the padding-length rounding capture.padded_lengths describes). A
content-addressed store could keep each distinct prefix once. This script measures
what that would save on real prepared data, before anyone builds it: the training
samples of a config are sorted by their token ids, and the tokens a prefix trie of
them holds (every sample's length less its longest common prefix with its sorted
predecessor) are the tokens such a store would keep.

    python benchmarks/prefix_sharing.py -c draftflow/configs/demo.yaml data.max_samples=2000 \
        data.max_length=2048 --out prefix_sharing.json

Prints and writes: samples, tokens, the tokens a prefix-sharing store would keep, the
share saved, and the longest and the median shared prefix (the chat template's system
prompt is what most samples share).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from draftflow.config import load_config  # noqa: E402
from draftflow.data.prepare import prepare_dataset  # noqa: E402
from draftflow.roles import target_tokenizer  # noqa: E402


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_sharing(sequences: list[list[int]]) -> dict:
    """Tokens stored as is, and as a prefix trie (each distinct prefix once)."""
    ordered = sorted(sequences)
    shared = [0] + [common_prefix(a, b) for a, b in zip(ordered, ordered[1:])]
    total = sum(len(s) for s in ordered)
    kept = total - sum(shared)
    return {"samples": len(ordered), "tokens": total, "tokens_kept_with_sharing": kept,
            "share_saved": 1 - kept / total if total else 0.0, "longest_shared_prefix": max(shared),
            "median_shared_prefix": statistics.median(shared)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", action="append", required=True)
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    prepared = prepare_dataset(cfg.data, target_tokenizer(cfg))
    r = prefix_sharing([s.input_ids.tolist() for s in prepared.train])
    r["config"] = {"sources": cfg.data.sources, "max_length": cfg.data.max_length,
                   "max_samples": cfg.data.max_samples, "target": cfg.target.path}
    print(f"{r['samples']} samples, {r['tokens']} tokens; a prefix-sharing store keeps {r['tokens_kept_with_sharing']} "
          f"({r['share_saved']:.1%} saved); shared prefix: median {r['median_shared_prefix']}, "
          f"longest {r['longest_shared_prefix']} tokens")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
