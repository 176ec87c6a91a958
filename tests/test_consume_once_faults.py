"""Consume-once consumers killed at any moment lose no sample (real processes, SIGKILL).

Samples are committed (marked done, data deleted) only after a checkpoint holding
their training is published, and a restarted consumer resumes from that checkpoint.
The audit log `samples.rank0.jsonl` is cut back to the checkpoint on every resume,
so at the end it lists exactly the steps whose training is in the final weights:
every sample must appear in it (at least once: steps after the last checkpoint
before a crash are trained again).
"""

import json
import random
import signal
import time
from pathlib import Path

from test_disagg import COMMON, TINY, draftflow, finish, train

ONCE = ["features.release=consume_once", "train.max_steps=1000", "train.batch_size=2", "train.save_every=3"]
NUM = 24


def log_lines(run_dir: Path) -> int:
    path = run_dir / "samples.rank0.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def trained_in_weights(run_dir: Path) -> list[str]:
    """Samples of the steps the newest checkpoint holds (the audit log up to its step)."""
    found = sorted((run_dir / "checkpoints").glob("step_*"))
    if not found:
        return []
    newest = found[-1]
    step = json.loads((newest / "meta.json").read_text())["step"]
    lines = [json.loads(line) for line in (run_dir / "samples.rank0.jsonl").read_text().splitlines()]
    return [s for line in lines if line["step"] <= step for s in line["samples"]]


def consumer(tmp: Path, name: str, *extra: str):
    return draftflow("train", "-c", TINY, "--role", "consumer", "features.backend=shared_dir",
                     f"features.root={tmp / 'feat'}", f"train.output_dir={tmp / name}", *COMMON, *ONCE, *extra)


def kill_after_steps(proc, run_dir: Path, steps: int, timeout: float = 120) -> bool:
    """SIGKILL `proc` once its audit log has `steps` more lines; False if it finished first."""
    target = log_lines(run_dir) + steps
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if log_lines(run_dir) >= target:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.communicate(timeout=60)
    return False


def assert_all_trained_and_freed(tmp: Path, trained: list[str]) -> None:
    assert set(trained) == {f"s{i:06d}" for i in range(NUM)}, sorted(set(trained))
    assert not list((tmp / "feat" / "samples").glob("*.safetensors"))  # every sample freed once committed
    assert len(list((tmp / "feat" / "control" / "done").iterdir())) == NUM


def test_consumer_killed_at_random_points_and_restarted_loses_no_sample(tmp_path):
    code, _, err = finish(train(tmp_path, "producer", *ONCE))
    assert code == 0, err[-2000:]
    rng = random.Random(14)
    kills = 0
    for trial in range(4):  # kill at a random step of each incarnation, between or at checkpoints
        proc = consumer(tmp_path, "c")
        if kill_after_steps(proc, tmp_path / "c", rng.randint(1, 5)):
            kills += 1
            # nothing the killed incarnation trained after its newest checkpoint is marked done
            done = {p.name for p in (tmp_path / "feat" / "control" / "done").iterdir()}
            assert done <= set(trained_in_weights(tmp_path / "c"))
    assert kills >= 2  # the test killed mid-run at least twice
    code, _, err = finish(consumer(tmp_path, "c"))  # the last restart finishes the stream
    assert code == 0, err[-2000:]
    trained = trained_in_weights(tmp_path / "c")
    assert_all_trained_and_freed(tmp_path, trained)
    assert (tmp_path / "c" / "final" / "model.safetensors").exists()


def test_two_consumers_one_killed_the_other_takes_over_its_uncommitted_samples(tmp_path):
    """c0 is killed for good; the samples it trained but had not committed go stale
    (claim_timeout_s) and c1 trains them. Together, c1's final weights and c0's newest
    checkpoint hold every sample."""
    fast = ["features.claim_timeout_s=3"]
    consumers = [consumer(tmp_path, f"c{i}", *fast) for i in range(2)]
    producer = train(tmp_path, "producer", *ONCE)
    assert kill_after_steps(consumers[0], tmp_path / "c0", 1), "c0 finished before it could be killed"
    code, _, err = finish(producer)
    assert code == 0, err[-2000:]
    code, _, err = finish(consumers[1])
    assert code == 0, err[-2000:]
    c0 = trained_in_weights(tmp_path / "c0")
    c1 = trained_in_weights(tmp_path / "c1")
    assert_all_trained_and_freed(tmp_path, c0 + c1)


def test_a_full_store_makes_the_consumer_checkpoint_early_instead_of_waiting_forever(tmp_path):
    """The store holds a few samples (features.max_inflight_bytes) and checkpoints are
    due only at the end: the producer waits for room, which only commits can free, and
    says so (control/progress/room-wanted); the consumer then checkpoints early, so
    both finish and every sample is trained and freed."""
    full = ["features.max_inflight_bytes=1000000", "train.save_every=0", "train.keep_checkpoints=0",
            "features.wait_timeout_s=60"]
    proc = consumer(tmp_path, "c", *full)
    code, _, err = finish(train(tmp_path, "producer", *ONCE, *full))
    assert code == 0, err[-2000:]
    code, _, err = finish(proc)
    assert code == 0, err[-2000:]
    checkpoints = sorted((tmp_path / "c" / "checkpoints").glob("step_*"))
    assert len(checkpoints) >= 2, checkpoints  # at least one before the end, for room
    assert_all_trained_and_freed(tmp_path, trained_in_weights(tmp_path / "c"))
    assert not (tmp_path / "feat" / "control" / "progress" / "room-wanted").exists()
