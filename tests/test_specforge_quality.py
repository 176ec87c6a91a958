"""benchmarks/specforge_quality.py without its GPU part (SpecForge's loss is a Triton
kernel): it reads exactly the samples DraftFlow trains on, builds SpecForge's vocab map
and draft by SpecForge's rules, and its saved draft loads into DraftFlow's evaluator,
which is lossless on it. Skipped when specforge is not importable."""

import inspect
import json
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("specforge")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import specforge_quality as sq  # noqa: E402

from draftflow.config import load_config  # noqa: E402
from draftflow.evaluate import load_exported_draft, read_draft_config  # noqa: E402
from draftflow.roles import run_colocated  # noqa: E402
from draftflow.stores import StoreError  # noqa: E402
from draftflow.train.batches import SampleOrder  # noqa: E402
from draftflow.train.trainer import load_target_weights  # noqa: E402

TINY = REPO / "examples" / "tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny colocated DraftFlow run (captured features, trained and exported draft)."""
    root = tmp_path_factory.mktemp("sfq")
    overrides = [f"features.root={root / 'features'}", f"train.output_dir={root / 'run'}", "train.max_steps=3",
                 "train.progress=false", "capture.device=cpu", "train.device=cpu"]
    run_colocated(load_config([TINY], overrides))
    return root, overrides


@pytest.fixture(scope="module")
def cfg(run):
    return load_config([TINY], run[1])


def test_reads_exactly_the_samples_and_features_draftflow_trains_on(cfg):
    plan, aux_ids, store, source = sq.open_run_data(cfg)
    by_index = {s.index: s for s in plan.prepared.train}
    ours = SampleOrder(num_samples=source.num_samples, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                       grad_accum=cfg.train.grad_accum)
    loader = sq.step_loader(store, source, source.num_samples, cfg.train.seed, global_batch=4, micro_batch=1,
                            num_steps=3, pin_memory=False)
    try:
        for step in range(3):
            micro = loader.next(step)
            assert len(micro) == 4
            trained = [by_index[i] for indices in ours.micro_batches(step) for i in indices]
            assert [b.sample_ids[0] for b in micro] == [s.sample_id for s in trained]
            for batch, sample in zip(micro, trained):
                n = int(batch.lengths[0])
                assert torch.equal(batch.input_ids[0, :n], sample.input_ids.long())
                assert torch.equal(batch.loss_mask[0, :n], sample.loss_mask)
                assert batch.aux_hidden.shape[-1] == 3 * batch.last_hidden.shape[-1]
    finally:
        loader.close()
        store.close()
    assert aux_ids == [1, 3, 4]


def test_specforge_batch_is_its_offline_normalisation(cfg):
    plan, _, store, source = sq.open_run_data(cfg)
    loader = sq.step_loader(store, source, source.num_samples, cfg.train.seed, 4, 2, 1, pin_memory=False)
    try:
        micro = loader.next(0)
    finally:
        loader.close()
        store.close()
    batch = micro[0]
    sf = sq.specforge_batch(batch, cfg.data.max_length)
    t = sf.tensors
    assert sf.metadata == {"target_repr": "hidden_state"} and sf.sample_ids == list(batch.sample_ids)
    assert t["hidden_state"].dtype == torch.bfloat16 and t["target"].shape == batch.last_hidden.shape
    for i, n in enumerate(batch.lengths.tolist()):
        assert torch.equal(t["input_ids"][0 + i, :n], batch.input_ids[i, :n])
        assert t["attention_mask"][i, :n].all() and not t["attention_mask"][i, n:].any()
        # SpecForge's normaliser drops each sample's last loss position; the rest is DraftFlow's mask
        assert torch.equal(t["loss_mask"][i, : n - 1], batch.loss_mask[i, : n - 1].long())
        assert t["loss_mask"][i, n - 1:].sum() == 0


@pytest.mark.parametrize("draft_vocab", [50, 200, 259])
def test_vocab_maps_equal_specforges_own(cfg, monkeypatch, draft_vocab):
    """SpecForge's process_token_dict_to_mappings, fed its offline counting, gives the same
    maps (its module imports `datasets` only for a type hint: stubbed here)."""
    pytest.importorskip("pydantic")
    pytest.importorskip("tqdm")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(Dataset=object))
    monkeypatch.delitem(sys.modules, "specforge.data.preprocessing", raising=False)
    from collections import Counter

    from specforge.data.preprocessing import process_token_dict_to_mappings

    samples = sq.plan_data(cfg, 259).prepared.train
    counts = Counter()
    for s in samples:  # count_effective_feature_tokens, one "feature file" per sample
        selected = s.input_ids[: cfg.data.max_length][s.loss_mask[: cfg.data.max_length].bool()].long()
        ids, freqs = selected.unique(return_counts=True)
        for tok, freq in zip(ids.tolist(), freqs.tolist()):
            counts[tok] += freq
    want_d2t, want_t2d = process_token_dict_to_mappings(counts, draft_vocab, 259)
    d2t, t2d = sq.specforge_vocab_maps(samples, cfg.data.max_length, draft_vocab, 259)
    assert torch.equal(d2t, want_d2t) and torch.equal(t2d, want_t2d)
    assert int(t2d.sum()) == draft_vocab


