"""The run directory: every file name in it, its lock, its identity check, and all writes to it."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import logging
import os
import platform
import shutil

from engine import atomic
from engine.config import RUN_IDENTITY_FIELDS, Config

log = logging.getLogger(__name__)

PROJECT_VERSION = "0.1.0"
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINTS = "checkpoints"
FINAL_MODEL = "final_model.keras"
INFERENCE_FILE = "inference.json"  # what evaluate, predict and export apply (inference.InferenceSpec)
SAVED_MODEL = "saved_model"
LOCK_FILE = ".lock"
MEMBERS = "members"  # <run_dir>/members/<k>/: the run directories of an ensemble's fold members
# Everything the engine writes in a run directory, by name or pattern: --overwrite removes these
# and nothing else. Folders are emptied of their own kind of files only (see _remove_products).
PRODUCT_FILES = (CONFIG_FILE, SPLIT_FILE, HISTORY_FILE, FINAL_MODEL, INFERENCE_FILE, "benchmark.json",
                 "events.out.tfevents.*", "eval_*.json", "eval_*.png", "eval_*.md", "eval_*.html",
                 "per_patient_*.csv", atomic.TMP_PREFIX + "*")
CHECKPOINT_PRODUCTS = ("ckpt-*", "manifest.json", ".tmp-*", ".old-*", ".del-*")


class RunDirError(Exception):
    """The run directory holds something incompatible with this run, or is in use."""


class RunDir:
    """One run's directory: the paths of its files, and the only code that writes them.

    A reader (evaluate, predict, export, a non-chief worker) gets `writer=False`: it reads the
    same files, and every write is a no-op, as SummaryWriter(None) writes nothing.
    """

    def __init__(self, path: str, *, writer: bool = True):
        self.path = path
        self.writer = writer
        self._lock_fd: int | None = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def checkpoints(self) -> str:
        return self.file(CHECKPOINTS)

    @property
    def final_model(self) -> str:
        return self.file(FINAL_MODEL)

    @property
    def summaries(self) -> str | None:
        """The TensorBoard event folder, or None for a reader (which writes no events)."""
        return self.path if self.writer else None

    # -- Opening a run for training -----------------------------------------------------------

    def open(self, config: Config) -> "RunDir":
        """Locks the directory for this process, checks its identity and records the config.

        A directory that holds a run of another configuration (model shape, image size, data
        or split) is refused with what differs, unless --overwrite, which removes the
        engine's own files and nothing else. A folder whose config.json brainseg did not write
        is never touched.

        Returns:
          self.

        Raises:
          RunDirError: the directory is locked by another run, holds a different run or
            foreign files in the way, or cannot be written.
        """
        if not self.writer:
            return self
        try:
            os.makedirs(self.path, exist_ok=True)
            self.lock()
            previous = self.read_config()
            if previous is not None and config.overwrite:
                log.info(f"--overwrite: removing the previous run's files in {self.path}")
                self._remove_products()
            elif previous is not None:
                old, new = _identity(previous), _identity(config.to_dict())
                diffs = [f"--{k}: run has {old[k]!r}, flags say {new[k]!r}"
                         for k in old if old[k] != new[k]]
                if diffs:
                    raise RunDirError(
                        f"{self.path} holds a run with a different configuration:\n  " + "\n  ".join(diffs)
                        + "\nUse another --model_dir/--run_name, or pass --overwrite to start afresh.")
            atomic.atomic_write_json(self.file(CONFIG_FILE), {
                "config": config.to_dict(),
                "versions": versions(),
            })
        except OSError as e:
            self.close()
            raise RunDirError(f"cannot write the run directory {self.path}: "
                              f"{e.strerror or e}") from None
        except BaseException:
            self.close()  # refused: the lock goes with the refusal, not with the process
            raise
        return self

    def lock(self) -> None:
        """Holds an exclusive lock on the directory until the process ends (or close()).

        flock, not a pid file: the kernel releases it when the process dies, even by SIGKILL.

        Raises:
          RunDirError: another process holds it; the message names the directory and its pid.
        """
        path = self.file(LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirError(f"{self.path} is in use by another training run (pid {holder}); "
                                  "wait for it to finish, stop it, or use another --model_dir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Releases the lock (the process's end does too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def read_config(self) -> dict | None:
        """The config of the run already here, or None; refuses a config.json that is not ours."""
        path = self.file(CONFIG_FILE)
        stored = atomic.read_json_object(path, RunDirError, "it is left alone: move it away or "
                                         "use another --model_dir", object_only=False)
        if stored is None:
            return None
        if not (isinstance(stored, dict) and isinstance(stored.get("config"), dict)
                and isinstance(stored.get("versions"), dict) and "brainseg" in stored["versions"]):
            raise RunDirError(f"{path} was not written by brainseg; this folder is left alone "
                              "(--overwrite only removes brainseg's own files): use another "
                              "--model_dir")
        return stored["config"]

    def _remove_products(self) -> None:
        """Deletes the files the engine writes, by name and pattern; a foreign file is never deleted."""
        for name in sorted(os.listdir(self.path)):
            target = self.file(name)
            if name == LOCK_FILE and self._lock_fd is None:
                os.remove(target)  # a member's lock, released when its training ended
                continue
            if name == LOCK_FILE:
                continue
            if any(fnmatch.fnmatch(name, pattern) for pattern in PRODUCT_FILES) and not os.path.isdir(target):
                os.remove(target)
            elif name == CHECKPOINTS and os.path.isdir(target):
                for entry in os.listdir(target):
                    if any(fnmatch.fnmatch(entry, pattern) for pattern in CHECKPOINT_PRODUCTS):
                        path = os.path.join(target, entry)
                        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                if not os.listdir(target):
                    os.rmdir(target)
            elif name == MEMBERS and os.path.isdir(target):
                for member in os.listdir(target):  # each fold member is a run directory of its own
                    if os.path.isfile(os.path.join(target, member, CONFIG_FILE)):
                        RunDir(os.path.join(target, member))._remove_products()
                        if not os.listdir(os.path.join(target, member)):
                            os.rmdir(os.path.join(target, member))
                if not os.listdir(target):
                    os.rmdir(target)
            elif name == SAVED_MODEL and os.path.isfile(os.path.join(target, "brainseg_export.json")):
                shutil.rmtree(target)
            elif name == "plugins" and os.path.isdir(os.path.join(target, "profile")):
                shutil.rmtree(os.path.join(target, "profile"))
                if not os.listdir(target):
                    os.rmdir(target)

    # -- The split ------------------------------------------------------------------------------

    def read_split(self) -> dict | None:
        """split.json as it was written, or None when the run has none yet.

        Raises:
          RunDirError: it is unreadable or not a JSON object.
        """
        return atomic.read_json_object(self.file(SPLIT_FILE), RunDirError,
                                       "delete it to make a new split")

    # -- History and other files ----------------------------------------------------------------

    def append_history(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.file(HISTORY_FILE), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def history(self) -> list[dict]:
        path = self.file(HISTORY_FILE)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_history(self, last_epoch: int) -> None:
        """Drops records past the restored epoch, written before a crash hit the checkpoint."""
        if not self.writer:
            return
        records = self.history()
        kept = [r for r in records if r.get("epoch", 0) <= last_epoch]
        if len(kept) != len(records):
            atomic.atomic_write(self.file(HISTORY_FILE),
                                "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def write(self, name: str, content) -> str | None:
        """Atomically writes one of the run's files (bytes, text, or a path writer; see atomic_write)."""
        if not self.writer:
            return None
        suffix = os.path.splitext(name)[1]
        return atomic.atomic_write(self.file(name), content, suffix=suffix)

    def remove(self, name: str) -> bool:
        """Deletes one of the run's files; True if there was one."""
        if not self.writer or not os.path.isfile(self.file(name)):
            return False
        os.remove(self.file(name))
        return True

    def write_json(self, name: str, payload) -> str | None:
        return atomic.atomic_write_json(self.file(name), payload) if self.writer else None


def versions() -> dict:
    import keras
    import tensorflow as tf

    return {"brainseg": PROJECT_VERSION, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


def _identity(values: dict) -> dict:
    # A field added after the run was written reads as its default, so older runs still resume.
    defaults = Config()
    out = {k: values.get(k, getattr(defaults, k)) for k in RUN_IDENTITY_FIELDS}
    if out.get("data_dir"):
        out["data_dir"] = os.path.realpath(out["data_dir"])
    return out
