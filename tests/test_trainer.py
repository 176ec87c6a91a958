"""Trainer: loss normalisation, exact resume, falling loss, shape checks."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftflow.config import load_config
from draftflow.control.manifest import ManifestError
from draftflow.roles import run_colocated
from draftflow.train.batches import SampleOrder, collate
from draftflow.train.loss import DraftLoss, Teacher, prepare, ttt_loss
from draftflow.train.metrics import read_metrics
from draftflow.train.model import DraftModelConfig, Eagle3Draft

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"


def tiny_config(tmp: Path, *overrides: str):
    return load_config([TINY], [f"features.root={tmp / 'feat'}", f"train.output_dir={tmp / 'run'}",
                                "train.progress=false", "train.tensorboard=false", *overrides])


def test_padding_and_prompt_only_samples_do_not_change_the_loss():
    """Loss is normalised by valid positions: adding a padded sample with no
    assistant tokens leaves loss and gradients of the others unchanged."""
    torch.manual_seed(0)
    cfg = DraftModelConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=8, vocab_size=30, draft_vocab_size=30, target_hidden_size=16,
                           rms_norm_eps=1e-6, max_position_embeddings=64, aux_layer_ids=(0, 1, 2))
    draft = Eagle3Draft(cfg).double()
    draft.d2t.zero_()
    draft.t2d.fill_(True)
    teacher = Teacher(torch.randn(30, 16, dtype=torch.float64) * 3, torch.arange(30))

    def sample(t, masked):
        return {"input_ids": torch.randint(0, 30, (t,)), "loss_mask": torch.full((t,), int(masked), dtype=torch.uint8),
                "aux_hidden": torch.randn(t, 48, dtype=torch.float64), "last_hidden": torch.randn(t, 16, dtype=torch.float64)}

    a, b = sample(12, True), sample(7, False)

    def loss_and_grad(batch):
        draft.zero_grad()
        x = prepare(teacher, batch, 3, chunk=8)  # two chunks of rows
        loss = ttt_loss(draft, x, 0.8, x.counts().tolist(), chunk=8).loss
        loss.backward()
        return loss.detach(), draft.fc.weight.grad.clone()

    l1, g1 = loss_and_grad(collate([a], ["a"]))
    l2, g2 = loss_and_grad(collate([a, b], ["a", "b"]))
    assert torch.allclose(l1, l2, atol=1e-12) and torch.allclose(g1, g2, atol=1e-12)


def test_row_gathered_loss_equals_the_dense_masked_definition():
    """The loss runs the teacher and the draft head only on the rows that learn; it
    equals the definition over every position of the padded batch: step k at t learns
    the teacher at t+1+k when token t+2+k exists, is an assistant token and the
    teacher's argmax is in the draft vocab (here ids 0..19 of 30)."""
    torch.manual_seed(1)
    cfg = DraftModelConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=8, vocab_size=30, draft_vocab_size=20, target_hidden_size=16,
                           rms_norm_eps=1e-6, max_position_embeddings=64, aux_layer_ids=(0, 1, 2))
    draft = Eagle3Draft(cfg).double()
    draft.t2d[:20] = True
    teacher = Teacher(torch.randn(30, 16, dtype=torch.float64) * 3, torch.arange(20))

    def sample(t, prompt):
        mask = torch.ones(t, dtype=torch.uint8)
        mask[:prompt] = 0
        return {"input_ids": torch.randint(0, 30, (t,)), "loss_mask": mask,
                "aux_hidden": torch.randn(t, 48, dtype=torch.float64), "last_hidden": torch.randn(t, 16, dtype=torch.float64)}

    batch = collate([sample(13, 4), sample(9, 6), sample(3, 0)], ["a", "b", "c"])
    steps, decay = 4, 0.8
    draft.zero_grad()
    x = prepare(teacher, batch, steps, chunk=5)
    out = ttt_loss(draft, x, decay, x.counts().tolist(), chunk=5)
    loss = out.loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}

    draft.zero_grad()
    dense = teacher(batch.last_hidden)  # [B, T, ...] at every position
    ids_next = torch.nn.functional.pad(batch.input_ids[:, 1:], (0, 1))
    ref, counts, loss_rows, hits = torch.zeros(()), [], [], []
    for k, hidden in draft.unroll(ids_next, batch.aux_hidden, steps):
        log_q = torch.log_softmax(draft.logits(hidden).float(), -1)  # as the head: float32 log-probs
        rows = [(b, t) for b in range(3) for t in range(int(batch.lengths[b]))
                if t + 2 + k < batch.lengths[b] and batch.loss_mask[b, t + 2 + k]]
        terms = [-(dense.log_probs[b, t + 1 + k].exp() * log_q[b, t]).sum()
                 for b, t in rows if dense.valid[b, t + 1 + k]]
        counts.append(len(terms))
        ref = ref + decay ** k * torch.stack(terms).sum() / len(terms)
        # acc_k as SpecForge defines it: hits over every loss position, the ones whose
        # target argmax the draft vocab cannot express included (draft id = target id here)
        loss_rows.append(len(rows))
        hits.append(sum(int(log_q[b, t].argmax() == dense.argmax[b, t + 1 + k]) for b, t in rows))
    ref.backward()
    assert counts == x.counts().tolist() and 0 < counts[-1] < counts[0]
    assert x.counts_all().tolist() == loss_rows and all(c < r for c, r in zip(counts, loss_rows))
    assert out.correct.shape == (steps,) and out.correct.long().tolist() == hits
    assert torch.allclose(loss, ref, rtol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, draft.get_parameter(name).grad, rtol=1e-5, atol=1e-8), name


