"""The memory model behind `train.recompute: auto` and auto's choice, on fake card sizes (no CUDA needed)."""

import dataclasses

import pytest
import torch

from draftflow.train import loss as loss_module
from draftflow.train import memory
from draftflow.train.loss import DraftLoss, Teacher, prepare
from draftflow.train.memory import GIB, HEADROOM, choose_recompute, predicted_peak_bytes
from draftflow.train.model import DraftModelConfig, Eagle3Draft

LLAMA31_8B = DraftModelConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                              head_dim=128, vocab_size=128256, draft_vocab_size=32000, target_hidden_size=4096,
                              rms_norm_eps=1e-5, max_position_embeddings=131072, aux_layer_ids=(1, 15, 28))
H200, H100 = 143771 * 2 ** 20, 81559 * 2 ** 20  # total_memory as torch reports them
TTT = 7


def rows(t: int) -> dict:
    """The benchmark's batch: every position learns (step k has t - 2 - k rows)."""
    return dict(head_rows=sum(t - 2 - k for k in range(TTT)), teacher_rows=t - 2)


def peak_gib(t: int, head: bool, layer: bool) -> float:
    return predicted_peak_bytes(LLAMA31_8B, t, TTT, head, layer, **rows(t)) / GIB


@pytest.mark.parametrize("t, head, layer, measured, slack", [
    (2048, False, False, 14.2, 2.0), (8192, False, False, 32.5, 2.0), (32768, True, True, 40.7, 2.0),
    (65536, True, False, 112.2, 2.0), (65536, True, True, 71.2, 2.0), (131072, True, True, 132.3, 3.0),
    (32768, False, False, 101.6, 6.0)])
def test_prediction_is_at_or_just_above_the_measured_h200_peaks(t, head, layer, measured, slack):
    """docs/benchmarks.md's peaks (2026-11-26 and 2026-12-02) calibrate the model; it
    may err high (a needless recompute), never low (an out-of-memory crash). The
    32k keep-everything point is its worst, 5.5 GiB high."""
    assert measured <= peak_gib(t, head, layer) <= measured + slack


def test_h200_keeps_everything_at_32k_recomputes_the_head_at_64k_and_both_at_128k():
    got = {t: choose_recompute(LLAMA31_8B, t, TTT, H200, **rows(t)) for t in (2048, 8192, 32768, 65536, 131072)}
    assert [(p.head, p.layer) for p in got.values()] == [(False, False)] * 3 + [(True, False), (True, True)]
    assert all(p.fits for t, p in got.items() if t < 131072)
    assert got[32768].predicted_bytes <= H200 * (1 - HEADROOM) < predicted_peak_bytes(
        LLAMA31_8B, 65536, TTT, False, False, **rows(65536))


def test_a_smaller_card_recomputes_sooner():
    got = {t: choose_recompute(LLAMA31_8B, t, TTT, H100, **rows(t)) for t in (8192, 32768)}
    assert (got[8192].head, got[8192].layer) == (False, False)
    assert (got[32768].head, got[32768].layer) == (True, False)


def test_when_nothing_fits_auto_recomputes_both_and_says_so():
    plan = choose_recompute(LLAMA31_8B, 131072, TTT, H100, **rows(131072))
    assert (plan.head, plan.layer, plan.fits) == (True, True, False)
    assert plan.predicted_bytes == predicted_peak_bytes(LLAMA31_8B, 131072, TTT, True, True, **rows(131072))


def _card_where_both_single_options_fit_but_not_nothing(cfg, t):
    singles = max(predicted_peak_bytes(cfg, t, TTT, head, not head) for head in (True, False))
    nothing = predicted_peak_bytes(cfg, t, TTT, False, False)
    assert singles < nothing
    return int((singles + nothing) / 2 / (1 - HEADROOM))


@pytest.mark.parametrize("draft_vocab, head_first", [(32000, True), (6000, False)])
def test_the_single_option_saving_most_memory_per_extra_flop_comes_first(draft_vocab, head_first):
    """A large draft vocab makes the head the cheaper saving; with a small one the head
    saves little for its FLOPs (8 B against 2*H FLOPs per logit, less its kept input
    row and the layer output it no longer shares), and the layer goes first."""
    cfg = dataclasses.replace(LLAMA31_8B, draft_vocab_size=draft_vocab)
    plan = choose_recompute(cfg, 32768, TTT, _card_where_both_single_options_fit_but_not_nothing(cfg, 32768))
    assert (plan.head, plan.layer) == (head_first, not head_first)


def test_the_head_chunk_the_model_counts_is_the_loss_chunk():
    assert memory.HEAD_CHUNK_ROWS == loss_module.CHUNK_ROWS


def _tiny_loss(mode: str):
    cfg = DraftModelConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=8, vocab_size=30, draft_vocab_size=30, target_hidden_size=16, rms_norm_eps=1e-6,
                           max_position_embeddings=64, aux_layer_ids=(0, 1, 2))
    draft = Eagle3Draft(cfg)
    draft.t2d.fill_(True)
    teacher = Teacher(torch.randn(30, 16), torch.arange(30))
    batch = dict(input_ids=torch.randint(0, 30, (1, 12)), loss_mask=torch.ones(1, 12, dtype=torch.uint8),
                 aux_hidden=torch.randn(1, 12, 48), last_hidden=torch.randn(1, 12, 16), lengths=torch.tensor([12]))
    return cfg, DraftLoss(draft, teacher, 3, 0.8, recompute=mode), type("Batch", (), {
        **batch, "to": lambda self, device: self})()


@pytest.mark.parametrize("mode, expected", [("auto", (False, False)), ("never", (False, False)),
                                            ("always", (True, True))])
def test_draft_loss_plan_on_cpu_follows_the_mode_and_predicts_the_peak_of_its_choice(mode, expected):
    cfg, module, batch = _tiny_loss(mode)
    inputs = prepare(module.teacher, batch, 3)
    plan = module.plan(inputs)
    assert (plan.head, plan.layer) == expected and plan.fits is None
    assert plan.predicted_bytes == predicted_peak_bytes(
        cfg, 12, 3, *expected, head_rows=sum(r.numel() for r in inputs.rows.draft),
        teacher_rows=inputs.rows.teacher.numel())
