"""End-of-run summary: what was trained, how it went, where the draft is."""

from __future__ import annotations

from pathlib import Path

from draftflow.train.metrics import read_metrics


def plot_curve(metrics: list[dict], out: Path, num_steps: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [m["loss"] for m in metrics])
    ax_loss.set(xlabel="step", ylabel="TTT loss (weighted sum)", title="loss")
    for k in range(num_steps):
        ax_acc.plot(steps, [m.get(f"acc_{k}", float("nan")) for m in metrics], label=f"step {k}")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy vs target argmax", title="per-step accuracy", ylim=(0, 1))
    ax_acc.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def print_summary(cfg, result, extra_lines: list[str] = ()) -> None:
    metrics = read_metrics(result.output_dir / "metrics.jsonl")
    num_steps = cfg.draft.ttt_length
    first, last = metrics[0], metrics[-1]
    png = plot_curve(metrics, result.output_dir / "training_curve.png", num_steps)
    accs = lambda m: " ".join(f"{m.get(f'acc_{k}', 0):.2f}" for k in range(num_steps))
    lines = [
        "",
        "DraftFlow run summary",
        f"  samples trained on : {result.num_samples} ({result.num_tokens} tokens)",
        f"  steps              : {last['step']} (epoch {last.get('epoch', 0):.2f})",
        f"  loss               : {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})",
        f"  acc per TTT step   : start [{accs(first)}]",
        f"                       end   [{accs(last)}]",
        *extra_lines,
        f"  draft (SGLang/vLLM): {result.final_dir}",
        f"  metrics            : {result.output_dir / 'metrics.jsonl'}",
        f"  training curve     : {png}",
    ]
    print("\n".join(lines))
