"""SpecForge's EAGLE3 draft trained on DraftFlow's data, scored by DraftFlow's evaluator.

Issue 16 item 2, "side by side with SpecForge": the same samples, loss masks and
captured features DraftFlow trained on, the same global batch and number of
epochs, but SpecForge's draft, objective, optimizer and recipe (PyPI `specforge`
0.2.0, called, never copied). Its draft is saved in the serving layout and then
evaluated by `draftflow.evaluate` (lossless against plain greedy decoding), beside
DraftFlow's own trained draft of the same run when it exists.

Same data, literally. The DraftFlow config names a colocated run whose features are
already captured (features.backend local or shared_dir): the samples are prepared by
`roles.plan_data`, their refs looked up in the run's own signed store, and each
optimizer step reads exactly the samples DraftFlow's trainer read at that step
(`batches.SampleOrder` with train.seed over train.batch_size x train.grad_accum x
`--draftflow-world-size` samples) through DraftFlow's `FeatureLoader`. Each sample then
goes through SpecForge's own offline normaliser (`algorithms.eagle3.data`: it zeroes
the last loss-mask entry and renames the tensors) and collator (zero padding).

SpecForge's side, as its offline EAGLE3 trainer assembles it (only modules that need
neither sglang nor datasets are imported, inside the functions below): the draft config generated from the target by its
`resolve_draft_config` (draft_vocab_size 32000) plus `eagle_config` naming the
layers the features were captured at (how a SpecForge draft config pins them); the
vocab map from the loss-masked token counts of the same samples (`specforge_vocab_maps`,
below); the target's embedding loaded and frozen; `OnlineEagle3Model` with TTT 7,
`Eagle3TrainStrategy` (loss weights 0.8^k) with a `TargetHead` re-running the target's
lm_head over the stored final hidden state; `BF16Optimizer` (AdamW over float32
masters, clipping, warmup + cosine over the run's steps); each micro-batch's loss
divided by the accumulation steps before backward (`TrainerCore.train_step`). Its
FSDP wrapper is left out: on one GPU it shards nothing. `recipe()` lists every value
with where it came from; the JSON repeats it.

The TargetHead and the embedding load from a model folder, so `<out>/target_head`
gets the target's config.json and the very embedding and lm_head tensors DraftFlow
trained with (`load_target_weights`). The draft is saved by SpecForge's own export
pieces (`export.to_sglang`: its serving-state check, then `save_pretrained` and the
legacy RoPE fields): config.json + model.safetensors without the embedding, d2t/t2d
as SpecForge writes them.

Its loss is a Triton kernel, so training needs a GPU. `--cpu-smoke` does the rest
on a CPU: reads the data, builds the vocab map and the draft (random weights), saves,
loads and evaluates it (tests/test_specforge_quality.py runs it on examples/tiny.yaml).

    python -m pip install --no-deps .gpu/wheels/specforge-0.2.0-py3-none-any.whl
    python benchmarks/specforge_quality.py -c examples/smollm2-sharegpt.yaml \\
        features.root=bench-smollm2/features train.output_dir=bench-smollm2/run \\
        --out bench-specforge --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_specforge_gpu import dist_version  # noqa: E402

from draftflow.capture.target import resolve_aux_layer_ids  # noqa: E402
from draftflow.config import load_config, replace  # noqa: E402
from draftflow.evaluate import evaluate_drafts, load_exported_draft, summary_lines, write_json  # noqa: E402
from draftflow.roles import (build_provenance, captured_refs, open_colocated_store, plan_data,  # noqa: E402
                             target_hf_config)
from draftflow.train.batches import FeatureLoader, ListRefSource, SampleOrder  # noqa: E402
from draftflow.train.trainer import load_target_weights  # noqa: E402

# SpecForge 0.2.0's defaults, read once from its sources (specforge.config.schema needs
# pydantic, which the GPU machine lacks; tests check these still equal the schema's).
SCHEMA = "specforge/config/schema.py"
SPECFORGE_DEFAULTS = {
    "learning_rate": (1e-4, f"{SCHEMA}:523 TrainingConfig.learning_rate"),
    "lr_scheduler": ("cosine", f"{SCHEMA}:524 TrainingConfig.lr_scheduler"),
    "warmup_ratio": (0.015, f"{SCHEMA}:525 TrainingConfig.warmup_ratio"),
    "max_grad_norm": (0.5, f"{SCHEMA}:526 TrainingConfig.max_grad_norm"),
    "ttt_length": (7, f"{SCHEMA}:530 TrainingConfig.ttt_length"),
    "batch_size": (1, f"{SCHEMA}:520 TrainingConfig.batch_size"),
    "accumulation_steps": (1, f"{SCHEMA}:521 TrainingConfig.accumulation_steps"),
    "attention_backend": ("flex_attention", f"{SCHEMA}:531 TrainingConfig.attention_backend"),
    "compact_teacher": (False, f"{SCHEMA}:574 TrainingConfig.compact_teacher"),
    "seed": (42, f"{SCHEMA}:582 TrainingConfig.seed"),
    "torch_dtype": ("bfloat16", f"{SCHEMA}:73 ModelConfig.torch_dtype"),
    "load_target_embedding": (True, f"{SCHEMA}:70 ModelConfig.load_target_embedding"),
    "weight_decay": (0.0, "specforge/optimizer.py:20 BF16Optimizer(weight_decay=0.0)"),
    "ploss_decay": (0.8, "specforge/training/strategies/base.py:147 Eagle3TrainStrategy(ploss_decay=0.8)"),
    "draft_vocab_size": (32000, "specforge/algorithms/eagle3/providers.py:185 TargetDerivedDraftDefaults"),
}
# SpecForge's documented offline EAGLE3 recipe for a Llama target (the repository's
# examples/configs/llama3.1-8b-eagle3-offline.yaml at commit ae91f5b): where it sets a
# value, it wins over the schema default. Its num_epochs (10) is replaced by DraftFlow's.
EXAMPLE = "SpecForge examples/configs/llama3.1-8b-eagle3-offline.yaml@ae91f5b"
EXAMPLE_VALUES = {"batch_size": 1, "learning_rate": 1e-4, "max_grad_norm": 0.5, "ttt_length": 7,
                  "attention_backend": "sdpa", "seed": 0}


def recipe() -> dict[str, dict]:
    """{name: {"value", "source"}}: the example's values over the schema's defaults."""
    out = {k: {"value": v, "source": src} for k, (v, src) in SPECFORGE_DEFAULTS.items()}
    for k, v in EXAMPLE_VALUES.items():
        out[k] = {"value": v, "source": EXAMPLE}
    return out


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- DraftFlow's data ----------------------------------------------------------------

def open_run_data(cfg):
    """(plan, aux layer ids, store, ref source) of the run's captured features, as
    `roles.run_colocated` finds them after its capture."""
    hf_config = target_hf_config(cfg)
    plan = plan_data(cfg, hf_config.vocab_size)
    aux_ids = resolve_aux_layer_ids(cfg.target, hf_config.num_hidden_layers)
    provenance = build_provenance(cfg, hf_config, aux_ids, plan.tokenizer_hash, plan.data_hash)
    store = open_colocated_store(cfg, provenance, os.environ)
    refs = captured_refs(store, plan.prepared.train, cfg.features.root, "run DraftFlow's colocated run first")
    return plan, aux_ids, store, ListRefSource(refs)


def step_loader(store, source, num_samples: int, seed: int, global_batch: int, micro_batch: int,
                num_steps: int, pin_memory: bool) -> FeatureLoader:
    """DraftFlow's loader over DraftFlow's order: step s holds stream positions
    [s x G, (s+1) x G) of the train.seed order, whatever the split into micro-batches."""
    if global_batch % micro_batch:
        raise ValueError(f"--global-batch {global_batch} is not a multiple of --micro-batch {micro_batch}")
    order = SampleOrder(num_samples=num_samples, seed=seed, batch_size=micro_batch,
                        grad_accum=global_batch // micro_batch)
    return FeatureLoader(store, source, order, 0, num_steps, pin_memory=pin_memory)


def specforge_batch(batch, max_length: int):
    """A DraftFlow micro-batch as SpecForge's offline EAGLE3 batch: each sample unpadded,
    normalised by SpecForge's own offline normaliser, then zero-padded by its collator."""
    from specforge.algorithms.common.collation import pad_and_concatenate_features
    from specforge.algorithms.eagle3.data import normalize_offline_sample
    from specforge.runtime.contracts import TrainBatch

    samples = []
    for i, n in enumerate(batch.lengths.tolist()):
        raw = {"aux_hidden_state": batch.aux_hidden[i, :n].to(torch.bfloat16),
               "hidden_state": batch.last_hidden[i, :n].to(torch.bfloat16),
               "input_ids": batch.input_ids[i, :n], "loss_mask": batch.loss_mask[i, :n].long()}
        samples.append(normalize_offline_sample(raw, max_len=max_length))
    keys = ("input_ids", "attention_mask", "loss_mask", "hidden_state", "target")
    tensors = pad_and_concatenate_features(samples, sequence_axes=dict.fromkeys(keys, 1), required_keys=keys)
    return TrainBatch(sample_ids=list(batch.sample_ids), strategy="eagle3", tensors=tensors,
                      metadata={"target_repr": "hidden_state"})


