"""Online training against capture alone and training alone, on one GPU, in one run.

Target: the random Llama-3.1-8B-shaped model of bench_capture_gpu.py (bf16,
initialised on the GPU); draft: the 8B-shaped EAGLE3 draft `roles.train_from_refs`
builds for it (draft vocab 32000, TTT 7), trained through `parallel.TrainState`
(FSDP2 over one rank, compiled, recompute auto). Data: synthetic 2048-token
samples, `train.batch_size` of them per step. Three phases, the same steps each:

1. capture alone: the online source (`capture.online.CapturingSource`) captures
   the order's samples into the memory store and a loop takes and frees each
   one: the target's share of an online step;
2. training alone: the same steps' features, captured beforehand and batched on
   the GPU, trained with `TrainState.step` -- offline training's best case (no
   store read at all);
3. online: the product path, `train.stream.OnlineStream` over the online source
   (capture thread a few steps ahead, loader, memory store) feeding
   `TrainState.step`.

Each phase reports seconds per step, training tokens/s and the peak GPU memory
(the target's weights are in every phase). The target: online step time <=
capture + training time of the same step (no worse than doing them in turn);
overlap = (capture + training - online) / min(capture, training), the share of
the shorter one hidden under the other.

    PYTHONPATH=$PWD python benchmarks/bench_online_gpu.py --out online.json
    python benchmarks/bench_online_gpu.py --small --out smoke.json      # CPU, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capture_gpu import _sync, bench_config, random_target  # noqa: E402

from draftflow.capture.online import CapturingSource  # noqa: E402
from draftflow.capture.target import resolve_aux_layer_ids  # noqa: E402
from draftflow.control.binding import RunKeys  # noqa: E402
from draftflow.roles import build_draft_config, plan_data  # noqa: E402
from draftflow.stores.memory import MemoryStore  # noqa: E402
from draftflow.train.batches import SampleOrder, collate  # noqa: E402
from draftflow.train.distributed import init_distributed  # noqa: E402
from draftflow.train.loss import Teacher  # noqa: E402
from draftflow.train.parallel import TrainState  # noqa: E402
from draftflow.train.stream import BatchShape, OnlineStream  # noqa: E402
from draftflow.train.trainer import TargetWeights, build_draft  # noqa: E402


def _phase(device: torch.device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _source(target, aux, samples, cfg):
    store = MemoryStore(RunKeys(b"bench" * 8, "memory"), cfg.features.max_inflight_bytes)
    return store, CapturingSource(target, aux, samples, store, cfg.capture, torch.bfloat16
                                  if cfg.capture.device == "cuda" else torch.float32)


def timed(warmup: int, steps: int, device, run_step, at_start=lambda: None) -> float:
    """Seconds per step of `run_step(step)` over the steps after the first `warmup`
    (`at_start` runs when the timing starts)."""
    _phase(device)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            at_start()
            start = time.perf_counter()
        run_step(step)
    _sync(device)
    return (time.perf_counter() - start) / steps


def capture_alone(target, aux, samples, cfg, order, warmup: int, steps: int, device) -> dict:
    store, source = _source(target, aux, samples, cfg)
    source.start(order, 0, warmup + steps)

    def take_and_free(step: int) -> None:
        for i in (i for micro in order.micro_batches(step) for i in micro):
            store.release(store.get(source.resolve(i)))

    try:
        return {"step_s": timed(warmup, steps, device, take_and_free), "peak_gib": _peak(device)}
    finally:
        source.close()
        store.close()


def captured_batches(target, aux, samples, cfg, order, steps: int, device) -> list:
    """The features of `steps` steps, batched where training will read them."""
    store, source = _source(target, aux, samples, cfg)
    source.start(order, 0, steps)
    out = []
    try:
        for step in range(steps):
            micro_batches = []
            for micro in order.micro_batches(step):
                leases = [store.get(source.resolve(i)) for i in micro]
                micro_batches.append(collate([dict(l.tensors) for l in leases], [l.ref.sample_id for l in leases])
                                     .to(device))
                for lease in leases:
                    store.release(lease)
            out.append(micro_batches)
    finally:
        source.close()
        store.close()
    return out


def train_alone(state: TrainState, batches: list, warmup: int, device) -> dict:
    seconds = timed(warmup, len(batches) - warmup, device, lambda step: state.step(batches[step]))
    return {"step_s": seconds, "peak_gib": _peak(device)}


def online(state: TrainState, target, aux, samples, cfg, dist, warmup: int, steps: int, device) -> dict:
    store, source = _source(target, aux, samples, cfg)
    shape = BatchShape(batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum, seed=cfg.train.seed + 1)
    stream = OnlineStream(store, source, shape, dist, pin_memory=False)
    stream.open(0, warmup + steps, {}, check_ref=lambda ref: None)
    start = {}
    try:
        seconds = timed(warmup, steps, device, lambda step: state.step(stream.next(step).batches),
                        at_start=lambda: start.update(wait=stream.wait_s, capture=source.capture_s))
        return {"step_s": seconds, "peak_gib": _peak(device),
                "loader_wait_s_per_step": (stream.wait_s - start["wait"]) / steps,
                "capture_thread_busy_share": (source.capture_s - start["capture"]) / (seconds * steps),
                "store_peak_gib": store.peak_bytes / 2 ** 30}
    finally:
        stream.close()
        store.close()


def run(small: bool, steps: int, warmup: int, batch_size: int, work_parent: Path) -> dict:
    work = Path(tempfile.mkdtemp(dir=work_parent, prefix="online-bench-"))
    r: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "small": small, "steps": steps, "warmup": warmup}
    try:
        num_samples = (warmup + steps) * batch_size
        _, cfg = bench_config(work, small, num_samples, features={"backend": "memory"},
                              train={"batch_size": batch_size, "device": "cpu" if small else "cuda"})
        dist = init_distributed(cfg.train.device)
        device = dist.device
        r["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        plan = plan_data(cfg, cfg.target.random["vocab_size"])
        samples = plan.prepared.train
        t0 = time.perf_counter()
        target = random_target(cfg, device, torch.float32 if small else torch.bfloat16)
        r["target_setup_s"] = time.perf_counter() - t0
        hf = target.config
        aux = resolve_aux_layer_ids(cfg.target, hf.num_hidden_layers)
        weights = TargetWeights(embed_weight=target.model.model.embed_tokens.weight.detach(),
                                lm_head_weight=target.model.lm_head.weight.detach(), hf_config=hf)
        model_cfg = build_draft_config(cfg, hf, aux, len(plan.draft_ids))
        draft = build_draft(model_cfg, weights, plan.draft_ids, seed=0).to(device)
        state = TrainState(draft, Teacher(weights.lm_head_weight, torch.tensor(plan.draft_ids)), cfg.train,
                           cfg.draft.ttt_length, cfg.draft.loss_decay)
        tokens_per_step = batch_size * cfg.data.max_length
        r["sizes"] = {"samples": num_samples, "tokens_per_step": tokens_per_step, "hidden": hf.hidden_size,
                      "layers": hf.num_hidden_layers, "draft_vocab": len(plan.draft_ids), "compile": state.compile}
        order = SampleOrder(num_samples=num_samples, seed=cfg.train.seed, batch_size=batch_size, grad_accum=1)
        print("capture alone", flush=True)
        r["capture"] = capture_alone(target, aux, samples, cfg, order, warmup, steps, device)
        print("training alone", flush=True)
        batches = captured_batches(target, aux, samples, cfg, order, warmup + steps, device)
        r["train"] = train_alone(state, batches, warmup, device)
        print("online", flush=True)
        r["online"] = online(state, target, aux, samples, cfg, dist, warmup, steps, device)
        # training alone once more, warm: drift (clocks, heat, compilation the warm-up missed)
        r["train"]["step_s_again"] = train_alone(state, batches, 1, device)["step_s"]
        r["train"]["drift"] = r["train"]["step_s_again"] / r["train"]["step_s"] - 1
        del batches
        r["train"]["step_s"] = min(r["train"]["step_s"], r["train"]["step_s_again"])  # the stricter comparison
        for part in ("capture", "train", "online"):
            r[part]["tokens_per_s"] = tokens_per_step / r[part]["step_s"]
        in_turn = r["capture"]["step_s"] + r["train"]["step_s"]
        r["in_turn_step_s"] = in_turn
        r["overlap"] = (in_turn - r["online"]["step_s"]) / min(r["capture"]["step_s"], r["train"]["step_s"])
        r["target_online_le_in_turn"] = r["online"]["step_s"] <= in_turn
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return r


def print_table(r: dict) -> None:
    print(f"\n{r['device']}, torch {r['torch']}, {r['date']}; {r['sizes']['tokens_per_step']} tokens per step, "
          f"{r['steps']} timed steps after {r['warmup']} warm-up")
    print(f"{'phase':>16} {'step s':>8} {'tok/s':>9} {'peak GiB':>9}")
    for part, name in (("capture", "capture alone"), ("train", "training alone"), ("online", "online")):
        p = r[part]
        peak = f"{p['peak_gib']:.1f}" if p["peak_gib"] is not None else "-"
        print(f"{name:>16} {p['step_s']:8.3f} {p['tokens_per_s']:9.0f} {peak:>9}")
    print(f"training alone again after online: {r['train']['step_s_again']:.3f} s/step "
          f"(drift {r['train']['drift']:+.1%})")
    print(f"in turn (capture + training): {r['in_turn_step_s']:.3f} s/step; online {r['online']['step_s']:.3f} "
          f"s/step; overlap {r['overlap']:.0%} of the shorter phase; online <= in turn: "
          f"{r['target_online_le_in_turn']}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="untimed first steps (compilation, allocator)")
    ap.add_argument("--batch-size", type=int, default=2, help="2048-token samples per step")
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU: a smoke test of this script")
    ap.add_argument("--work", default=None, help="scratch folder (default: the system's temp folder)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    r = run(args.small, args.steps, args.warmup, args.batch_size, Path(args.work or tempfile.gettempdir()))
    Path(args.out).write_text(json.dumps(r, indent=2))
    print_table(r)
    return r


if __name__ == "__main__":
    main()
