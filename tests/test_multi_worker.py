"""Several workers through the real entry point on 127.0.0.1: one process's result, SIGTERM, kills."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf

from engine.checkpoint import CheckpointManager
from engine.runtime import HEARTBEAT_SECONDS
from tests.helpers import REPO, config_flags, read_history, run_engine, tiny_config

pytestmark = pytest.mark.slow

WORKERS = 2
# The start-up wait for every worker; a worker lost later is noticed by its missing heartbeats.
TIMEOUT = 30
SETTINGS = dict(epochs=2, batch_size=4, checkpoint_every_steps=5, deterministic=True,
                collective_timeout=TIMEOUT)
# A single-process run of the tiny model holds about 110-150 threads here; a worker whose every
# collective held a thread for the timeout passed 1,500 within 20 s and died near 15,700.
MAX_THREADS = 500
# Threads a worker may add between the middle and the last third of a run (thread pools settle).
GROWTH = 30


def _ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _cluster(run_dir, *, workers=WORKERS, start=None, **overrides):
    """Starts `python -m engine.main --strategy=multi_worker` once per worker, each with its TF_CONFIG."""
    args = config_flags(tiny_config(run_dir, strategy="multi_worker", **{**SETTINGS, **overrides}))
    addresses = [f"127.0.0.1:{p}" for p in _ports(workers)]
    procs = []
    for index in range(workers) if start is None else start:
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "engine.main", *args], cwd=REPO,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(tf_config)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=240):
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], outputs


def _read_until(proc, needle: str) -> str:
    """The process's stdout up to and including the first line holding `needle`."""
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if needle in line:
            return "".join(lines)


def _values(run_dir) -> dict[str, np.ndarray]:
    latest = CheckpointManager(directory=os.path.join(run_dir, "checkpoints")).latest()
    reader = tf.train.load_checkpoint(os.path.join(latest.path, "ckpt"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "OBJECT" not in k}


def _same_run(a, b, atol=1e-5):
    va, vb = _values(a), _values(b)
    assert va.keys() == vb.keys() and len(va) > 10
    for key in va:
        np.testing.assert_allclose(va[key], vb[key], atol=atol, rtol=0, err_msg=key)
    ha, hb = read_history(a), read_history(b)
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb] == [1, 2]
    for x, y in zip(ha, hb):
        for key in ("step", "loss", "dice", "val_loss", "val_dice", "learning_rate"):
            assert x[key] == pytest.approx(y[key], abs=atol), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-worker run."""
    run_dir = tmp_path_factory.mktemp("mw") / "reference"
    codes, outputs = _finish(_cluster(run_dir))
    assert codes == [0, 0], outputs
    return run_dir, outputs


def test_two_workers_compute_what_one_process_computes_on_the_same_global_batch(reference, tmp_path):
    run_dir, outputs = reference
    # One process with the same two replicas (logical CPUs) and the same global batch of 8.
    single = tmp_path / "single"
    run_engine(config_flags(tiny_config(single, strategy="mirrored", cpu_devices=2,
                                        **{k: v for k, v in SETTINGS.items() if k != "collective_timeout"})),
               check=True)
    _same_run(run_dir, single)
    # The chief speaks for the cluster; the other worker leaves nothing behind.
    (chief_out, _), (worker_out, worker_err) = outputs
    assert "epoch 2/2" in chief_out and "epoch 1/2" not in worker_out, worker_out
    assert len([n for n in os.listdir(run_dir) if n.startswith("events.out.tfevents")]) == 1
    digest = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:12]
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), f"brainseg-{os.getuid()}-worker1-{digest}"))


def test_sigterm_kills_and_a_lost_worker_then_resume_to_the_uninterrupted_result(reference, tmp_path):
    """One run through every way a cluster stops, restarted each time with the same command."""
    run_dir = tmp_path / "run"
    rng = random.Random(7)
    # SIGTERM to worker 1: both workers save at one step and exit 143.
    procs = _cluster(run_dir)
    lines = _read_until(procs[0], "epoch 1/2")
    procs[1].send_signal(signal.SIGTERM)
    codes, outputs = _finish(procs)
    out = lines + outputs[0][0]
    assert codes == [143, 143], outputs
    assert "A signal to another worker received: saved a checkpoint at step" in out
    saved = int(out.split("saved a checkpoint at step ")[1].split()[0])
    assert CheckpointManager(directory=str(run_dir / "checkpoints")).latest().step == saved
    # Restarted from that step, then both workers killed at a random moment of training.
    procs = _cluster(run_dir)
    _read_until(procs[0], f"Training from step {saved} ")
    time.sleep(rng.uniform(0.0, 1.5))
    for p in procs:
        p.kill()
    _finish(procs)
    # Then only worker 1: the chief notices within the heartbeat timeout and says what to do.
    procs = _cluster(run_dir)
    _read_until(procs[0], "Training from step")
    time.sleep(rng.uniform(0.0, 2.0))
    procs[1].kill()
    start = time.time()
    codes, outputs = _finish(procs, timeout=HEARTBEAT_SECONDS + 60)
    assert codes[0] == 1 and time.time() - start < HEARTBEAT_SECONDS + 35, outputs[0]  # loaded 2-core CI
    assert "lost the cluster: TF_CONFIG's worker task 1 stopped" in outputs[0][1], outputs[0][1]
    assert "Traceback" not in outputs[0][1], outputs[0][1]
    # Restarted with the same command, the cluster ends where the uninterrupted one did.
    codes, outputs = _finish(_cluster(run_dir))
    assert codes == [0, 0], outputs
    assert "Resumed from" in outputs[0][0]
    _same_run(reference[0], run_dir)


def test_a_worker_that_never_comes_up_is_a_clear_error_within_the_timeout(tmp_path):
    # The coordination service's leader alone, and the other worker alone (of another cluster),
    # side by side.
    start = time.time()
    alone = [_cluster(tmp_path / f"run{present}", start=[present], collective_timeout=5)[0]
             for present in (0, 1)]
    codes, outputs = _finish(alone, timeout=120)
    assert codes == [1, 1] and time.time() - start < 60, outputs
    for _, err in outputs:
        assert "did not come up within --collective_timeout=5s" in err and "Traceback" not in err, err
    assert not (tmp_path / "run0").exists() and not (tmp_path / "run1").exists()


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def test_threads_stay_bounded_over_a_long_run(tmp_path):
    """About 100 steps, with validation passes: no thread outlives its collective.

    A thread kept per collective reached the ceiling within seconds here; a slower leak shows as
    growth from the first half of the run to the second, which both hold validation passes.
    """
    procs = _cluster(tmp_path / "run", epochs=8, checkpoint_every_steps=0, eval_every=2)
    counts = [[] for _ in procs]
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            try:
                counts[i].append(_threads(p.pid))
            except (FileNotFoundError, StopIteration, ProcessLookupError):
                pass  # it has just ended
        assert max(max(c, default=0) for c in counts) < MAX_THREADS, counts
        time.sleep(0.25)
    codes, outputs = _finish(procs)
    assert codes == [0, 0], outputs
    total = int(outputs[0][0].split(" steps: ")[0].rsplit("to ", 1)[1])
    assert total >= 90, total
    for c in counts:
        # The sampled stretch from the first training step on (start-up raises the count once).
        first, second = c[len(c) // 3: 2 * len(c) // 3], c[2 * len(c) // 3:]
        assert len(second) > 20 and max(second) <= max(first) + GROWTH, (max(first), max(second), c)
