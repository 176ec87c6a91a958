"""The draft model: TTT semantics, serving-style decoding, export layout, vocab maps."""

import json

import pytest
import torch
from safetensors import safe_open

from draftflow.evaluate import read_draft_config
from draftflow.export import EXPORT_NAMES, export_draft, serving_config, sglang_layer_ids
from draftflow.families import serving_warnings
from draftflow.train.model import DraftCache, DraftModelConfig, Eagle3Draft, decode_step
from draftflow.train.vocab import build_draft_vocab, vocab_maps


def tiny_cfg(**kw) -> DraftModelConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, vocab_size=50, draft_vocab_size=20, target_hidden_size=32, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                max_position_embeddings=128, aux_layer_ids=(1, 3, 4))
    base.update(kw)
    return DraftModelConfig(**base)


def make_draft(seed=0, **kw) -> Eagle3Draft:
    torch.manual_seed(seed)
    d = Eagle3Draft(tiny_cfg(**kw))
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, 0.3)
    return d.double()


@pytest.mark.parametrize("norm_before_fc,norm_output", [(False, False), (True, False), (False, True), (True, True)])
def test_chain_decoding_matches_ttt_training_forward(norm_before_fc, norm_output):
    """Drafting k tokens with a KV cache (as when serving) gives the same hidden
    states as TTT step k at the same position: the training semantics are the
    serving semantics, with and without the EAGLE-3.1 switches."""
    draft = make_draft(norm_before_fc=norm_before_fc, norm_output=norm_output)
    T, K = 9, 4
    ids = torch.randint(0, 50, (1, T))
    aux = torch.randn(1, T, 96, dtype=torch.float64)
    hiddens = dict(draft.unroll(ids, aux, K))  # ids here stand for "token t+1" at position t
    for t in range(T - K):
        cache = DraftCache()
        h = decode_step(draft, ids[:, : t + 1], draft.project_aux(aux[:, : t + 1]), torch.arange(t + 1)[None], cache)
        assert torch.allclose(h[:, t], hiddens[0][:, t], atol=1e-10)
        h_prev = h[:, t : t + 1]
        for k in range(1, K):
            # the token fed at step k is the one TTT feeds at position t: ids[t + k]
            h_prev = decode_step(draft, ids[:, t + k : t + k + 1], draft.carry(h_prev), torch.tensor([[t + k]]), cache)
            assert torch.allclose(h_prev[:, 0], hiddens[k][:, t], atol=1e-10), (t, k)


def test_ttt_step_does_not_see_future_positions():
    draft = make_draft()
    ids = torch.randint(0, 50, (1, 8))
    aux = torch.randn(1, 8, 96, dtype=torch.float64)
    base = dict(draft.unroll(ids, aux, 3))
    aux2 = aux.clone()
    aux2[:, 5:] += 1.0
    changed = dict(draft.unroll(ids, aux2, 3))
    for k in range(3):
        assert torch.equal(base[k][:, :5], changed[k][:, :5])


def test_vocab_picks_most_frequent_assistant_tokens():
    class S:
        def __init__(self, ids, mask):
            self.input_ids, self.loss_mask = torch.tensor(ids), torch.tensor(mask)

    samples = [S([5, 7, 7, 9, 9, 9], [0, 1, 1, 1, 1, 1]), S([3, 9, 2], [1, 1, 0])]
    assert build_draft_vocab(samples, 3, 10) == [3, 7, 9]
    # fewer assistant tokens than asked: unmasked ones, then the smallest free ids
    assert build_draft_vocab(samples, 6, 10) == [0, 2, 3, 5, 7, 9]
    d2t, t2d = vocab_maps([3, 7, 9], 10)
    assert (torch.arange(3) + d2t).tolist() == [3, 7, 9]
    assert t2d.nonzero().flatten().tolist() == [3, 7, 9]
    with pytest.raises(ValueError, match="outside the target vocab"):
        build_draft_vocab([S([12], [1])], 3, 10)


def test_export_writes_exact_serving_names_and_config(tmp_path):
    draft = make_draft()
    out = export_draft(draft.state_dict(), draft.cfg, tmp_path / "final")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert names == set(EXPORT_NAMES)
        assert f.get_tensor("fc.weight").shape == (32, 96)
        assert f.get_tensor("midlayer.self_attn.q_proj.weight").shape == (32, 64)
        assert f.get_tensor("midlayer.self_attn.k_proj.weight").shape == (16, 64)
        assert f.get_tensor("lm_head.weight").shape == (20, 32)
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
        assert f.get_tensor("t2d").shape == (50,)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["draft_vocab_size"] == 20 and cfg["vocab_size"] == 50
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]  # vLLM: inputs of the next layers
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # SGLang (Llama): outputs
    assert cfg["norm_output"] is False and cfg["eagle_config"]["norm_before_fc"] is False


def test_sglang_layer_ids_follow_the_target_family():
    """SGLang 0.5.23 reads most families' ids as layer outputs; DeepSeek-V2/V3 and
    GLM-4-MoE-Lite as outputs only when the first id is 1, as layer inputs otherwise."""
    assert sglang_layer_ids([0, 3, 4], "llama") == [0, 3, 4]
    assert sglang_layer_ids([1, 14, 26], "qwen3") == [1, 14, 26]
    assert sglang_layer_ids([1, 14, 26], "deepseek_v3") == [1, 14, 26]  # first id 1: outputs, as is
    assert sglang_layer_ids([2, 14, 26], "deepseek_v3") == [3, 15, 27]  # inputs of the next layers
    assert serving_warnings([1, 3, 4], "deepseek_v3") == []
    assert serving_warnings([0, 3, 4], "llama") == []
    (warning,) = serving_warnings([0, 3, 4], "glm4_moe_lite")
    assert "SGLang" in warning and "first layer of 1 or more" in warning
    cfg = serving_config(tiny_cfg(aux_layer_ids=(2, 5, 9)), target_model_type="deepseek_v2")
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [3, 6, 10]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [3, 6, 10]


def test_export_of_eagle31_draft_carries_its_switches(tmp_path):
    """norm_before_fc exports `input_norm.weight` (both engines' name) and both switches
    in config.json; the folder reads back as the same draft, and the switches change
    what the draft computes."""
    draft = make_draft(norm_before_fc=True, norm_output=True)
    out = export_draft(draft.state_dict(), draft.cfg, tmp_path / "final", dtype=torch.float32)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(EXPORT_NAMES) | {"input_norm.weight"}
        assert torch.equal(f.get_tensor("input_norm.weight"), draft.input_norm.weight.float())
    raw = json.loads((out / "config.json").read_text())
    assert raw["norm_output"] is True and raw["eagle_config"]["norm_before_fc"] is True
    assert read_draft_config(out / "config.json") == draft.cfg
    ids, aux = torch.randint(0, 50, (1, 6)), torch.randn(1, 6, 96, dtype=torch.float64)
    plain = Eagle3Draft(tiny_cfg()).double()  # the same weights without the switches
    plain.load_state_dict({k: v for k, v in draft.state_dict().items() if k != "input_norm.weight"})
    with torch.no_grad():
        h31, h = dict(draft.unroll(ids, aux, 2)), dict(plain.unroll(ids, aux, 2))
    assert not torch.allclose(h31[1], h[1])


def test_export_refuses_incomplete_state(tmp_path):
    draft = make_draft()
    state = {k: v for k, v in draft.state_dict().items() if k != "norm.weight"}
    with pytest.raises(ValueError, match="norm.weight"):
        export_draft(state, draft.cfg, tmp_path / "x")
