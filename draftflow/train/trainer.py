"""The training loop: AdamW, warmup + cosine, accumulation, clipping, checkpoints.

The trainer sees a FeatureStore, a ref source and a sample order; it does not
know which role or backend produced the features.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from draftflow.config import Config
from draftflow.train import checkpoint as ckpt
from draftflow.train.batches import FeatureLoader, RefSource, SampleOrder, TrainBatch
from draftflow.train.distributed import DistInfo, all_reduce_grads, all_reduce_sum, barrier, host_threads
from draftflow.train.chunked_loss import loss_inputs
from draftflow.train.loss import Teacher
from draftflow.train.metrics import MetricsLogger, truncate_after
from draftflow.train.model import DraftModelConfig, Eagle3Draft
from draftflow.train.parallelize import (compile_enabled, load_sharded_checkpoint, loss_module,
                                         save_sharded_checkpoint)
from draftflow.train.vocab import vocab_maps

log = logging.getLogger("draftflow.train")


@dataclass(frozen=True, slots=True)
class TargetHead:
    """The frozen target tensors a draft trainer needs, and the target's config."""

    embed_weight: torch.Tensor  # [V, H]
    lm_head_weight: torch.Tensor  # [V, H]
    hf_config: object


def build_draft_config(cfg: Config, hf_config, aux_layer_ids, num_draft_vocab: int) -> DraftModelConfig:
    d = cfg.draft
    target_hidden = hf_config.hidden_size
    hidden = d.hidden_size or target_hidden
    if hidden != target_hidden:
        raise ValueError(f"draft.hidden_size: {hidden} differs from the target's hidden size {target_hidden}; "
                         "the draft shares the target's embedding, so they must match")
    heads = d.num_attention_heads or hf_config.num_attention_heads
    rope = getattr(hf_config, "rope_parameters", None) or {
        "rope_type": "default", "rope_theta": getattr(hf_config, "rope_theta", 10000.0)}
    head_dim = getattr(hf_config, "head_dim", None) if heads == hf_config.num_attention_heads else None
    return DraftModelConfig(
        hidden_size=hidden,
        intermediate_size=d.intermediate_size or hf_config.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=d.num_key_value_heads or getattr(hf_config, "num_key_value_heads", heads),
        head_dim=head_dim or hidden // heads,
        vocab_size=hf_config.vocab_size,
        draft_vocab_size=num_draft_vocab,
        target_hidden_size=target_hidden,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_parameters={k: v for k, v in dict(rope).items() if v is not None},
        max_position_embeddings=d.max_position_embeddings or hf_config.max_position_embeddings,
        aux_layer_ids=tuple(aux_layer_ids),
        norm_before_fc=d.norm_before_fc,
        norm_output=d.norm_output,
    )


def build_draft(model_cfg: DraftModelConfig, head: TargetHead, draft_ids: list[int], seed: int) -> Eagle3Draft:
    """A fresh draft, initialised deterministically from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft = Eagle3Draft(model_cfg)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(head.embed_weight)
        # Start the draft head from the target's rows for the draft vocab: the draft's
        # final hidden state lives in the target's space, so this is a good prior.
        draft.lm_head.weight.copy_(head.lm_head_weight[torch.tensor(draft_ids)])
        d2t, t2d = vocab_maps(draft_ids, model_cfg.vocab_size)
        draft.d2t.copy_(d2t)
        draft.t2d.copy_(t2d)
    return draft


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class InOrder:
    """Runs calls one after another on a background thread. A failed call's error goes
    to `on_error` at once, and is raised by the next `submit` or by `close` (which
    waits for all calls)."""

    def __init__(self, what: str, on_error=None):
        self.what, self.on_error = what, on_error
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=what.replace(" ", "-"))
        self._pending: deque[Future] = deque()

    def submit(self, fn, *args) -> None:
        self._raise_failed(wait=False)
        self._pending.append(self._pool.submit(self._call, fn, *args))

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except BaseException as e:
            if self.on_error is not None:
                self.on_error(e)
            raise

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every call; raise the first error (log the others), or only log
        them (raise_errors=False: the caller is already failing)."""
        self._pool.shutdown(wait=True)
        self._raise_failed(wait=True, raise_errors=raise_errors)

    def _raise_failed(self, wait: bool, raise_errors: bool = True) -> None:
        errors = []
        while self._pending and (wait or self._pending[0].done()):  # one worker: they finish in order
            error = self._pending.popleft().exception()
            if error is not None:
                errors.append(error)
        for e in errors[1 if raise_errors else 0:]:
            log.error("%s failed: %s", self.what, e, exc_info=e)
        if errors and raise_errors:
            raise errors[0]


