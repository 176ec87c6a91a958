"""Training metrics: metrics.jsonl (one object per logged step), TensorBoard, progress."""

from __future__ import annotations

import json
from pathlib import Path


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop a JSONL log's lines of steps after the checkpoint, so the file
    reads as one uninterrupted run (those steps are redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


class MetricsLogger:
    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
