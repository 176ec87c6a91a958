"""Assembly of a run for each role: colocated, producer, consumer.

One function per stage, shared by every role:
- `plan_data`: tokenizer, prepared samples, draft vocab, provenance;
- `produce`: run the target over the samples and publish features to the store;
- `train_from_refs`: everything after "a ref source and a store", identical for a
  colocated run and a consumer, so both build byte-identical batches and, on CPU,
  end with bit-identical weights for the same seed and steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import draftflow
from draftflow.capture.capture import capture_features, resolve_device_dtype
from draftflow.capture.online import CapturingSource, check_online_fits, online_memory_need
from draftflow.capture.parallel import LeaderOnly, plan_capture
from draftflow.capture.target import (LoadedTarget, config_hash, load_target, packaged_chat_template, random_config,
                                      resolve_aux_layer_ids, resolve_target_folder, target_identity)
from draftflow.config import Config
from draftflow.control.manifest import (ManifestHeader, ManifestReader, ManifestWriter, check_provenance,
                                        wait_for_header)
from draftflow.control.binding import RunKeys, StoreFill, check_filled_with, colocated_secret, open_store_record
from draftflow.control.claims import ClaimBook, consumer_identity, default_owner
from draftflow.control.lease import ProducerLease
from draftflow.control.signing import load_secret
from draftflow.control.sources import ClaimingRefSource, ManifestRefSource
from draftflow.data.prepare import PreparedData, data_hash, prepare_dataset
from draftflow.data.tokenizer import load_tokenizer, tokenizer_hash
from draftflow.card import card_from_checkpoint, target_section
from draftflow.export import export_draft
from draftflow.families import serving_warnings
from draftflow.features_codec import storage_dtype
from draftflow.records import Provenance
from draftflow.stores import StoreError, build_store
from draftflow.stores.shared_dir import resolve_release
from draftflow.train import checkpoint as ckpt
from draftflow.train.batches import ListRefSource, RefSource
from draftflow.train.distributed import barrier, host_threads, init_distributed
from draftflow.train.loss import Teacher
from draftflow.train.parallel import TrainState
from draftflow.train.stream import BatchShape, ConsumeOnceStream, OnlineStream, SeededStream
from draftflow.train.trainer import TargetWeights, Trainer, build_draft, build_draft_config, load_target_weights
from draftflow.train.vocab import build_draft_vocab

log = logging.getLogger("draftflow")

ROLES = ("colocated", "producer", "consumer")


@dataclass(frozen=True, slots=True)
class DataPlan:
    prepared: PreparedData
    draft_ids: list[int]
    tokenizer_hash: str
    data_hash: str


@dataclass(frozen=True, slots=True)
class RunResult:
    output_dir: Path
    final_dir: Path | None
    checkpoint: Path | None
    num_samples: int
    num_tokens: int


def tokenizer_spec(cfg: Config) -> str:
    if cfg.target.tokenizer:
        return cfg.target.tokenizer
    if cfg.target.path is None:
        raise ValueError("target.tokenizer: a random target needs a tokenizer, "
                         "e.g. target.tokenizer=builtin:bytes-chatml")
    return str(resolve_target_folder(cfg.target))


def target_tokenizer(cfg: Config):
    """The target's tokenizer, with `target.chat_template` in place of its own where set
    (by default, for a packaged target whose GGUF carries none, the one it needs)."""
    return load_tokenizer(tokenizer_spec(cfg), cfg.target.chat_template or packaged_chat_template(cfg.target))


def plan_data(cfg: Config, vocab_size: int) -> DataPlan:
    """Tokenise the configured conversations and choose the draft vocab."""
    tok = target_tokenizer(cfg)
    if len(tok) > vocab_size:
        raise ValueError(f"target.tokenizer has {len(tok)} tokens but the target's vocab_size is "
                         f"{vocab_size}; they must belong together")
    prepared = prepare_dataset(cfg.data, tok)
    draft_ids = build_draft_vocab(prepared.train, cfg.draft.vocab_size, vocab_size)
    return DataPlan(prepared=prepared, draft_ids=draft_ids, tokenizer_hash=tokenizer_hash(tok),
                    data_hash=data_hash(prepared.train))


def target_hf_config(cfg: Config):
    """The target's transformers config, without loading its weights."""
    from transformers import AutoConfig

    if cfg.target.random is not None:
        return random_config(cfg.target)
    return AutoConfig.from_pretrained(str(resolve_target_folder(cfg.target)))


