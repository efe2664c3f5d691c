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

from data import atomic
from engine import checkpoint
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
# The relative path of every file the engine writes in a run directory, added before the file is
# written: --overwrite removes these and nothing else, so a user's file of a similar name stays.
RECORD_FILE = "written.json"
EVENTS = "events.out.tfevents.*"  # TensorFlow names the event file; the run records the one it made
EXPORT_MARKER = "brainseg_export.json"  # written by export beside its SavedModel (export.METADATA_FILE)


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

    def open(self, config: Config, runtime: dict | None = None) -> "RunDir":
        """Locks the directory for this process, checks its identity and records the config.

        A directory that holds a run of another configuration (model shape, image size, data
        or split) is refused with what differs, unless --overwrite, which removes what the run
        recorded writing (see _remove_owned) and nothing else. A folder whose config.json
        brainseg did not write is never touched.

        Returns:
          self.

        Raises:
          RunDirError: the directory is locked by another run, holds a different run, a run
            that kept no record of its files (with --overwrite), a damaged history, or cannot
            be written.
        """
        if not self.writer:
            return self
        try:
            os.makedirs(self.path, exist_ok=True)
            self.lock()
            previous = self.read_config()
            if previous is not None and config.overwrite:
                log.info(f"--overwrite: removing the files the previous run wrote in {self.path}")
                self._remove_owned()
            elif previous is not None:
                _check_identity(self.path, previous, config)
                self.history()  # a torn last line goes now, before this run appends to it
            if previous is None or config.overwrite:
                atomic.atomic_write_json(self.file(RECORD_FILE), {"written": []})
            # The resolved device policy beside the flags: --precision=auto's choice and its reason.
            self.write_json(CONFIG_FILE, {"config": config.to_dict(), "versions": versions(),
                                          **({"runtime": runtime} if runtime else {})})
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

    # -- What the engine wrote here -------------------------------------------------------------

    def written(self) -> list[str] | None:
        """The relative paths the engine recorded writing here, or None for a run without a record.

        Raises:
          RunDirError: the record is unreadable or not brainseg's.
        """
        path = self.file(RECORD_FILE)
        stored = atomic.read_json_object(path, RunDirError, "move it away or use another --model_dir")
        if stored is None:
            return None
        names = stored.get("written")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RunDirError(f"{path} is not brainseg's record of its files; move it away or use "
                              "another --model_dir")
        return names

    def record(self, *names: str) -> None:
        """Adds paths to the record, before they are written, so a crash midway leaves them listed.

        A directory without a record (a run begun before brainseg kept one, a bare model folder)
        gets none: a record that missed the run's first files would pass for a complete one.
        """
        if not self.writer or not os.path.exists(self.file(RECORD_FILE)):
            return
        known = self.written()
        if not set(names) <= set(known):
            atomic.atomic_write_json(self.file(RECORD_FILE), {"written": sorted({*known, *names})})

    def recording(self, folder: str, pattern: str, make):
        """Returns make(), recording the entries matching `pattern` that it created in `folder`
        (relative): files whose names another library picks, as TensorFlow's event file."""
        if not self.writer:
            return make()
        where = self.file(folder)
        listing = lambda: set(os.listdir(where)) if os.path.isdir(where) else set()  # noqa: E731
        before = listing()
        made = make()
        self.record(*(os.path.join(folder, n) for n in sorted(listing() - before)
                      if fnmatch.fnmatch(n, pattern)))
        return made

    def _owned(self) -> list[str]:
        """Every path --overwrite removes here: the recorded files, the checkpoint manager's own
        checkpoints, a SavedModel export writes its marker into, and the same in each member
        whose config.json is brainseg's.

        A run with no record (begun before brainseg kept one) is refused rather than cleaned by
        name patterns: a pattern cannot tell the engine's eval_test.md from the user's
        eval_my_notes.md, and a refusal deletes nothing.

        Raises:
          RunDirError: this run or a member has no record; nothing has been removed yet.
        """
        written = self.written()
        if written is None:
            raise RunDirError(f"{self.path} holds a run written before brainseg recorded its files "
                              f"in {RECORD_FILE}, so --overwrite cannot tell its files from yours and "
                              "removes nothing: delete the folder yourself or use another --model_dir")
        inside = [n for n in written if not os.path.isabs(n) and not os.path.normpath(n).startswith("..")]
        temporaries = [n for n in os.listdir(self.path) if n.startswith(atomic.TMP_PREFIX) and any(
            n.startswith(f"{atomic.TMP_PREFIX}{os.path.basename(w)}-") for w in inside + [RECORD_FILE])]
        paths = [self.file(n) for n in inside + temporaries]
        paths += [os.path.join(self.checkpoints, n) for n in checkpoint.owned_entries(self.checkpoints)]
        if os.path.isfile(os.path.join(self.file(SAVED_MODEL), EXPORT_MARKER)):
            paths.append(self.file(SAVED_MODEL))
        for member in _members(self.file(MEMBERS)):
            paths += member._owned() + [member.file(LOCK_FILE)]  # its lock went with its training
        return paths + [self.file(RECORD_FILE)]

    def _remove_owned(self) -> None:
        """Deletes what _owned lists, then the folders that left empty (checkpoints/, members/<k>/)."""
        paths = self._owned()  # every refusal comes before the first deletion
        for path in paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        folders = set()
        for path in paths:
            folder = os.path.dirname(path)
            while os.path.abspath(folder) != os.path.abspath(self.path) and folder.startswith(self.path):
                folders.add(folder)
                folder = os.path.dirname(folder)
        for folder in sorted(folders, key=len, reverse=True):
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)

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
        self.record(HISTORY_FILE)
        with open(self.file(HISTORY_FILE), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def history(self) -> list[dict]:
        """The epoch records of history.jsonl, one JSON object a line.

        A last line that is torn or garbage (what a kill during the append leaves) is dropped with
        a warning, and a writer rewrites the file without it, so the next append starts a line.

        Raises:
          RunDirError: a line before the last is not a JSON object; the message names the line.
        """
        path = self.file(HISTORY_FILE)
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        lines = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
        records = []
        for i, line in lines:
            record = _json_object(line)
            if record is None and i != lines[-1][0]:
                raise RunDirError(f"{path}, line {i}: not a JSON record of an epoch; repair or "
                                  "remove that line, or pass --overwrite to start afresh")
            if record is not None and _epoch_problem(record):
                raise RunDirError(f"{path}, line {i}: {_epoch_problem(record)}; repair or remove that "
                                  "line, or pass --overwrite to start afresh")
            if record is not None:
                records.append(record)
        if len(records) < len(lines):
            log.warning(f"{path}: dropped its last line, which is not a whole JSON record (a run "
                        f"killed while appending it): {lines[-1][1][:60]!r}")
        if self.writer and (len(records) < len(lines) or (lines and not text.endswith("\n"))):
            atomic.atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        return records

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
        self.record(name)
        suffix = os.path.splitext(name)[1]
        return atomic.atomic_write(self.file(name), content, suffix=suffix)

    def remove(self, name: str) -> bool:
        """Deletes one of the run's files; True if there was one."""
        if not self.writer or not os.path.isfile(self.file(name)):
            return False
        os.remove(self.file(name))
        return True

    def write_json(self, name: str, payload) -> str | None:
        if not self.writer:
            return None
        self.record(name)
        return atomic.atomic_write_json(self.file(name), payload)


def versions() -> dict:
    import keras
    import tensorflow as tf

    return {"brainseg": PROJECT_VERSION, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


def _check_identity(path: str, previous: dict, config: Config) -> None:
    """Refuses a run directory whose run differs from the flags in its identity fields."""
    old, new = _identity(previous), _identity(config.to_dict())
    diffs = [f"--{k}: run has {old[k]!r}, flags say {new[k]!r}" for k in old if old[k] != new[k]]
    if diffs:
        raise RunDirError(f"{path} holds a run with a different configuration:\n  " + "\n  ".join(diffs)
                          + "\nUse another --model_dir/--run_name, or pass --overwrite to start afresh.")


def _members(folder: str) -> list[RunDir]:
    """The fold members under members/ that are brainseg's runs; any other folder is left alone."""
    if not os.path.isdir(folder):
        return []
    members = []
    for name in sorted(os.listdir(folder)):
        member = RunDir(os.path.join(folder, name))
        try:
            ours = os.path.isdir(member.path) and member.read_config() is not None
        except RunDirError:
            ours = False
        if ours:
            members.append(member)
        else:
            log.info(f"--overwrite: leaving {member.path} alone: it is not a brainseg run")
    return members


def _json_object(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _epoch_problem(record: dict) -> str | None:
    """What makes a history record unusable: its epoch (and step) are what resuming compares."""
    epoch, step = record.get("epoch"), record.get("step", 0)
    if type(epoch) is not int or epoch < 1:
        return f"epoch must be a positive integer, got {epoch!r}"
    if type(step) is not int or step < 0:
        return f"step must be zero or a positive integer, got {step!r}"
    return None


def _identity(values: dict) -> dict:
    # A field added after the run was written reads as its default, so older runs still resume.
    defaults = Config()
    out = {k: values.get(k, getattr(defaults, k)) for k in RUN_IDENTITY_FIELDS}
    if out.get("data_dir"):
        out["data_dir"] = os.path.realpath(out["data_dir"])
    return out