class Trainer:
    def __init__(self, cfg: Config, model_cfg: DraftModelConfig, head: TargetHead, draft_ids: list[int],
                 store, source: RefSource, dist: DistInfo, extra_meta: dict | None = None):
        self.cfg, self.tc, self.dist = cfg, cfg.train, dist
        self.store, self.source = store, source
        self.model_cfg, self.draft_ids = model_cfg, draft_ids
        self.output_dir = Path(self.tc.output_dir)
        self.meta = {"draft_config": model_cfg.to_dict(), "draft_ids": draft_ids, **(extra_meta or {})}
        self.draft = build_draft(model_cfg, head, draft_ids, self.tc.seed).to(dist.device)
        compile = compile_enabled(self.tc.compile, dist.device)
        self.teacher = Teacher(head.lm_head_weight, torch.tensor(draft_ids), compile).to(dist.device)
        # FSDP2 on CUDA, one GPU included; CPU (gloo) keeps the replicated draft and the
        # manual gradient all-reduce (bit-exact with single-process runs).
        self.loss_fn, self.fsdp = loss_module(self.draft, self.tc.recompute, compile)
        self.params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.tc.lr, weight_decay=self.tc.weight_decay,
                                           fused=dist.device.type == "cuda")  # one kernel for all parameters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.tc.warmup_steps, self.tc.max_steps, self.tc.min_lr_ratio))
        self.order = SampleOrder(num_samples=source.num_samples, seed=self.tc.seed,
                                 batch_size=self.tc.batch_size, grad_accum=self.tc.grad_accum,
                                 world_size=dist.world_size, rank=dist.rank)
        self.autocast = dist.device.type == "cuda"

    # ---- one optimizer step -------------------------------------------------------
    def train_step(self, batches) -> dict[str, float]:
        k_steps, decay = self.cfg.draft.ttt_length, self.cfg.draft.loss_decay
        if not batches:
            # This rank's stream has ended but another's has not: a batch with nothing to
            # learn (all masks false) keeps it in step with every collective (FSDP's too).
            batches = [self._empty_batch()]
        inputs = [loss_inputs(self.teacher, b, k_steps) for b in batches]
        # Per unroll step: rows whose teacher argmax is in the draft vocab (the loss's
        # denominators), then every row the step learns at (SpecForge's acc denominator).
        both = all_reduce_sum(sum(torch.cat([x.counts(), x.counts_all()]) for x in inputs)).tolist()
        counts, rows = both[:k_steps], both[k_steps:]
        # Fixed metric names, so ranks with no data this step (the end of a consume-once
        # stream) still join every collective with zeros.
        sums = {f"{name}_{k}": torch.zeros((), device=self.dist.device)
                for name in ("ploss", "acc", "accept") for k in range(k_steps)}
        for x in inputs:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                loss, part = self.loss_fn(x, decay, counts)
            loss.backward()
            for name, v in part.items():
                sums[name] = sums[name] + v
        if not self.fsdp:  # FSDP2 reduce-scatters (sums) gradients during backward
            all_reduce_grads(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.tc.max_grad_norm)
        if self.fsdp:
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        names = sorted(sums)
        reduced = all_reduce_sum(torch.stack([sums[n].float() for n in names])).tolist()
        out = {"grad_norm": float(grad_norm), "valid_tokens": counts[0], "loss_tokens": rows[0]}
        loss_total = 0.0
        for name, value in zip(names, reduced):
            kind, k = name.rsplit("_", 1)
            k = int(k)
            out[name] = value / max((rows if kind == "acc" else counts)[k], 1.0)
            if kind == "acc":  # the same hits over the rows the draft vocab can express
                out[f"acc_in_vocab_{k}"] = value / max(counts[k], 1.0)
            if kind == "ploss":
                loss_total += decay ** k * out[name]
        out["loss"] = loss_total
        return out

    def _empty_batch(self) -> TrainBatch:
        h = self.model_cfg.target_hidden_size
        return TrainBatch(input_ids=torch.zeros(1, 2, dtype=torch.int64), loss_mask=torch.zeros(1, 2, dtype=torch.uint8),
                          aux_hidden=torch.zeros(1, 2, 3 * h), last_hidden=torch.zeros(1, 2, h),
                          lengths=torch.tensor([2]), sample_ids=())

    def _samples_log(self) -> Path:
        return self.output_dir / f"samples.rank{self.dist.rank}.jsonl"

    def _log_samples(self, step: int, batches) -> None:
        """Append which samples this rank trained at each step (an audit trail: in
        consume-once runs it shows every sample was trained exactly once)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ids = [sid for b in batches for sid in b.sample_ids]
        with open(self._samples_log(), "a") as f:
            f.write(json.dumps({"step": step, "samples": ids}) + "\n")

    def _any_has_data(self, have: bool) -> bool:
        """Ranks step together while any has data (the others contribute zeros), so
        no rank's tail is dropped and no collective hangs."""
        flag = torch.tensor([1.0 if have else 0.0], device=self.dist.device)
        return bool(all_reduce_sum(flag).item() > 0)

    def check_ref(self, ref) -> None:
        """Refuse features that cannot belong to this draft before reading them."""
        h = self.model_cfg.target_hidden_size
        expected = {"aux_hidden": (ref.num_tokens, 3 * h), "last_hidden": (ref.num_tokens, h),
                    "input_ids": (ref.num_tokens,), "loss_mask": (ref.num_tokens,)}
        for name, shape in expected.items():
            got = ref.spec(name).shape
            if got != shape:
                raise ValueError(f"sample {ref.sample_id!r} ({ref.uri}): feature {name!r} has shape {list(got)}, "
                                 f"but the target's hidden size {h} needs {list(shape)}; were these features "
                                 "captured from another target?")

    def _nothing_to_train(self) -> ValueError:
        why = getattr(self.source, "why_exhausted", None)  # consume-once sources only
        return ValueError(f"nothing left to train: {why() if why else 'the sample stream is empty'}; "
                          f"no checkpoint or draft was written to {self.output_dir}")

    # ---- the loop -----------------------------------------------------------------
    def resume_step(self) -> int:
        found = ckpt.list_checkpoints(self.output_dir / "checkpoints")
        if not found:
            return 0
        ckpt.check_same_run(found[-1], self.meta)
        if self.fsdp:
            return load_sharded_checkpoint(found[-1], self.loss_fn, self.optimizer, self.scheduler)
        return ckpt.load_checkpoint(found[-1], self.draft, self.optimizer, self.scheduler)

    def save(self, step: int) -> Path | None:
        if self.fsdp:  # every rank writes its shards
            return save_sharded_checkpoint(self.output_dir / "checkpoints", step, self.loss_fn, self.optimizer,
                                           self.scheduler, self.meta, self.tc.keep_checkpoints)
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.output_dir / "checkpoints", step, self.draft, self.optimizer,
                                        self.scheduler, self.meta, self.tc.keep_checkpoints)
        barrier()
        return path

    def fit(self, stop_after: int | None = None) -> Path | None:
        """Train to train.max_steps (or stop early after `stop_after` steps, for tests
        of interruption); returns the last checkpoint folder on rank 0."""
        with host_threads(self.dist.device):
            return self._fit(stop_after)

    def _fit(self, stop_after: int | None) -> Path | None:
        start = self.resume_step()
        truncate_after(self._samples_log(), start)  # steps after the checkpoint are redone
        end = self.tc.max_steps if stop_after is None else min(self.tc.max_steps, stop_after)
        logger = MetricsLogger(self.output_dir, start, self.tc.tensorboard, self.dist.is_main)
        loader = FeatureLoader(self.store, self.source, self.order, start, end, check_ref=self.check_ref,
                               pin_memory=self.dist.device.type == "cuda")
        bar = tqdm(total=self.tc.max_steps, initial=start, desc="train", unit="step",
                   disable=not (self.tc.progress and self.dist.is_main))
        last = None
        # Consume-once bookkeeping (a `done` link per sample and its data's deletion: an
        # unlink of a 64 MiB cached file takes 15-20 ms) would leave the GPU idle
        # between steps; one thread does it in order instead.
        # A failure there also goes to the loader, which may be waiting for it (Pending).
        bookkeeping = InOrder("consume-once bookkeeping", on_error=loader.fail)
        trained = getattr(self.source, "trained", None)  # consume-once sources only
        finished = False
        try:
            t_prev, wait_prev, tokens = time.perf_counter(), 0.0, 0
            record, done = None, start
            for step in range(start, end):
                batches = loader.next(step)
                if not self._any_has_data(bool(batches)):
                    if step == 0:  # nothing trained and nothing resumed: saving would export an untrained draft
                        raise self._nothing_to_train()
                    end = step  # a consume-once stream ran out on every rank: finish here
                    break
                tokens += sum(b.num_tokens for b in batches)
                self._log_samples(step + 1, batches)
                record = self.train_step(batches)
                if trained is not None:  # consume-once: free what this step trained, off this thread
                    bookkeeping.submit(trained, [sid for b in batches for sid in b.sample_ids])
                done = step + 1
                if done % self.tc.log_every == 0 or done == end:
                    now = time.perf_counter()
                    elapsed = now - t_prev
                    record.update(step=done, lr=self.scheduler.get_last_lr()[0],
                                  epoch=self.order.epoch_of(done),
                                  tokens_per_s=tokens * self.dist.world_size / max(elapsed, 1e-9),
                                  data_wait_share=(loader.wait_s - wait_prev) / max(elapsed, 1e-9))
                    logger.log({"step": done, **{k: v for k, v in record.items() if k != "step"}})
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc0=f"{record.get('acc_0', 0):.2f}")
                    t_prev, wait_prev, tokens = now, loader.wait_s, 0
                    record = None
                bar.update(1)
                if self.tc.save_every and done % self.tc.save_every == 0 and done != end:
                    last = self.save(done)
            if record is not None:  # the stream ended between two logging steps
                logger.log({"step": done, **record, "lr": self.scheduler.get_last_lr()[0],
                            "epoch": self.order.epoch_of(done)})
            if end > start or not ckpt.list_checkpoints(self.output_dir / "checkpoints"):
                last = self.save(end)
            else:
                last = ckpt.list_checkpoints(self.output_dir / "checkpoints")[-1]
            finished = True
        finally:
            loader.close()
            bar.close()
            try:
                bookkeeping.close(raise_errors=finished)
            finally:
                logger.close()
        return last