def build_provenance(cfg: Config, hf_config, aux_ids: list[int], tokenizer_hash_: str, data_hash_: str
                     ) -> Provenance:
    for warning in serving_warnings(aux_ids, getattr(hf_config, "model_type", None)):
        log.warning(warning)
    feature_dtype(cfg)  # a dtype this torch lacks is refused before any store is opened
    return Provenance(target=target_identity(cfg.target), target_config_hash=config_hash(hf_config),
                      tokenizer_hash=tokenizer_hash_, hidden_size=hf_config.hidden_size,
                      vocab_size=hf_config.vocab_size, aux_layer_ids=tuple(aux_ids),
                      feature_dtype=cfg.features.dtype, data_hash=data_hash_,
                      producer_version=draftflow.__version__)


def feature_dtype(cfg: Config) -> torch.dtype:
    return storage_dtype(cfg.features.dtype)


def produce(cfg: Config, plan: DataPlan, store, target: LoadedTarget, aux_ids: list[int], publish: bool = True):
    """Capture every training sample into `store` (skipping published ones); `publish`
    false: only take part in the forwards (a TP group member, `LeaderOnly(store)`)."""
    with host_threads(next(target.model.parameters()).device):
        return capture_features(target, aux_ids, plan.prepared.train, store, cfg.capture,
                                feature_dtype=feature_dtype(cfg), progress=cfg.train.progress, publish=publish)


def sample_stream(cfg: Config, store, source: RefSource, release: str, dist, pin_memory: bool, hidden_size: int):
    """The trainer's step stream for a release policy: the seeded order (colocated
    runs and retain consumers; captured as it goes in an online run) or arrival order
    with commits at checkpoints."""
    shape = BatchShape(batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum, seed=cfg.train.seed)
    if release == "consume_once":
        return ConsumeOnceStream(store, source, shape, dist, pin_memory, hidden_size)
    if release == "online":
        return OnlineStream(store, source, shape, dist, pin_memory)
    return SeededStream(store, source, shape, dist, pin_memory)


def train_from_refs(cfg: Config, target: TargetWeights, aux_ids: list[int], draft_ids: list[int], store,
                    source: RefSource, provenance: Provenance, run_id: str | None, release: str = "retain",
                    stop_after: int | None = None) -> RunResult:
    """Train and export: the part a colocated run and a consumer share line for line.
    `run_id` (the manifest's; None for a colocated run) and the provenance go into every
    checkpoint, and a resume refuses a checkpoint of another run."""
    dist = init_distributed(cfg.train.device)
    hidden = target.hf_config.hidden_size
    if provenance.hidden_size != hidden:
        raise ValueError(f"features have hidden size {provenance.hidden_size} but the target config "
                         f"gives {hidden}")
    model_cfg = build_draft_config(cfg, target.hf_config, aux_ids, len(draft_ids))
    facts = target_section(target.hf_config, provenance.to_dict(), target_tokenizer(cfg))
    draft = build_draft(model_cfg, target, draft_ids, cfg.train.seed).to(dist.device)
    state = TrainState(draft, Teacher(target.lm_head_weight, torch.tensor(draft_ids)), cfg.train,
                       cfg.draft.ttt_length, cfg.draft.loss_decay)
    stream = sample_stream(cfg, store, source, release, dist, state.pin_memory, hidden)
    meta = {"draft_config": model_cfg.to_dict(), "draft_ids": draft_ids, "provenance": provenance.to_dict(),
            "run_id": run_id, "card": facts}
    last = Trainer(cfg, state, stream, dist, meta, hidden).fit(stop_after=stop_after)
    finish = getattr(source, "finish", None)  # a manifest source checks the seal before the export
    if finish is not None and stop_after is None:
        finish()
    out = Path(cfg.train.output_dir)
    final = None
    if dist.is_main and last is not None and stop_after is None:
        final = export_draft(ckpt.load_model_state(last), model_cfg, out / "final",
                             card=card_from_checkpoint(last, ckpt.read_meta(last)))
    return RunResult(output_dir=out, final_dir=final, checkpoint=last,
                     num_samples=source.num_samples, num_tokens=source.num_tokens)