def test_sample_order_covers_each_epoch_once_across_ranks_without_tail_drop():
    """2 ranks x 3 samples per step over 10 samples: every epoch is a permutation,
    the stream crosses the epoch boundary instead of dropping the tail."""
    orders = [SampleOrder(num_samples=10, seed=3, batch_size=3, grad_accum=1, world_size=2, rank=r)
              for r in range(2)]
    stream = []
    for step in range(5):  # 30 samples = 3 epochs
        for order in orders:
            stream.extend(order.micro_batches(step)[0])
    for epoch in range(3):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled per epoch
    # a pure function of the step: what resume relies on
    assert orders[0].micro_batches(4) == SampleOrder(10, 3, 3, 1, 2, 0).micro_batches(4)


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    overrides = ("train.max_steps=6", "data.max_samples=12", "train.batch_size=2", "train.grad_accum=2",
                 "train.log_every=1")
    straight = tiny_config(tmp_path / "a", *overrides)
    run_colocated(straight)
    interrupted = tiny_config(tmp_path / "b", *overrides)
    first = run_colocated(interrupted, stop_after=3)
    assert first.checkpoint.name == "step_00000003" and first.final_dir is None
    resumed = run_colocated(interrupted)  # a fresh trainer: loads step 3, skips captured samples
    wa = load_file(str(tmp_path / "a/run/final/model.safetensors"))
    wb = load_file(str(tmp_path / "b/run/final/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = read_metrics(tmp_path / "a/run/metrics.jsonl"), read_metrics(tmp_path / "b/run/metrics.jsonl")
    assert [m["step"] for m in mb] == list(range(1, 7))
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    assert resumed.final_dir is not None


def test_features_of_another_hidden_size_are_refused(tmp_path):
    run_colocated(tiny_config(tmp_path, "train.max_steps=1", "data.max_samples=4"))
    # same store, a target with another hidden size: the stored features no longer fit
    bigger = tiny_config(tmp_path, "train.max_steps=1", "data.max_samples=4", "target.random.hidden_size=96",
                         f"train.output_dir={tmp_path / 'run2'}")
    with pytest.raises(ManifestError, match="holds features of another run(?s:.*)hidden_size"):
        run_colocated(bigger)  # the store's record names what filled it


def test_torchrun_two_processes_shard_data_and_agree(tmp_path):
    """Two gloo ranks: each captures half the samples, trains its own shard of every
    step, and rank 0 exports a draft; no sample repeats within the first epoch."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "draftflow", "train", "-c", str(TINY), f"features.root={tmp_path / 'feat'}",
           f"train.output_dir={tmp_path / 'run'}", "data.max_samples=16", "train.max_steps=4",
           "train.batch_size=2", "train.log_every=1", "train.progress=false", "train.tensorboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    ranks = [[s for line in (tmp_path / "run" / f"samples.rank{r}.jsonl").read_text().splitlines()
              for s in json.loads(line)["samples"]] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 8
    assert sorted(ranks[0] + ranks[1]) == [f"s{i:06d}" for i in range(16)]  # 4 steps x 2 ranks x 2 = one epoch
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def _loss_module_grads(loss_module, draft, batch):
    draft.zero_grad()
    x = loss_module.prepare(batch)
    loss = loss_module(x, x.counts().tolist())[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", [{"recompute": "always"}, {"recompute": "always", "compile": True}])
def test_recomputed_and_compiled_layer_give_the_eager_loss_and_gradients(options):
    """train.recompute and train.compile change memory and speed, not the math."""
    torch.manual_seed(0)
    cfg = DraftModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, vocab_size=40, draft_vocab_size=40, target_hidden_size=32,
                           rms_norm_eps=1e-6, max_position_embeddings=64, aux_layer_ids=(0, 1, 2))
    draft = Eagle3Draft(cfg)
    draft.t2d.fill_(True)
    teacher = Teacher(torch.randn(40, 32) * 3, torch.arange(40))
    t = 20
    batch = collate([{"input_ids": torch.randint(0, 40, (t,)), "loss_mask": torch.ones(t, dtype=torch.uint8),
                      "aux_hidden": torch.randn(t, 96), "last_hidden": torch.randn(t, 32)}], ["a"])
    l0, g0 = _loss_module_grads(DraftLoss(draft, teacher, 4, 0.8, recompute="never"), draft, batch)
    l1, g1 = _loss_module_grads(DraftLoss(draft, teacher, 4, 0.8, **options), draft, batch)
    assert g1.keys() == g0.keys() and "midlayer.mlp.up_proj.weight" in g1
    exact = "compile" not in options  # recomputation repeats the same ops; a compiled graph fuses them
    assert torch.allclose(l1, l0, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    for name in g0:
        assert torch.allclose(g1[name], g0[name], rtol=0 if exact else 1e-4, atol=0 if exact else 1e-6), name


def test_compiled_teacher_gives_the_eager_targets():
    """train.compile's teacher (one graph after the matmul) computes the eager targets,
    for row counts that change from batch to batch."""
    g = torch.Generator().manual_seed(3)
    weight, ids = torch.randn(50, 16, generator=g) * 3, torch.arange(5, 45)
    eager, compiled = Teacher(weight, ids), Teacher(weight, ids, compile=True)
    for rows in (7, 12, 31):
        hidden = torch.randn(rows, 16, generator=g)
        want, got = eager(hidden), compiled(hidden)
        assert torch.equal(got.argmax, want.argmax) and torch.equal(got.valid, want.valid)
        assert not got.valid.all() and got.valid.any()  # some argmaxes fall outside the draft vocab
        torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.full_probs, want.full_probs, rtol=1e-5, atol=1e-7)


def test_unknown_recompute_mode_names_the_key():
    with pytest.raises(ValueError, match=r"train.recompute: 'sometimes', expected one of auto, always, never"):
        DraftLoss(torch.nn.Linear(1, 1), Teacher(torch.zeros(2, 1), torch.arange(2)), 1, 0.8, recompute="sometimes")


def test_in_order_runs_calls_in_order_and_raises_their_errors():
    """The consume-once bookkeeping thread: calls run one by one in order; a failure
    reaches on_error at once (the trainer's loader, which may be waiting on it) and is
    raised by the next submit or by close, never dropped."""
    import threading
    import time

    from draftflow.control.sources import InOrder

    seen = []
    book = InOrder("test")
    for i in range(20):
        book.submit(seen.append, i)
    book.close()
    assert seen == list(range(20))

    def fail(i):
        raise OSError(f"cannot unlink {i}")

    reported, failed = [], threading.Event()
    book = InOrder("test", on_error=lambda e: (reported.append(e), failed.set()))
    book.submit(fail, 1)
    assert failed.wait(10)
    while not book._pending[0].done():  # the future completes just after on_error returns
        time.sleep(0.001)
    assert [str(e) for e in reported] == ["cannot unlink 1"]
    with pytest.raises(OSError, match="cannot unlink 1"):
        book.submit(seen.append, 99)
    book = InOrder("test")
    book.submit(fail, 2)
    with pytest.raises(OSError, match="cannot unlink 2"):
        book.close()


def test_a_failed_bookkeeping_call_ends_a_loader_wait():
    """A source Pending with nothing in hand hands out PENDING (the trainer must commit)
    and waits for resume(); FeatureLoader.fail: a trainer blocked in next() meanwhile
    gets the error instead of waiting forever on a commit that failed."""
    import threading

    from draftflow.train.batches import PENDING, FeatureLoader, Pending

    class NeverReady:
        num_samples = 4

        def resolve(self, index):
            raise Pending

    loader = FeatureLoader(store=None, source=NeverReady(), order=SampleOrder(4, 0, 2, 1), start_step=0,
                           end_step=2)
    try:
        assert loader.next(0) == PENDING
        threading.Timer(0.3, loader.fail, [OSError("bookkeeping: disk gone")]).start()
        with pytest.raises(OSError, match="disk gone"):
            loader.next(0)
    finally:
        loader.close()


def test_a_batch_shorter_than_the_unroll_trains_nothing_but_reaches_every_parameter():
    """The empty batch a rank trains when its consume-once stream ended before the
    others' (T=2, default ttt_length 7) and any micro-batch with T < ttt_length: zero
    loss, and backward still reaches every trainable parameter (FSDP's hooks need it)."""
    cfg = DraftModelConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=8, vocab_size=30, draft_vocab_size=30, target_hidden_size=16,
                           rms_norm_eps=1e-6, max_position_embeddings=64, aux_layer_ids=(0, 1, 2))
    draft = Eagle3Draft(cfg)
    teacher = Teacher(torch.randn(30, 16), torch.arange(30))
    for t, mask in ((2, 0), (3, 1)):
        batch = collate([{"input_ids": torch.randint(0, 30, (t,)), "loss_mask": torch.full((t,), mask, dtype=torch.uint8),
                          "aux_hidden": torch.randn(t, 48), "last_hidden": torch.randn(t, 16)}], ["e"])
        draft.zero_grad()
        x = prepare(teacher, batch, 7)
        loss = ttt_loss(draft, x, 0.8, x.counts().tolist()).loss
        loss.backward()
        assert x.counts().tolist() == [float(mask)] + [0.0] * 6  # T=3: step 0 at t=0 predicts token 2
        assert (float(loss) == 0.0) == (mask == 0) and torch.isfinite(loss)
        assert all(p.grad is not None for p in draft.parameters() if p.requires_grad)


def test_cuda_work_sizes_the_host_thread_pool_unless_omp_num_threads_is_set(monkeypatch):
    """CUDA work keeps CUDA_HOST_THREADS intra-op threads (a producer and a consumer on
    one host must not oversubscribe its cores); OMP_NUM_THREADS wins; CPU work keeps the
    pool it has; the previous size comes back on exit."""
    from draftflow.train.distributed import CUDA_HOST_THREADS, host_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(CUDA_HOST_THREADS + 2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        with host_threads(torch.device("cpu")) as n:
            assert n == CUDA_HOST_THREADS + 2
        monkeypatch.setenv("OMP_NUM_THREADS", "6")
        with host_threads(torch.device("cuda", 0)) as n:
            assert n == CUDA_HOST_THREADS + 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        with host_threads(torch.device("cuda", 0)) as n:
            assert n == CUDA_HOST_THREADS == torch.get_num_threads()
        assert torch.get_num_threads() == CUDA_HOST_THREADS + 2
    finally:
        torch.set_num_threads(before)


ELASTIC_WORKER = """
import sys
from draftflow.config import load_config
from draftflow.roles import run_colocated
from draftflow.train.distributed import shutdown
cfg = load_config([sys.argv[1]], sys.argv[3:])
run_colocated(cfg, stop_after=int(sys.argv[2]) or None)
shutdown()
"""


def _elastic(tmp: Path, ranks: int, stop_after: int, *overrides: str) -> None:
    """run_colocated on `ranks` gloo processes (torchrun), stopping after `stop_after` steps (0: to the end)."""
    import subprocess
    import sys

    script = tmp / "elastic_worker.py"
    script.write_text(ELASTIC_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29541",
           str(script), str(TINY), str(stop_after), f"features.root={tmp / 'feat'}", "train.progress=false",
           "train.tensorboard=false", "data.max_samples=16", "train.max_steps=6", "train.log_every=1", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_elastic_resume_two_ranks_to_one_and_one_to_two(tmp_path):
    """A checkpoint written by 2 ranks resumes on 1, and one of 1 rank on 2 (CPU, gloo).
    2 ranks x batch 2 and 1 rank x 2 micro-batches of 2 train the same samples per step
    and sum the same two gradients, so 2 -> 1 ends bit-identical to an uninterrupted
    one-process run. 1 -> 2 with batch 2 on both sides doubles the samples per step:
    the resumed ranks continue the seeded stream exactly where the checkpoint left it."""
    one = ("train.grad_accum=2", "train.batch_size=2")
    straight = tiny_config(tmp_path, *one, "data.max_samples=16", "train.max_steps=6", "train.log_every=1",
                           f"train.output_dir={tmp_path / 'straight'}")
    run_colocated(straight)  # also captures the features every later run reuses
    _elastic(tmp_path, 2, 3, "train.batch_size=2", f"train.output_dir={tmp_path / 'two_one'}")
    assert json.loads((tmp_path / "two_one/checkpoints/step_00000003/meta.json").read_text())["world_size"] == 2
    run_colocated(tiny_config(tmp_path, *one, "data.max_samples=16", "train.max_steps=6", "train.log_every=1",
                              f"train.output_dir={tmp_path / 'two_one'}"))
    wa = load_file(str(tmp_path / "straight/final/model.safetensors"))
    wb = load_file(str(tmp_path / "two_one/final/model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the logged loss is a sum whose float order follows the intra-op thread count (torchrun ran with 1)
    torch.testing.assert_close(torch.tensor([m["loss"] for m in read_metrics(tmp_path / "straight/metrics.jsonl")]),
                               torch.tensor([m["loss"] for m in read_metrics(tmp_path / "two_one/metrics.jsonl")]),
                               rtol=1e-6, atol=0)

    run_colocated(tiny_config(tmp_path, "train.batch_size=2", "data.max_samples=16", "train.max_steps=6",
                              "train.log_every=1", f"train.output_dir={tmp_path / 'one_two'}"), stop_after=3)
    _elastic(tmp_path, 2, 0, "train.batch_size=2", f"train.output_dir={tmp_path / 'one_two'}")
    assert (tmp_path / "one_two/final/model.safetensors").exists()
    logs = {r: [json.loads(line) for line in (tmp_path / f"one_two/samples.rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)}
    stream = [s for line in logs[0] if line["step"] <= 3 for s in line["samples"]]  # 3 steps x 2 on one rank
    for step in range(4, 7):  # then per step: rank 0's 2 samples, rank 1's 2
        stream += [s for r in range(2) for line in logs[r] if line["step"] == step for s in line["samples"]]
    order = SampleOrder(num_samples=16, seed=0, batch_size=1, grad_accum=1)
    assert stream == [f"s{order.position(p):06d}" for p in range(3 * 2 + 3 * 4)]


def test_a_checkpoint_of_the_earlier_plain_format_still_resumes_exactly(tmp_path):
    """Before one format served every layout, CPU runs wrote optimizer.pt (the optimizer's
    own state_dict, parameters by position) and trainer.pt with the RNG inside, and no
    `layout` in meta.json. Such a checkpoint resumes to the uninterrupted run's weights."""
    import shutil

    from draftflow.train import checkpoint as ckpt
    from draftflow.train.loss import Teacher
    from draftflow.train.parallel import TrainState

    overrides = ("train.max_steps=6", "data.max_samples=12", "train.batch_size=2", "train.log_every=1")
    run_colocated(tiny_config(tmp_path / "a", *overrides))
    cfg = tiny_config(tmp_path / "b", *overrides)
    first = run_colocated(cfg, stop_after=3).checkpoint
    # Rewrite the checkpoint in the plain format from what it holds.
    meta = json.loads((first / "meta.json").read_text())
    draft = Eagle3Draft(DraftModelConfig.from_dict(meta["draft_config"]))
    state = TrainState(draft, Teacher(torch.zeros(draft.cfg.vocab_size, 1), torch.arange(2)), cfg.train,
                       cfg.draft.ttt_length, cfg.draft.loss_decay)
    state.load(first)
    torch.save(state.optimizer.state_dict(), first / "optimizer.pt")
    trainer = torch.load(first / "trainer.pt", weights_only=True)
    torch.save({"scheduler": trainer["scheduler"], "rng": torch.load(first / "rng.rank0.pt", weights_only=True),
                "step": 3}, first / "trainer.pt")
    shutil.rmtree(first / "dcp")
    (first / "rng.rank0.pt").unlink()
    del meta["layout"], meta["world_size"]
    (first / "meta.json").write_text(json.dumps(meta))
    assert ckpt.read_meta(first).get("layout") is None
    run_colocated(cfg)
    wa = load_file(str(tmp_path / "a/run/final/model.safetensors"))
    wb = load_file(str(tmp_path / "b/run/final/model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
