"""Shared test helpers: a small synthetic LGG folder per test session and tiny configs."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

from engine.config import Config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def synthetic_dir(patients: int = 6, seed: int = 0) -> str:
    """Writes a small synthetic kaggle_3m tree once per process and returns its parent folder."""
    from data import synthetic

    root = tempfile.mkdtemp(prefix=f"brainseg-syn{patients}-")
    synthetic.write_dataset(root, patients=patients, seed=seed)
    return root


@functools.lru_cache(maxsize=None)
def session_cache_dir() -> str:
    """One decode cache for the whole test session: each data folder is decoded once."""
    return tempfile.mkdtemp(prefix="brainseg-cache-")


def tiny_config(run_dir: str, **overrides) -> Config:
    """A few-thousand-parameter U-Net on 64x64 synthetic slices: seconds per epoch on a CPU."""
    values = dict(
        data_dir=overrides.pop("data_dir", None) or synthetic_dir(), model_dir=str(run_dir),
        cache_dir=session_cache_dir(),
        image_size=64, base_filters=4, depth=2, batch_size=8, epochs=2, learning_rate=1e-2,
        positive_fraction=0.5,
        log_every=5, num_overlays=4, progress=False, seed=1, precision="float32",
        jit_compile="false", strategy="one_device", val_fraction=0.2, test_fraction=0.2,
        plateau_patience=5, early_stopping_patience=10, min_lr=0.0)
    values.update(overrides)
    return validate(Config(**values))


def model_only_config(tmp, *, image_size: int, mode: str, **overrides) -> Config:
    """A tiny U-Net config for modes that read a saved model and no dataset (export, predict)."""
    values = dict(data_dir=os.path.join(str(tmp), "unused"), model_dir=os.path.join(str(tmp), "run"),
                  image_size=image_size, base_filters=4, depth=2, precision="float32",
                  jit_compile="false", strategy="one_device", progress=False, mode=mode)
    values.update(overrides)
    return validate(Config(**values))


def config_flags(config: Config) -> list[str]:
    """The command-line flags that reproduce a Config (for subprocess tests)."""
    out = []
    defaults = Config()
    for field in dataclasses.fields(Config):
        value = getattr(config, field.name)
        if value != getattr(defaults, field.name):
            if isinstance(value, bool):
                out.append(f"--{field.name}" if value else f"--no{field.name}")
            else:
                out.append(f"--{field.name}={value}")
    return out


def run_engine(args: list[str], *, timeout: float = 300, env: dict | None = None,
               check: bool = False, process: bool = False) -> subprocess.CompletedProcess:
    """Runs `python -m engine.main ARGS`: in this process (engine.main.invoke), or with
    `process=True` or an `env` in a subprocess from the repository root.

    In this process saves the seconds of a new TensorFlow start-up; a test that needs a process
    of its own (signals, kills, environment variables, logical devices, what a fresh process
    prints) asks for one.
    """
    # Logical devices and thread pools exist once per process, before TensorFlow starts.
    process = process or any(a.startswith(("--cpu_devices=", "--threads=")) and not a.endswith("=0")
                             for a in args)
    if process or env:
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "engine.main", *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    else:
        proc = _invoke(args)
    if check and proc.returncode != 0:
        raise AssertionError(f"engine failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _invoke(args: list[str]) -> subprocess.CompletedProcess:
    """engine.main.invoke with stdout and stderr captured, from the repository root; a crash
    prints its traceback and exits 1, as a process would."""
    import contextlib
    import io
    import traceback

    import keras
    from tensorflow.python.framework import config as tf_config

    from engine import main as engine_main

    out, err, cwd, argv = io.StringIO(), io.StringIO(), os.getcwd(), sys.argv
    try:
        os.chdir(REPO)
        sys.argv = [os.path.join(REPO, "engine", "main.py"), *args]  # what the run records as its command
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = engine_main.invoke(list(args))
            except Exception:  # noqa: BLE001 - what an uncaught exception does to a process
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        sys.argv = argv
        # What a run sets for its process: put back the defaults for the next one.
        keras.mixed_precision.set_global_policy("float32")
        tf_config.disable_op_determinism()
    return subprocess.CompletedProcess(["engine.main", *args], code, out.getvalue(), err.getvalue())


def finished_run(folder, **overrides):
    """A finished 2-epoch tiny run (tiny_config with `overrides`) in folder/run, for a module's
    tests to copy and change."""
    run_dir = folder / "run"
    run_engine(config_flags(tiny_config(run_dir, **overrides)), check=True)
    return run_dir


def copy_run(run_dir, tmp_path):
    """A copy of a run folder at tmp_path/run, without its lock file."""
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    os.remove(target / ".lock")
    return target


def read_history(run_dir) -> list[dict]:
    with open(os.path.join(str(run_dir), "history.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def asymmetric_model(size: int, seed: int = 3):
    """A random 3x3 convolution: not flip-symmetric, so flip averaging changes its output."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    return keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same", kernel_initializer="he_normal",
                                                   dtype="float32")(inputs))


def pointwise_model(size: int):
    """A 1x1-conv model with logit = 20 * (FLAIR - 0.5): lesion wherever the FLAIR channel is bright."""
    import keras
    import numpy as np

    inputs = keras.Input((size, size, 3))
    layer = keras.layers.Conv2D(1, 1, dtype="float32")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.array([0.0, 20.0, 0.0], np.float32).reshape(1, 1, 3, 1),
                       np.array([-10.0], np.float32)])
    return model