def capture_fill(cfg: Config, provenance: Provenance) -> StoreFill:
    """What capturing under `cfg` fills a store with (a rerun must match it to reuse it):
    the batch budget (batch shapes change floating-point results) and the dtype the
    target runs in, as `resolve_device_dtype` picks it, but without failing on a device
    this host lacks (capture reports that once consumers can see the run fail)."""
    dtype, device = cfg.capture.dtype, cfg.capture.device
    if dtype == "auto":
        on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dtype = "bfloat16" if on_cuda else "float32"
    capture = (("batch_tokens", cfg.capture.batch_tokens), ("dtype", dtype))
    if cfg.capture.tp_size > 1:  # sharded matmuls reduce in another order: other features
        capture += (("tp_size", cfg.capture.tp_size),)
    return StoreFill(provenance=provenance, capture=capture)


def open_colocated_store(cfg: Config, provenance: Provenance, environ):
    """The store of a run without a manifest (colocated, `draftflow capture`): signed with
    the run secret if one is configured, else with the root's own key."""
    secret = colocated_secret(cfg.features, environ)
    keys, _ = open_store_record(cfg.features.root, secret, capture_fill(cfg, provenance))
    return build_store(cfg.features, keys)


@dataclass(frozen=True, slots=True)
class JobPlan:
    """What a one-job run (colocated, online) derives before it loads anything large."""

    hf_config: object
    data: DataPlan
    aux_ids: list[int]
    provenance: Provenance
    device: torch.device  # where this rank's target runs
    dtype: torch.dtype
    capture: object  # capture.parallel.CapturePlan


def plan_job(cfg: Config, dist) -> JobPlan:
    hf_config = target_hf_config(cfg)
    data = plan_data(cfg, hf_config.vocab_size)
    aux_ids = resolve_aux_layer_ids(cfg.target, hf_config.num_hidden_layers)
    provenance = build_provenance(cfg, hf_config, aux_ids, data.tokenizer_hash, data.data_hash)
    device, dtype = resolve_device_dtype(cfg.capture)
    if dist.device.type == "cuda" and device.type == "cuda":
        device = dist.device  # each rank's target on its own GPU
    capture = plan_capture(cfg.capture, hf_config, dist.world_size, dist.rank, device)
    return JobPlan(hf_config, data, aux_ids, provenance, device, dtype, capture)


