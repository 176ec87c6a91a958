"""The training loop: steps from a stream, checkpoints, metrics.

The trainer sees a `stream.StepStream` (what to train at each step) and a
`parallel.TrainState` (how one step runs and how state is saved); it does not know
the device, the parallelism, the role, the backend or the release policy.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from draftflow.config import Config
from draftflow.train import checkpoint as ckpt
from draftflow.train.distributed import DistInfo, barrier, host_threads
from draftflow.train.metrics import MetricsLogger, truncate_after
from draftflow.train.model import DraftModelConfig, Eagle3Draft
from draftflow.train.parallel import TrainState
from draftflow.train.vocab import vocab_maps

log = logging.getLogger("draftflow.train")


@dataclass(frozen=True, slots=True)
class TargetWeights:
    """The frozen target tensors a draft trainer needs (embedding and lm_head), and
    the target's config."""

    embed_weight: torch.Tensor  # [V, H]
    lm_head_weight: torch.Tensor  # [V, H]
    hf_config: object


def load_target_weights(target_cfg) -> TargetWeights:
    """The target's embedding and lm_head (what the draft shares and learns from),
    without loading its decoder layers."""
    from draftflow.capture.target import load_embedding_and_lm_head

    embed, lm_head, hf_config = load_embedding_and_lm_head(target_cfg)
    return TargetWeights(embed_weight=embed, lm_head_weight=lm_head, hf_config=hf_config)


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
    if "full_attention" in rope and isinstance(rope["full_attention"], dict):
        # One RoPE per attention type (Gemma 3: sliding and full); the draft attends over
        # the whole prefix, as the target's full-attention layers do.
        rope = rope["full_attention"]
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


