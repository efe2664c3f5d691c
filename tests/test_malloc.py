"""Host memory: a run puts back malloc's adaptive thresholds after tf.data's mallopt (engine/malloc.py)."""

from __future__ import annotations

import json
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
# activations; then a second run with --notune_malloc, and the same count. Measured on a 2-core
# Zen 3: 6,500 with the tuned thresholds, about 164,000 with TensorFlow's setting, where every
# freed tensor goes back to the system.
SCRIPT = """
import json, resource, sys
import tensorflow as tf
from engine import main
x = tf.random.uniform([16, 64, 64, 16], seed=1)
@tf.function
def step(x):
    return tf.reduce_sum(tf.nn.relu(tf.concat([x * 2.0, x + 1.0], -1)) * 3.0)
def faults():
    step(x).numpy()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        step(x).numpy()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
runs = json.loads(sys.argv[1])
counts = []
for args in runs:
    assert main.invoke(args) == 0
    counts.append(faults())
print(*counts)
"""


def test_a_run_keeps_freed_tensors_for_the_next_step_and_the_flag_gives_tensorflows_setting(tmp_path):
    runs = [config_flags(tiny_config(tmp_path / "on", epochs=1)),
            config_flags(tiny_config(tmp_path / "off", epochs=1, tune_malloc=False))]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(runs)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tuned, tensorflows = map(int, proc.stdout.split()[-2:])
    assert tuned < 50_000 and tensorflows > 100_000, (tuned, tensorflows)