def run_colocated(cfg: Config, stop_after: int | None = None, environ=os.environ) -> RunResult:
    """Prepare, capture and train in one job. Under torchrun every rank captures its
    own shard of the samples into the (shared) store, then all train on all of them.
    With features.backend memory the job trains online (`run_online`)."""
    if cfg.features.backend == "memory":
        return run_online(cfg, stop_after)
    dist = init_distributed(cfg.train.device)
    if dist.world_size > 1 and cfg.features.backend == "mooncake" and not cfg.features.mooncake.master:
        raise ValueError("features.mooncake.master: a colocated run under torchrun needs one master that every "
                         "rank shares (start `draftflow store serve --backend mooncake`); without it each rank "
                         "would start a private one")
    job = plan_job(cfg, dist)  # checked before the store is opened: a refused setting leaves no record behind
    plan, aux_ids, provenance = job.data, job.aux_ids, job.provenance
    device, dtype, capture_plan = job.device, job.dtype, job.capture
    store = open_colocated_store(cfg, provenance, environ)
    target = load_target(cfg.target, device, dtype, capture_plan)
    shard = PreparedData(train=capture_plan.shard(plan.prepared.train), heldout=[])
    produce(cfg, DataPlan(shard, plan.draft_ids, plan.tokenizer_hash, plan.data_hash),
            store if capture_plan.is_leader else LeaderOnly(store), target, aux_ids, capture_plan.is_leader)
    del target  # free the target before the draft trains
    barrier()
    refs = captured_refs(store, plan.prepared.train, cfg.features.root)
    result = train_from_refs(cfg, load_target_weights(cfg.target), aux_ids, plan.draft_ids, store, ListRefSource(refs),
                             provenance, None, stop_after=stop_after)
    store.close()
    return RunResult(output_dir=result.output_dir, final_dir=result.final_dir, checkpoint=result.checkpoint,
                     num_samples=len(refs), num_tokens=sum(r.num_tokens for r in refs))


def captured_refs(store, samples, root, what_to_do: str = "rerun to capture them again") -> list:
    """The store's signed ref of every sample, in order; StoreError naming the first one
    missing (never captured, removed, or replaced by something this run did not sign)."""
    refs = [store.lookup(s.sample_id, s.index) for s in samples]
    missing = [s.sample_id for s, ref in zip(samples, refs) if ref is None]
    if missing:
        raise StoreError(f"{root}: {len(missing)} of {len(refs)} samples are not captured (or not signed by this "
                         f"run; first: {missing[0]!r}); {what_to_do}")
    return refs


def run_online(cfg: Config, stop_after: int | None = None) -> RunResult:
    """Capture and train in one job with no feature files (features.backend memory):
    each rank loads the target beside its draft, captures the samples of its own part of
    the seeded order a few steps ahead of training, and frees each once it is batched
    (`capture/online.py`). Same trainer, loader and loss as an offline run; on CPU the
    same draft, bit for bit, as an offline colocated run of the same config."""
    dist = init_distributed(cfg.train.device)
    job = plan_job(cfg, dist)
    hf_config, plan, aux_ids, provenance = job.hf_config, job.data, job.aux_ids, job.provenance
    device, dtype, capture_plan = job.device, job.dtype, job.capture
    if capture_plan.mode == "tp":
        raise ValueError("capture.parallel: tp is not available online (features.backend memory): each rank "
                         "captures the samples it trains; use capture.parallel none, or a disaggregated run with "
                         "a TP producer (docs/disaggregated.md)")
    if device.type == "cuda" and capture_plan.mode == "none":
        model_cfg = build_draft_config(cfg, hf_config, aux_ids, len(plan.draft_ids))
        check_online_fits(online_memory_need(hf_config, dtype, model_cfg), device)
    target = load_target(cfg.target, device, dtype, capture_plan)
    store = build_store(cfg.features, RunKeys(secrets.token_bytes(32), "memory"))
    source = CapturingSource(target, aux_ids, plan.prepared.train, store, cfg.capture, feature_dtype(cfg),
                             num_shards=capture_plan.num_groups)
    try:
        return train_from_refs(cfg, load_target_weights(cfg.target), aux_ids, plan.draft_ids, store, source,
                               provenance, None, release="online", stop_after=stop_after)
    finally:
        store.close()


# ---- disaggregated roles -------------------------------------------------------------

def control_dir(cfg: Config) -> Path:
    return Path(cfg.features.root) / "control"


def run_id_for(provenance: Provenance, num_samples: int, draft_ids: list[int], release: str) -> str:
    """Deterministic, so a producer rerun reopens (and resumes) its own run."""
    payload = json.dumps([provenance.to_dict(), num_samples, draft_ids, release], sort_keys=True)
    return "run-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