def specforge_vocab_maps(samples, max_length: int, draft_vocab_size: int, target_vocab_size: int):
    """(d2t, t2d) as SpecForge builds them offline (`training/vocab_mapping.py`
    count_effective_feature_tokens, then `data/preprocessing.py`
    process_token_dict_to_mappings, which imports `datasets` and so is not called here;
    tests check this equals it): count each sample's loss-masked ids (first max_length
    tokens) in sample order, pad the counts with ids 0.. at frequency 0 when fewer than
    draft_vocab_size were seen, keep `Counter.most_common(draft_vocab_size)` (ties in
    first-seen order), sorted."""
    counts: Counter = Counter()
    for s in samples:
        ids = torch.as_tensor(s.input_ids)[:max_length]
        mask = torch.as_tensor(s.loss_mask)[:max_length].bool()
        token_ids, freqs = ids[mask].unique(return_counts=True)
        for tok, freq in zip(token_ids.tolist(), freqs.tolist()):
            counts[tok] += freq
    for tok in range(draft_vocab_size):
        if len(counts) >= draft_vocab_size:
            break
        if tok not in counts:
            counts[tok] = 0
    used = sorted(tok for tok, _ in counts.most_common(draft_vocab_size))
    d2t = torch.tensor([tok - i for i, tok in enumerate(used)], dtype=torch.int64)
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[used] = True
    return d2t, t2d


