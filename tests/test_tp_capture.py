"""Capture with the target sharded over ranks (capture.parallel tp, transformers' own
tensor parallelism under torchrun; gloo on CPU) against single-device capture."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftflow.config import load_config
from draftflow.roles import run_colocated

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
COMMON = ["train.progress=false", "train.tensorboard=false", "data.max_samples=8", "train.max_steps=4",
          "train.log_every=1", "train.batch_size=2"]

WORKER = """
import sys
from draftflow.config import load_config
from draftflow.roles import run_colocated, run_producer
from draftflow.train.distributed import shutdown
cfg = load_config([sys.argv[2]], sys.argv[3:])
(run_colocated if sys.argv[1] == "colocated" else run_producer)(cfg)
shutdown()
"""


def torchrun(tmp: Path, ranks: int, role: str, *overrides: str, env=None) -> None:
    script = tmp / "tp_worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29547",
           str(script), role, str(TINY), *COMMON, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]


def features(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.stem: load_file(str(p)) for p in sorted((root / "samples").glob("*.safetensors"))}


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_tp_capture_matches_single_device_capture_and_trains_alike(tmp_path, family):
    """Two ranks hold half of each layer's heads and MLP columns (capture.tp_size 2;
    for the MoE, of each expert): the features equal single-device ones up to float32
    reduction order, and the drafts trained on each agree to about 5 significant
    figures per step."""
    from test_families import FAMILIES

    kind = [] if family == "llama" else [f"target.random.model_type={family}", *(
        f"target.random.{k}={json.dumps(v)}" for k, v in FAMILIES[family].items())]
    single = tmp_path / "single"
    run_colocated(load_config([TINY], [*COMMON, *kind, "train.grad_accum=2", f"features.root={single / 'feat'}",
                                       f"train.output_dir={single / 'run'}", "features.dtype=float32"]))
    tp = tmp_path / "tp"
    torchrun(tmp_path, 2, "colocated", *kind, "capture.parallel=tp", "capture.tp_size=2", "features.dtype=float32",
             f"features.root={tp / 'feat'}", f"train.output_dir={tp / 'run'}", f"target.cache_dir={tmp_path / 'cache'}")
    a, b = features(single / "feat"), features(tp / "feat")
    assert a.keys() == b.keys() and len(a) == 8
    worst_abs = worst_rel = 0.0
    for sid in a:
        for name in ("aux_hidden", "last_hidden"):
            diff = (a[sid][name] - b[sid][name]).abs()
            worst_abs = max(worst_abs, float(diff.max()))
            worst_rel = max(worst_rel, float(diff.max() / a[sid][name].abs().max()))
        assert torch.equal(a[sid]["input_ids"], b[sid]["input_ids"])
    print(f"{family}: TP vs single-device features (float32): max abs {worst_abs:.3g}, max rel {worst_rel:.3g}")
    assert worst_abs > 0 and worst_rel < 1e-5  # equal up to float32 reduction order, not bit-equal
    # 2 ranks x 1 micro-batch of 2 train what one process trains as 2 micro-batches of 2
    ma = [json.loads(x) for x in (single / "run" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tp / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "acc_0", "ploss_2"):
        torch.testing.assert_close(torch.tensor([m[key] for m in mb]), torch.tensor([m[key] for m in ma]),
                                   rtol=1e-5, atol=1e-6)


def test_tp_producer_publishes_once_per_group_for_a_consumer(tmp_path):
    """A producer job of 2 ranks in one TP group: one copy of the features, journaled
    once; a consumer trains on them and exports."""
    store = [f"features.root={tmp_path / 'feat'}", "features.backend=shared_dir", "capture.parallel=tp",
             "capture.tp_size=2", f"target.cache_dir={tmp_path / 'cache'}"]
    torchrun(tmp_path, 2, "producer", *store, env={"DRAFTFLOW_SECRET": "tp-secret"})
    journal = (tmp_path / "feat" / "control" / "refs.jsonl").read_text().splitlines()
    assert len(journal) == 8 and len(list((tmp_path / "feat" / "samples").glob("*.safetensors"))) == 8
    consumer = subprocess.run([sys.executable, "-m", "draftflow", "train", "-c", str(TINY), "--role", "consumer",
                               *COMMON, *store, f"train.output_dir={tmp_path / 'run'}"], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "DRAFTFLOW_SECRET": "tp-secret"})
    assert consumer.returncode == 0, consumer.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("overrides, message", [
    (["capture.parallel=tp", "capture.tp_size=3"], r"capture.tp_size: 3 must divide the job's 1 rank"),
    (["capture.parallel=none", "capture.tp_size=2"], r"capture.tp_size: 2 with capture.parallel none"),
    (["capture.parallel=pipeline"], r"capture.parallel: pipeline spreads the target over CUDA GPUs"),
])
def test_bad_capture_parallel_settings_are_refused_naming_the_key(tmp_path, overrides, message):
    cfg = load_config([TINY], [*COMMON, f"features.root={tmp_path / 'feat'}", f"train.output_dir={tmp_path / 'r'}",
                               "capture.device=cpu", *overrides])
    with pytest.raises(ValueError, match=message):
        run_colocated(cfg)


def test_tp_size_must_divide_the_heads():
    from types import SimpleNamespace

    from draftflow.capture.parallel import plan_capture

    cfg = SimpleNamespace(parallel="tp", tp_size=2)
    hf = SimpleNamespace(model_type="llama", base_model_tp_plan={"x": "colwise"}, num_attention_heads=3,
                         num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"capture.tp_size: 2 does not divide the target's 3 attention heads"):
        plan_capture(cfg, hf, 2, 0, torch.device("cpu"))
    hf_no_plan = SimpleNamespace(model_type="oddball", base_model_tp_plan=None, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"no tensor-parallel plan for model type 'oddball'.*pipeline"):
        plan_capture(cfg, hf_no_plan, 2, 0, torch.device("cpu"))


def test_the_capture_command_honours_capture_parallel(tmp_path):
    """`draftflow capture` is one process: capture.parallel none works, tp is refused
    naming the key (a tensor-parallel producer runs under torchrun)."""
    def capture(*extra):
        return subprocess.run([sys.executable, "-m", "draftflow", "capture", "-c", str(TINY), *COMMON,
                               f"features.root={tmp_path / 'feat'}", *extra], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})

    refused = capture("capture.parallel=tp", "capture.tp_size=2")
    assert refused.returncode == 2 and "capture.tp_size: 2 must divide the job's 1 rank" in refused.stderr
    done = capture()
    assert done.returncode == 0 and "captured 8 samples" in done.stdout, done.stderr[-2000:]