class PublishingStore:
    """The producer's view of the store: waits for room (consume-once back-pressure),
    puts, then journals the ref in the signed manifest. Refs become visible to
    consumers only after their sample is durably published. A sample a consumer
    already trained (consume-once: journaled, with a signed done marker, data deleted)
    counts as published, so a rerun never captures it again (nobody would consume it)."""

    def __init__(self, store, writer: ManifestWriter, lease: ProducerLease, done: ClaimBook | None):
        self.store, self.writer, self.lease, self.done = store, writer, lease, done

    def lookup(self, sample_id: str, index: int):
        if self.done is not None and self.done.is_done(sample_id):
            ref = self.writer.journaled(sample_id)
            if ref is not None:
                return ref
        return self.store.lookup(sample_id, index)

    def put(self, sample_id: str, index: int, tensors):
        wait_for_room = getattr(self.store, "wait_for_room", None)
        if wait_for_room is not None:
            wait_for_room(sum(t.numel() * t.element_size() for t in tensors.values()))
        ref = self.store.put(sample_id, index, tensors)
        self.publish(ref)
        return ref

    def publish(self, ref) -> None:
        self.lease.check()  # a producer that lost the run to another must not write to its journal
        self.writer.publish(ref)


@contextmanager
def publishing_run(cfg: Config, secret: bytes, fill: StoreFill, draft_ids: list[int], num_samples: int):
    """Check the store record, take the producer lease, open the store and the run's
    manifest writer; seal the run when the body completes, or mark it failed
    (consumers then get the error instead of a hang). Yields a `PublishingStore`."""
    release = resolve_release(cfg.features.release)
    header = ManifestHeader(run_id=run_id_for(fill.provenance, num_samples, draft_ids, release),
                            provenance=fill.provenance, draft_vocab=tuple(draft_ids), num_samples=num_samples,
                            release=release)
    keys, _ = open_store_record(cfg.features.root, secret, fill)
    lease = ProducerLease(control_dir(cfg), keys, cfg.features.claim_timeout_s).acquire()
    try:
        store = build_store(cfg.features, keys)
        try:
            writer = ManifestWriter(control_dir(cfg), secret, header)
        except BaseException:
            store.close()
            raise
        done = (ClaimBook(control_dir(cfg), default_owner(), cfg.features.claim_timeout_s, keys)
                if release == "consume_once" else None)
        try:
            yield PublishingStore(store, writer, lease, done)
            lease.check()
            writer.seal()
        except BaseException as e:
            if not lease.lost:  # the run is another producer's now: leave its state alone
                writer.fail(f"{type(e).__name__}: {e}")  # a rerun of the same run clears it
            raise
        finally:
            writer.close()
            store.close()
    finally:
        lease.release()