# ---- SpecForge's draft ---------------------------------------------------------------

def write_target_folder(weights, folder: Path) -> Path:
    """The target files SpecForge's loaders read: config.json and a safetensors index
    with the embedding and lm_head DraftFlow trains with."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights.hf_config.save_pretrained(folder)
    tensors = {"model.embed_tokens.weight": weights.embed_weight.detach().to(torch.bfloat16).contiguous(),
               "lm_head.weight": weights.lm_head_weight.detach().to(torch.bfloat16).contiguous()}
    save_file(tensors, str(folder / "model.safetensors"))
    index = {"weight_map": dict.fromkeys(tensors, "model.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def specforge_draft_config(target_folder: Path, aux_ids):
    """SpecForge's draft config derived from the target (no draft_model_config given),
    plus eagle_config naming the layers the features hold."""
    from specforge.algorithms.eagle3.providers import algorithm_providers
    from specforge.training.model_loading import resolve_draft_config

    model = SimpleNamespace(draft_model_config=None, draft_checkpoint_path=None, target_model_path=str(target_folder),
                            cache_dir=None, trust_remote_code=False, draft_num_hidden_layers=None,
                            draft_block_size=None)
    run = SimpleNamespace(model=model, training=SimpleNamespace(strategy="eagle3"))
    config = resolve_draft_config(run, provider=algorithm_providers().model.draft_config)
    config.eagle_config = {"eagle_aux_hidden_state_layer_ids": [int(i) for i in aux_ids],
                           "use_aux_hidden_state": True}
    return config


def build_specforge_draft(draft_config, target_folder: Path, vocab_mapping: Path, backend: str,
                          device: torch.device):
    """As its `build_eagle3_draft`: vocab map, the target's embedding, frozen, bf16."""
    from specforge.modeling.auto import AutoDraftModel

    draft = AutoDraftModel.from_config(draft_config, attention_backend=backend, torch_dtype=torch.bfloat16)
    draft.load_vocab_mapping(str(vocab_mapping))
    draft.load_embedding(str(target_folder), embedding_key="model.embed_tokens.weight")
    draft.freeze_embedding()
    return draft.to(device=device, dtype=torch.bfloat16)


