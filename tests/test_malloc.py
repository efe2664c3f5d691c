"""Host memory: a run puts back malloc's adaptive thresholds after tf.data's mallopt (engine/malloc.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine import malloc
from tests.helpers import REPO, config_flags, tiny_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(malloc._mallopt() is None, reason="needs Linux with glibc")]

# In a fresh process (TensorFlow applies its setting once per process, at the first iterator
# over a generator, and a long-lived process's heap hides the difference): a training run through
# engine.main, then the page faults of TensorFlow computing 40 times on a batch of 16 64x64x16
# activations. Measured on a 2-core Zen 3: about 164,000 with TensorFlow's setting, where every
# freed tensor goes back to the system, and 6,500 with the tuned thresholds.
SCRIPT = """
import resource, sys
import tensorflow as tf
from engine import main
assert main.invoke(sys.argv[1:]) == 0
x = tf.random.uniform([16, 64, 64, 16], seed=1)
@tf.function
def step(x):
    return tf.reduce_sum(tf.nn.relu(tf.concat([x * 2.0, x + 1.0], -1)) * 3.0)
step(x).numpy()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step(x).numpy()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_after_a_run(run_dir, **overrides) -> int:
    args = config_flags(tiny_config(run_dir, epochs=1, **overrides))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(proc.stdout.split()[-1])


def test_a_run_keeps_freed_tensors_for_the_next_step_and_the_flag_gives_tensorflows_setting(tmp_path):
    tuned = _faults_after_a_run(tmp_path / "on")
    tensorflows = _faults_after_a_run(tmp_path / "off", tune_malloc=False)
    assert tuned < 50_000 and tensorflows > 100_000, (tuned, tensorflows)