def run_producer(cfg: Config, environ=os.environ) -> RunResult:
    """Capture (or resume capturing) into the store and publish refs in a signed manifest.

    Under torchrun the job's ranks form capture groups (`capture/parallel.py`): rank 0
    holds the producer lease and the manifest writer and journals its group's refs as
    they are stored; the other groups' leaders put features into the store, and their
    refs are journaled when capture ends, before the run is sealed."""
    require_shared_backend(cfg, "producer")
    secret = load_secret(cfg.features, environ)
    # A process group only under torchrun: a lone producer's device errors belong inside
    # the run below, where they mark it failed for the consumers.
    dist = init_distributed(cfg.capture.device) if int(environ.get("WORLD_SIZE", "1")) > 1 else None
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    hf_config = target_hf_config(cfg)
    plan = plan_data(cfg, hf_config.vocab_size)
    aux_ids = resolve_aux_layer_ids(cfg.target, hf_config.num_hidden_layers)
    provenance = build_provenance(cfg, hf_config, aux_ids, plan.tokenizer_hash, plan.data_hash)
    num = len(plan.prepared.train)

    def capture_into(store) -> list:
        device, dtype = resolve_device_dtype(cfg.capture)
        if dist is not None and dist.device.type == "cuda" and device.type == "cuda":
            device = dist.device
        capture_plan = plan_capture(cfg.capture, hf_config, world, rank, device)
        shard = DataPlan(PreparedData(train=capture_plan.shard(plan.prepared.train), heldout=[]), plan.draft_ids,
                         plan.tokenizer_hash, plan.data_hash)
        target = load_target(cfg.target, device, dtype, capture_plan)
        refs = produce(cfg, shard, store if capture_plan.is_leader else LeaderOnly(store), target, aux_ids,
                       capture_plan.is_leader)
        return gather_refs(refs if capture_plan.is_leader else [])

    if rank == 0:
        with publishing_run(cfg, secret, capture_fill(cfg, provenance), plan.draft_ids, num) as publishing:
            barrier()  # the store record and the lease exist: the other ranks may open the store
            refs = capture_into(publishing)
            for ref in refs:  # other groups' samples, and those a crashed run stored but did not journal
                publishing.publish(ref)
        log.info("producer: sealed a run of %d samples at %s", num, cfg.features.root)
    else:
        barrier()
        keys, _ = open_store_record(cfg.features.root, secret, None)
        store = build_store(cfg.features, keys)
        try:
            refs = capture_into(store)
        finally:
            store.close()
    return RunResult(output_dir=Path(cfg.features.root), final_dir=None, checkpoint=None, num_samples=num,
                     num_tokens=sum(r.num_tokens for r in refs))


def gather_refs(refs: list) -> list:
    """Every rank's refs on rank 0 (tensor-free metadata; other ranks get [])."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(refs)
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(list(refs), gathered, dst=0)
    return [r for part in gathered for r in part] if gathered is not None else []


def run_ingest(cfg: Config, src: Path, environ=os.environ) -> RunResult:
    """Publish existing feature files (DraftFlow's or SpecForge's) into the store,
    with the same signed manifest a producer writes."""
    from draftflow.ingest import IngestedSample, list_feature_files, read_feature_file

    refuse_memory_backend(cfg, "draftflow ingest")
    secret = load_secret(cfg.features, environ)
    hf_config = target_hf_config(cfg)
    aux_ids = resolve_aux_layer_ids(cfg.target, hf_config.num_hidden_layers)
    dtype = feature_dtype(cfg)
    files = list_feature_files(Path(src))
    samples = []
    for i, path in enumerate(files):  # pass 1: token ids only, for the vocab and the data hash
        feats = read_feature_file(path, dtype)
        if feats["last_hidden"].shape[1] != hf_config.hidden_size:
            raise ValueError(f"{path}: hidden size {feats['last_hidden'].shape[1]}, but the configured target "
                             f"has hidden_size {hf_config.hidden_size}")
        samples.append(IngestedSample(f"s{i:06d}", i, path, feats["input_ids"], feats["loss_mask"]))
    draft_ids = build_draft_vocab(samples, cfg.draft.vocab_size, hf_config.vocab_size)
    provenance = build_provenance(cfg, hf_config, aux_ids, tokenizer_hash(target_tokenizer(cfg)),
                                  data_hash(samples))
    fill = StoreFill(provenance=provenance, capture=(("source", "ingest"),))
    with publishing_run(cfg, secret, fill, draft_ids, len(samples)) as publishing:
        for s in samples:  # pass 2: publish, skipping what a previous ingest stored
            ref = publishing.lookup(s.sample_id, s.index)
            if ref is None:
                ref = publishing.put(s.sample_id, s.index, read_feature_file(s.path, dtype))
            publishing.publish(ref)
    return RunResult(output_dir=Path(cfg.features.root), final_dir=None, checkpoint=None,
                     num_samples=len(samples), num_tokens=sum(int(s.input_ids.numel()) for s in samples))


def consumer_provenance(cfg: Config, header: ManifestHeader) -> Provenance:
    """What the consumer's own config says the features must be. It cannot check the
    data (it may not have it) or where the producer found the target, so those two
    fields are taken from the manifest; everything else is derived independently."""
    feature_dtype(cfg)  # this consumer must be able to decode what it asks for
    hf_config = target_hf_config(cfg)
    tok = target_tokenizer(cfg)
    aux_ids = resolve_aux_layer_ids(cfg.target, hf_config.num_hidden_layers)
    produced = header.provenance
    # A random target is defined by its config and seed: compare its identity too.
    target = target_identity(cfg.target) if cfg.target.random is not None else produced.target
    return Provenance(target=target, target_config_hash=config_hash(hf_config),
                      tokenizer_hash=tokenizer_hash(tok), hidden_size=hf_config.hidden_size,
                      vocab_size=hf_config.vocab_size, aux_layer_ids=tuple(aux_ids),
                      feature_dtype=cfg.features.dtype, data_hash=produced.data_hash,
                      producer_version=produced.producer_version)


def run_consumer(cfg: Config, environ=os.environ, stop_after: int | None = None) -> RunResult:
    """Wait for the producer's manifest, check it, and train from its refs."""
    require_shared_backend(cfg, "consumer")
    secret = load_secret(cfg.features, environ)
    wait_for_header(control_dir(cfg), cfg.features.wait_timeout_s)
    reader = ManifestReader(control_dir(cfg), secret)
    expected = consumer_provenance(cfg, reader.header)
    check_provenance(reader.header, expected)
    keys, filled = open_store_record(cfg.features.root, secret, None)
    check_filled_with(cfg.features.root, filled, reader.header.provenance)
    # The manifest decides the release policy: every consumer of a run must agree on it.
    store = build_store(dataclasses.replace(cfg.features, release=reader.header.release), keys)
    try:
        release = reader.header.release
        if release == "consume_once":
            # A restart of this consumer (same output_dir and rank) adopts its own claims at
            # once instead of waiting for them to go stale.
            identity = consumer_identity(cfg.train.output_dir, int(environ.get("RANK", "0")))
            claims = ClaimBook(control_dir(cfg), default_owner(identity), cfg.features.claim_timeout_s, keys,
                               identity=identity)
            source = ClaimingRefSource(reader, store, claims, cfg.features.wait_timeout_s)
        else:
            source = ManifestRefSource(reader, cfg.features.wait_timeout_s)
        return train_from_refs(cfg, load_target_weights(cfg.target), list(expected.aux_layer_ids),
                               list(reader.header.draft_vocab), store, source, reader.header.provenance,
                               reader.header.run_id, release=release, stop_after=stop_after)
    finally:
        store.close()