def build_training(draft, target_folder: Path, values: dict, total_steps: int, device: torch.device):
    """SpecForge's strategy and optimizer around `draft` (module docstring)."""
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.training.strategies.base import Eagle3TrainStrategy

    model = OnlineEagle3Model(draft_model=draft, length=values["ttt_length"],
                              attention_backend=values["attention_backend"]).to(device=device, dtype=torch.bfloat16)
    head = TargetHead.from_pretrained(str(target_folder)).to(device)
    strategy = Eagle3TrainStrategy(model, target_head=head, ploss_decay=values["ploss_decay"],
                                   compact_teacher=values["compact_teacher"])
    optimizer = BF16Optimizer(draft, lr=values["learning_rate"], weight_decay=values["weight_decay"],
                              max_grad_norm=values["max_grad_norm"], total_steps=total_steps,
                              warmup_ratio=values["warmup_ratio"], lr_scheduler=values["lr_scheduler"])
    return strategy, optimizer


def save_specforge_draft(draft, out_dir: Path) -> Path:
    """The serving folder as SpecForge's `export_to_sglang` writes it, from the live draft
    instead of a SpecForge training checkpoint."""
    from specforge.export.checkpoint_io import apply_legacy_rope_scaling
    from specforge.export.to_sglang import WEIGHT_MAPS, _serving_state

    state = {k: v for k, v in draft.state_dict().items() if "embed" not in k.lower()}
    draft.save_pretrained(str(out_dir), state_dict=_serving_state(state, WEIGHT_MAPS[type(draft).__name__]))
    apply_legacy_rope_scaling(str(out_dir))
    return out_dir


# ---- training ------------------------------------------------------------------------

def train(strategy, optimizer, loader, num_steps: int, max_length: int, log_every: int, device) -> dict:
    """The optimizer steps; returns the curve and throughput."""
    from specforge.training.strategies.base import StepContext

    curve, num_tokens = [], 0
    start = time.perf_counter()
    for step in range(num_steps):
        micro_batches = loader.next(step)
        losses, accs = [], []
        for mb in micro_batches:
            out = strategy.forward_loss(specforge_batch(mb, max_length), StepContext(step, num_steps))
            (out.loss / len(micro_batches)).backward()  # TrainerCore.train_step: loss / accumulation_steps
            losses.append(float(out.loss.detach()))
            accs.append([float(a) for a in out.metrics["acces"]])
            num_tokens += mb.num_tokens
        lr = optimizer.get_learning_rate()
        grad_norm = optimizer.step()  # clips, AdamW on the float32 masters, copies back, zeroes grads
        if step % log_every == 0 or step == num_steps - 1:
            row = {"step": step + 1, "loss": sum(losses) / len(losses), "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "acc": [sum(col) / len(col) for col in zip(*accs)], "tokens": num_tokens,
                   "elapsed_s": time.perf_counter() - start}
            curve.append(row)
            progress(f"step {step + 1}/{num_steps} loss {row['loss']:.4f} acc0 {row['acc'][0]:.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    return {"curve": curve, "num_tokens": num_tokens, "wall_s": wall,
            "tokens_per_s": num_tokens / wall if wall else None, "gpu_hours": wall / 3600 if device.type == "cuda"
            else 0.0}


# ---- the run -------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True, help="the DraftFlow config of the run with captured features")
    p.add_argument("--out", required=True, help="folder for the draft, the target head folder and the JSON")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (training and evaluation)")
    p.add_argument("--global-batch", type=int, help="samples per optimizer step (default: DraftFlow's, "
                   "train.batch_size x train.grad_accum x --draftflow-world-size)")
    p.add_argument("--draftflow-world-size", type=int, default=1, help="ranks DraftFlow trained on")
    p.add_argument("--epochs", type=float, help="passes over the samples (default: DraftFlow's, "
                   "train.max_steps x global batch / samples)")
    p.add_argument("--micro-batch", type=int, help="samples per forward (default: the recipe's batch_size)")
    p.add_argument("--draft-vocab-size", type=int, help="default: the recipe's 32000, or the target's vocab "
                   "when smaller (SpecForge's generated config would ask for more ids than exist)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--eval-dtype", default="float32", help="target dtype during evaluation (lossless in float32)")
    p.add_argument("--draftflow-draft", help="DraftFlow's draft to evaluate beside (default: train.output_dir/final "
                   "when it exists)")
    p.add_argument("--cpu-smoke", action="store_true", help="no training (Triton): data, vocab, draft, save, "
                   "load and evaluate a random-initialised SpecForge draft")
    p.add_argument("--skip-eval", action="store_true", help="train and save only; evaluate later with "
                   "`draftflow evaluate --draft OUT/specforge_draft`")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="DraftFlow config overrides")
    return p.parse_args(argv)