def test_recipe_defaults_still_equal_specforges_schema():
    pytest.importorskip("pydantic")
    from specforge.algorithms.eagle3.providers import algorithm_providers
    from specforge.config.schema import ModelConfig, TrainingConfig
    from specforge.optimizer import BF16Optimizer
    from specforge.training.strategies.base import Eagle3TrainStrategy

    for name, (value, source) in sq.SPECFORGE_DEFAULTS.items():
        if "TrainingConfig" in source:
            assert TrainingConfig.model_fields[name].default == value, name
        elif "ModelConfig" in source:
            assert ModelConfig.model_fields[name].default == value, name
    assert inspect.signature(BF16Optimizer).parameters["weight_decay"].default == 0.0
    assert inspect.signature(Eagle3TrainStrategy).parameters["ploss_decay"].default == 0.8
    defaults = algorithm_providers().model.draft_config.target_defaults
    assert defaults.draft_vocab_size == sq.SPECFORGE_DEFAULTS["draft_vocab_size"][0]
    assert sq.recipe()["attention_backend"] == {"value": "sdpa", "source": sq.EXAMPLE}


def test_cpu_smoke_saves_a_specforge_draft_draftflow_evaluates_losslessly(run, cfg):
    root, overrides = run
    out = root / "specforge"
    rc = sq.main(["-c", str(TINY), "--out", str(out), "--device", "cpu", "--cpu-smoke", "--draft-vocab-size", "200",
                  "--num-prompts", "2", "--max-new-tokens", "16", *overrides])
    assert rc == 0
    report = json.loads((out / "specforge_quality.json").read_text())
    assert set(report["results"]) == {"specforge", "draftflow"}
    assert all(r["lossless"] for r in report["results"].values())
    assert report["settings"]["global_batch"] == 4 and report["settings"]["num_steps"] == 3
    assert report["smoke_batches"] and report["recipe"]["learning_rate"]["value"] == 1e-4
    draft_dir = out / "specforge_draft"
    config = json.loads((draft_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 200
    assert list(read_draft_config(draft_dir / "config.json").aux_layer_ids) == [1, 3, 4]
    # what was saved is SpecForge's draft, maps included, as the evaluator reads it
    mapping = torch.load(out / "vocab_mapping.pt")
    draft = load_exported_draft(draft_dir, load_target_weights(cfg.target).embed_weight, [1, 3, 4])
    state = draft.state_dict()
    assert torch.equal(state["d2t"], mapping["d2t"]) and torch.equal(state["t2d"], mapping["t2d"])


def test_training_parts_build_on_the_recipe(run, cfg):
    """SpecForge's strategy and optimizer around its draft (the forward needs a GPU)."""
    pytest.importorskip("triton")
    root, _ = run
    weights = load_target_weights(cfg.target)
    folder = sq.write_target_folder(weights, root / "head")
    config = sq.specforge_draft_config(folder, [1, 3, 4])
    config.draft_vocab_size = 259
    torch.save({"d2t": torch.zeros(259, dtype=torch.int64), "t2d": torch.ones(259, dtype=torch.bool)},
               root / "identity.pt")
    values = {k: v["value"] for k, v in sq.recipe().items()}
    draft = sq.build_specforge_draft(config, folder, root / "identity.pt", values["attention_backend"],
                                     torch.device("cpu"))
    assert not draft.embed_tokens.weight.requires_grad
    assert torch.equal(draft.embed_tokens.weight.float(), weights.embed_weight.to(torch.bfloat16).float())
    strategy, optimizer = sq.build_training(draft, folder, values, total_steps=100, device=torch.device("cpu"))
    assert optimizer.max_grad_norm == 0.5 and optimizer.lr_scheduler_type == "cosine"
    assert strategy.ploss_decay == 0.8


def test_bad_input_is_refused_naming_what_to_do(run, tmp_path):
    empty = load_config([TINY], [*run[1], f"features.root={tmp_path / 'nothing-captured'}"])
    with pytest.raises(StoreError, match=r"nothing-captured: \d+ of \d+ samples are not captured .* colocated run"):
        sq.open_run_data(empty)
    with pytest.raises(ValueError, match=r"--global-batch 6 is not a multiple of --micro-batch 4"):
        sq.step_loader(None, None, 8, 0, global_batch=6, micro_batch=4, num_steps=1, pin_memory=False)