def refuse_memory_backend(cfg: Config, what: str) -> None:
    """Commands that keep features for later cannot use the memory store, which holds
    an online run's features only while that run trains."""
    if cfg.features.backend == "memory":
        raise ValueError(f"{what} keeps features in a store, and features.backend memory holds them only inside an "
                         "online training job; use local, shared_dir or mooncake (or train online with "
                         "`draftflow train --role colocated`)")


def require_shared_backend(cfg: Config, role: str) -> None:
    if cfg.features.backend == "memory":
        raise ValueError(f"--role {role} needs features.backend shared_dir or mooncake (a memory store lives "
                         "inside one job: train online with --role colocated)")
    if cfg.features.backend == "local":
        raise ValueError(f"--role {role} needs features.backend shared_dir or mooncake "
                         "(a local store is private to one job; use --role colocated)")
    if cfg.features.backend == "mooncake" and not cfg.features.mooncake.master:
        raise ValueError(f"--role {role} with features.backend mooncake needs features.mooncake.master: "
                         "start one with `draftflow store serve --backend mooncake --config-out store.yaml` "
                         "and add `-c store.yaml`")


def run_role(cfg: Config, role: str) -> RunResult:
    runners = {"colocated": run_colocated, "producer": run_producer, "consumer": run_consumer}
    if role not in runners:
        raise ValueError(f"--role: unknown role {role!r}, expected one of {list(ROLES)}")
    return runners[role](cfg)
