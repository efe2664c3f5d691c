"""tf.distribute on CPU: mirrored over 2 logical devices equals one device (multi-worker: test_multi_worker)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO

STEPS = 4


def _worker(out, strategy, cpu_devices, per_replica_batch, env=None, dtype="float32"):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.distributed_worker", str(out), strategy, str(cpu_devices),
         str(per_replica_batch), str(STEPS), dtype],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    return out


def _weights(npz):
    return [npz[k] for k in sorted((k for k in npz.files if k.startswith("w")), key=lambda k: int(k[1:]))]


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_matches_one_device(tmp_path):
    """Mirrored over 2 replicas computes what one device computes on the same global batch.

    Compared in float64. In float32 the two differ only in the order of their sums (the
    all-reduce adds two half-batch gradients, the one device adds one full batch; oneDNN and
    Eigen also block their convolutions by batch size), and that rounding, about 1e-7 of a
    gradient, is amplified by Adam wherever a gradient is near zero: one weight in 576 ends
    2e-5 apart after 4 steps, with oneDNN off 72 in 108 end up to 4e-4 apart. In float64 the
    same rounding is 1e-16 and the weights agree to about 1e-14, while a real difference (no
    synchronised BatchNorm, a per-replica instead of a global mean of the loss) moves them by
    1e-3 or more. The loss itself is computed in float32 by both, so it gets a float32 bound.
    """
    one = _worker(tmp_path / "one.npz", "one_device", 0, 8, dtype="float64")
    two = _worker(tmp_path / "two.npz", "mirrored", 2, 4, dtype="float64")
    _finish(one), _finish(two)
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert int(a["replicas"]) == 1 and int(b["replicas"]) == 2
    assert int(a["step"]) == int(b["step"]) == STEPS
    np.testing.assert_allclose(a["losses"], b["losses"], atol=1e-6, rtol=1e-6)
    assert a["losses"][-1] != a["losses"][0]  # it trained
    assert _weights(a)[0].dtype == np.float64
    for wa, wb in zip(_weights(a), _weights(b)):
        np.testing.assert_allclose(wa, wb, atol=1e-10, rtol=0)