def schedule(cfg, args, num_samples: int) -> dict:
    """Global batch, optimizer steps and epochs: DraftFlow's unless given."""
    global_batch = args.global_batch or cfg.train.batch_size * cfg.train.grad_accum * args.draftflow_world_size
    if args.epochs is not None:
        num_steps = max(1, round(args.epochs * num_samples / global_batch))
    else:
        num_steps = cfg.train.max_steps
    return {"global_batch": global_batch, "num_steps": num_steps, "epochs": num_steps * global_batch / num_samples}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config([args.config], [f"train.device={args.device}", f"capture.device={args.device}",
                                      *args.overrides])
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    values = {k: v["value"] for k, v in recipe().items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan, aux_ids, store, source = open_run_data(cfg)
    sched = schedule(cfg, args, source.num_samples)
    micro = args.micro_batch or values["batch_size"]
    weights = load_target_weights(cfg.target)
    target_folder = write_target_folder(weights, out / "target_head")
    draft_config = specforge_draft_config(target_folder, aux_ids)
    draft_config.draft_vocab_size = args.draft_vocab_size or min(values["draft_vocab_size"], draft_config.vocab_size)
    d2t, t2d = specforge_vocab_maps(plan.prepared.train, cfg.data.max_length, draft_config.draft_vocab_size,
                                    draft_config.vocab_size)
    torch.save({"d2t": d2t, "t2d": t2d}, out / "vocab_mapping.pt")
    torch.manual_seed(values["seed"])
    draft = build_specforge_draft(draft_config, target_folder, out / "vocab_mapping.pt",
                                  values["attention_backend"], device)
    num_steps = 0 if args.cpu_smoke else sched["num_steps"]
    loader = step_loader(store, source, source.num_samples, cfg.train.seed, sched["global_batch"], micro,
                         max(num_steps, 1), pin_memory=device.type == "cuda")
    result = {"benchmark": "specforge_quality", "date": datetime.date.today().isoformat(),
              "specforge_version": dist_version("specforge"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "settings": {"args": vars(args), "config": cfg.to_dict(), "aux_layer_ids": aux_ids,
                           "num_samples": source.num_samples, "micro_batch": micro,
                           "accumulation_steps": sched["global_batch"] // micro, **sched},
              "recipe": recipe(), "draft_config": draft_config.to_dict()}
    try:
        if args.cpu_smoke:  # the first step's batches in SpecForge's form, no forward
            result["smoke_batches"] = [list(specforge_batch(mb, cfg.data.max_length).tensors["input_ids"].shape)
                                       for mb in loader.next(0)]
        else:
            progress(f"specforge: {num_steps} steps of {sched['global_batch']} samples ({sched['epochs']:.2f} epochs)")
            strategy, optimizer = build_training(draft, target_folder, values, num_steps, device)
            result["train"] = train(strategy, optimizer, loader, num_steps, cfg.data.max_length, args.log_every,
                                    device)
    finally:
        loader.close()
        store.close()
    draft_dir = save_specforge_draft(draft, out / "specforge_draft")
    load_exported_draft(draft_dir, weights.embed_weight, aux_ids)  # refuses a draft the evaluator cannot read
    if args.skip_eval:
        path = write_json(result, out / "specforge_quality.json")
        print(f"draft: {draft_dir}\nreport: {path}")
        return 0
    drafts = {"specforge": draft_dir}
    ours = Path(args.draftflow_draft) if args.draftflow_draft else Path(cfg.train.output_dir) / "final"
    if ours.is_dir():
        drafts["draftflow"] = ours
    eval_cfg = replace(cfg, capture=replace(cfg.capture, dtype=args.eval_dtype))
    result["results"] = evaluate_drafts(eval_cfg, drafts, args.depth, args.max_new_tokens, args.num_prompts)
    path = write_json(result, out / "specforge_quality.json")
    print("\n".join(summary_lines(result["results"])))
    print(f"report: {path}")
    return 0 if all(r["lossless"] for r in result["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
