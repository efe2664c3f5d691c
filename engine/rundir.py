"""The run directory: its config.json identity check and its history.jsonl."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile

import keras
import tensorflow as tf

from engine.config import RUN_IDENTITY_FIELDS, Config

PROJECT_VERSION = "0.1.0"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"
# What --overwrite removes: the products of a previous run, never anything else.
RUN_PRODUCTS = ("checkpoints", "split.json", HISTORY_FILE, CONFIG_FILE, "final_model.keras",
                "saved_model", "benchmark.json")
RUN_PRODUCT_PREFIXES = ("events.out.tfevents", "eval_", "per_patient_")


class RunDirError(Exception):
    """The run directory holds something incompatible with this run."""


def write_json_atomic(path: str, payload) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _identity(values: dict) -> dict:
    # A field added after the run was written reads as its default, so older runs still resume.
    defaults = Config()
    out = {k: values.get(k, getattr(defaults, k)) for k in RUN_IDENTITY_FIELDS}
    if out.get("data_dir"):
        out["data_dir"] = os.path.realpath(out["data_dir"])
    return out


def prepare(config: Config, *, log) -> str:
    """Creates or re-opens the run directory and records the resolved config.

    A directory that holds a run of another configuration (model shape, image
    size, data or split) is refused with what differs, unless --overwrite.

    Returns:
      The run directory.

    Raises:
      RunDirError: the directory holds a different run, or cannot be written.
    """
    run_dir = config.run_dir
    path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.exists(path) and config.overwrite:
        log(f"--overwrite: removing the previous run's files in {run_dir}")
        for name in RUN_PRODUCTS:
            target = os.path.join(run_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        for name in os.listdir(run_dir):
            if name.startswith(RUN_PRODUCT_PREFIXES) and os.path.isfile(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    elif os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)["config"]
        except (OSError, ValueError, KeyError) as e:
            raise RunDirError(f"{path} is unreadable ({e}); pass --overwrite to start afresh") from None
        old, new = _identity(previous), _identity(config.to_dict())
        diffs = [f"--{k}: run has {old[k]!r}, flags say {new[k]!r}" for k in old if old[k] != new[k]]
        if diffs:
            raise RunDirError(
                f"{run_dir} holds a run with a different configuration:\n  " + "\n  ".join(diffs)
                + "\nUse another --model_dir/--run_name, or pass --overwrite to start afresh.")
    try:
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(path, {
            "config": config.to_dict(),
            "versions": {"brainseg": PROJECT_VERSION, "tensorflow": tf.__version__,
                         "keras": keras.__version__, "python": platform.python_version()},
        })
    except OSError as e:
        raise RunDirError(f"cannot write the run directory {run_dir}: {e.strerror or e}") from None
    return run_dir


def append_history(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, HISTORY_FILE), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_history(run_dir: str, last_epoch: int) -> None:
    """Drops records past the restored epoch, written before a crash hit the checkpoint."""
    path = os.path.join(run_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r.get("epoch", 0) <= last_epoch]
    if len(kept) != len(records):
        with open(path, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)


def read_history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