def build_draft(model_cfg: DraftModelConfig, target: TargetWeights, draft_ids: list[int], seed: int) -> Eagle3Draft:
    """A fresh draft, initialised deterministically from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft = Eagle3Draft(model_cfg)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target.embed_weight)
        # Start the draft head from the target's rows for the draft vocab: the draft's
        # final hidden state lives in the target's space, so this is a good prior.
        draft.lm_head.weight.copy_(target.lm_head_weight[torch.tensor(draft_ids)])
        d2t, t2d = vocab_maps(draft_ids, model_cfg.vocab_size)
        draft.d2t.copy_(d2t)
        draft.t2d.copy_(t2d)
    return draft


class Trainer:
    """Runs `state` over the steps of `stream` to train.max_steps (or the stream's
    end), with checkpoints (resume from the newest), metrics and an audit log of
    the samples each rank trained at each step."""

    def __init__(self, cfg: Config, state: TrainState, stream, dist: DistInfo, meta: dict, hidden_size: int):
        self.cfg, self.tc, self.dist = cfg, cfg.train, dist
        self.state, self.stream, self.meta = state, stream, meta
        self.hidden_size = hidden_size
        self.output_dir = Path(self.tc.output_dir)
        self.checkpoints = self.output_dir / "checkpoints"

    def check_ref(self, ref) -> None:
        """Refuse features that cannot belong to this draft before reading them."""
        h = self.hidden_size
        expected = {"aux_hidden": (ref.num_tokens, 3 * h), "last_hidden": (ref.num_tokens, h),
                    "input_ids": (ref.num_tokens,), "loss_mask": (ref.num_tokens,)}
        for name, shape in expected.items():
            got = ref.spec(name).shape
            if got != shape:
                raise ValueError(f"sample {ref.sample_id!r} ({ref.uri}): feature {name!r} has shape {list(got)}, "
                                 f"but the target's hidden size {h} needs {list(shape)}; were these features "
                                 "captured from another target?")

    def _samples_log(self) -> Path:
        return self.output_dir / f"samples.rank{self.dist.rank}.jsonl"

    def _log_samples(self, step: int, batches) -> None:
        """Append which samples this rank trained at each step (an audit trail: in
        consume-once runs it shows every sample was trained, and how often)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ids = [sid for b in batches for sid in b.sample_ids]
        with open(self._samples_log(), "a") as f:
            f.write(json.dumps({"step": step, "samples": ids}) + "\n")

    def resume(self) -> tuple[int, dict]:
        """(step, data position) of the newest checkpoint, or (0, {}). The audit logs of
        every rank, this run's or an earlier one's with more ranks, drop the steps after
        it: those steps are trained again."""
        found = ckpt.list_checkpoints(self.checkpoints)
        if found:
            ckpt.check_same_run(found[-1], self.meta)  # before anything in output_dir is touched
        if self.dist.is_main:
            for log_file in self.output_dir.glob("samples.rank*.jsonl"):
                truncate_after(log_file, ckpt.read_meta(found[-1])["step"] if found else 0)
        barrier()
        return self.state.load(found[-1]) if found else (0, {})

    def save(self, step: int) -> Path:
        """A checkpoint at `step`; then the stream may free what it holds."""
        path = self.state.save(self.checkpoints, step, self.meta, self.stream.data_position(step))
        self.stream.committed()
        return path

    def fit(self, stop_after: int | None = None) -> Path | None:
        """Train to train.max_steps (or stop early after `stop_after` steps, for tests
        of interruption); returns the last checkpoint folder."""
        with host_threads(self.state.device):
            return self._fit(stop_after)

    def _fit(self, stop_after: int | None) -> Path | None:
        start, data = self.resume()
        end = self.tc.max_steps if stop_after is None else min(self.tc.max_steps, stop_after)
        logger = MetricsLogger(self.output_dir, start, self.tc.tensorboard, self.dist.is_main)
        self.stream.open(start, end, data, self.check_ref)
        bar = tqdm(total=self.tc.max_steps, initial=start, desc="train", unit="step",
                   disable=not (self.tc.progress and self.dist.is_main))
        last, saved, done, finished = None, start, start, False
        try:
            t_prev, wait_prev, tokens, record = time.perf_counter(), 0.0, 0, None
            for step in range(start, end):
                got = self.stream.next(step)
                while got is not None and not got.batches:  # commit first, then ask again
                    if done > saved:
                        last, saved = self.save(done), done
                    else:
                        self.stream.committed()  # the newest checkpoint already holds it all
                    got = self.stream.next(step)
                if got is None:
                    if step == 0:  # nothing trained and nothing resumed: saving would export an untrained draft
                        raise ValueError(f"nothing left to train: {self.stream.why_exhausted()}; no checkpoint "
                                         f"or draft was written to {self.output_dir}")
                    end = step  # a consume-once stream ran out on every rank: finish here
                    break
                tokens += sum(b.num_tokens for b in got.batches)
                self._log_samples(step + 1, got.batches)
                record = self.state.step(got.batches)
                done = step + 1
                if done % self.tc.log_every == 0 or done == end:
                    now = time.perf_counter()
                    elapsed = now - t_prev
                    record.update(step=done, lr=self.state.lr, epoch=self.stream.epoch_of(done),
                                  tokens_per_s=tokens * self.dist.world_size / max(elapsed, 1e-9),
                                  data_wait_share=(self.stream.wait_s - wait_prev) / max(elapsed, 1e-9))
                    logger.log({"step": done, **{k: v for k, v in record.items() if k != "step"}})
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc0=f"{record.get('acc_0', 0):.2f}")
                    t_prev, wait_prev, tokens, record = now, self.stream.wait_s, 0, None
                bar.update(1)
                if done != end and (got.commit or (self.tc.save_every and done % self.tc.save_every == 0)):
                    last, saved = self.save(done), done
            if record is not None:  # the stream ended between two logging steps
                logger.log({"step": done, **record, "lr": self.state.lr, "epoch": self.stream.epoch_of(done)})
            found = ckpt.list_checkpoints(self.checkpoints)
            if end > saved or not found:
                last = self.save(end)
            else:
                last = found[-1]
                self.stream.committed()
            finished = True
        finally:
            self.stream.close(failed=not finished)
            bar.close()
            logger.close()
        return last
