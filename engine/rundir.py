"""The run directory: every file name in it, its lock, its identity check, and all writes to it."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import functools
import importlib.metadata
import json
import logging
import os
import platform
import shutil

from data import atomic
from engine import checkpoint
from engine.checkpoint import CHECKPOINTS_SUBDIR as CHECKPOINTS
from engine.config import RUN_IDENTITY_FIELDS, Config

log = logging.getLogger(__name__)


def _project_version() -> str:
    try:
        return importlib.metadata.version("brainseg")
    except importlib.metadata.PackageNotFoundError:  # a source tree run without installing it
        return "unknown"


PROJECT_VERSION = _project_version()
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.jsonl"
FINAL_MODEL = "final_model.keras"
INFERENCE_FILE = "inference.json"  # what evaluate, predict and export apply (inference.InferenceSpec)
SAVED_MODEL = "saved_model"
ONNX_EXPORT = "onnx"  # --export_format=onnx's default folder: model.onnx and its marker
LOCK_FILE = ".lock"
MEMBERS = "members"  # <run_dir>/members/<k>/: the run directories of an ensemble's fold members
# The relative path of every file the engine writes in a run directory, added before the file is
# written: --overwrite removes these and nothing else, so a user's file of a similar name stays.
RECORD_FILE = "written.json"
EVENTS = "events.out.tfevents.*"  # TensorFlow names the event file; the run records the one it made
EXPORT_MARKER = "brainseg_export.json"  # written by export beside its SavedModel (export.METADATA_FILE)
# What training writes, replaces or appends to by these fixed names: none may be a link.
ENGINE_NAMES = (LOCK_FILE, RECORD_FILE, CONFIG_FILE, SPLIT_FILE, HISTORY_FILE, CHECKPOINTS, FINAL_MODEL,
                INFERENCE_FILE, SAVED_MODEL, MEMBERS)
# What training would replace or delete in a folder that holds no brainseg run: a user's.
_REPLACED = (FINAL_MODEL, HISTORY_FILE, INFERENCE_FILE)


class RunDirError(Exception):
    """The run directory holds something incompatible with this run, or is in use."""


def confined(root: str, name: str, *, source: str) -> str:
    """The path of `name` under `root`, for a write, a replacement or a deletion.

    The one rule for every path brainseg changes in its folders: a relative path of plain parts
    (none empty, "." or "..") none of which is a symbolic link, so nothing is ever written or
    deleted through a link or outside `root`. `root` itself may be a link (the user's choice).

    Args:
      root: the folder brainseg owns (a run directory, a member's).
      name: the relative path, as the engine or one of its records gives it.
      source: where the name comes from, for the message (a record's path, "the run folder").

    Raises:
      RunDirError: one line naming `source` and the name (or the link); nothing has been changed.
    """
    parts = name.split("/") if isinstance(name, str) else [""]
    if not name or name.startswith("/") or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise RunDirError(f"{source}: the entry {name!r} is not a path inside {root}; nothing was "
                          "changed: remove that entry (or the file), or use another --model_dir")
    path = root
    for part in parts:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise RunDirError(
                f"{path} is a symbolic link (to {os.readlink(path)}): brainseg never writes or deletes "
                f"through a link inside its folder ({source}); nothing was changed: replace it with a "
                "copy of what it points to (cp -r, not cp -rs), or use another --model_dir")
    return path


def _writes(reader_result=lambda self, *args, **kwargs: None):
    """A method that writes: for a reader (writer=False) it writes nothing and returns
    reader_result(self, *args) instead, as SummaryWriter(None) writes nothing."""
    def wrap(method):
        @functools.wraps(method)
        def writing(self, *args, **kwargs):
            if not self.writer:
                return reader_result(self, *args, **kwargs)
            return method(self, *args, **kwargs)
        return writing
    return wrap


class RunDir:
    """One run's directory: the paths of its files, and the only code that writes them.

    A reader (evaluate, predict, export, a non-chief worker) gets `writer=False`: it reads the
    same files, and every write is a no-op. Every path written, replaced, appended to or deleted
    goes through `confined`.
    """

    def __init__(self, path: str, *, writer: bool = True):
        self.path = path
        self.writer = writer
        self._lock_fd: int | None = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _target(self, name: str) -> str:
        return confined(self.path, name, source="the run folder")

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

    def check(self, *, overwrite: bool) -> None:
        """Refuses, writing nothing, a folder that training could not write safely.

        Refused: a link among the files training writes; a written.json entry that leaves the
        folder; a config.json or written.json that is not brainseg's; a run that --overwrite was
        removing when it was stopped, unless --overwrite again; a folder that holds files of the
        engine's names (final_model.keras, a history, checkpoints) but no brainseg run, which
        training would replace.

        Raises:
          RunDirError: one line naming the file; nothing has been written.
        """
        if not os.path.isdir(self.path):
            return
        for name in ENGINE_NAMES:
            self._target(name)
        record = self._record()
        previous = self.read_config()
        if record is not None and record.get("overwriting") and not overwrite:
            raise RunDirError(f"{self.path} was being removed by --overwrite when that command "
                              "stopped; pass --overwrite again to start it afresh")
        if previous is not None:
            return
        written = set(record["written"]) if record else set()
        foreign = [n for n in _REPLACED if os.path.lexists(self.file(n)) and n not in written]
        ours = [os.path.join(CHECKPOINTS, n) for n in checkpoint.owned_entries(self.checkpoints)]
        if foreign or (record is None and ours):
            why = f"the folder has no {CONFIG_FILE}" + ("" if record is None else f" and {RECORD_FILE} does not list it")
            raise RunDirError(f"{self.file((foreign or ours)[0])} is not a file of a brainseg run ({why}): "
                              "training would replace it; move it away or use another --model_dir")
        left = [n for n in sorted(written - {CONFIG_FILE, RECORD_FILE, LOCK_FILE})
                if os.path.lexists(self.file(n))] + ours
        if left and not overwrite:
            raise RunDirError(f"{self.path} holds what a run wrote ({left[0]}) but not its {CONFIG_FILE}: "
                              "it was being removed or was damaged, and is not resumed; pass "
                              "--overwrite to start it afresh, or use another --model_dir")

    @_writes(lambda self, *args, **kwargs: self)
    def open(self, config: Config, runtime: dict | None = None) -> "RunDir":
        """Locks the directory for this process, checks its identity and records the config.

        A directory that holds a run of another configuration (model shape, image size, data
        or split) is refused with what differs, unless --overwrite, which removes what the run
        recorded writing (see _remove_owned) and nothing else, and starts from step 0. A folder
        whose config.json brainseg did not write is never touched; `check` lists the rest.

        Returns:
          self.

        Raises:
          RunDirError: the directory is locked by another run, holds a different run, a run
            that kept no record of its files (with --overwrite), a damaged history, a link
            among its files, or cannot be written.
        """
        try:
            self.check(overwrite=config.overwrite)
            os.makedirs(self.path, exist_ok=True)
            self.lock()
            self.check(overwrite=config.overwrite)  # what another process left while we waited
            previous, written = self.read_config(), self.written()
            if config.overwrite and (previous is not None or written is not None):
                log.info(f"--overwrite: removing the files the previous run wrote in {self.path}")
                self._remove_owned()
            elif previous is not None:
                _check_identity(self.path, previous, config)
                self.history()  # a torn last line goes now, before this run appends to it
            if previous is None or config.overwrite:
                atomic.atomic_write_json(self._target(RECORD_FILE), {"written": []})
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
        path = self._target(LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
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

    def _record(self) -> dict | None:
        """written.json, checked: a list of paths confined to the folder, and whether an --overwrite
        was removing them; None for a run without a record.

        Raises:
          RunDirError: the record is unreadable, not brainseg's, or names a path outside the
            folder or through a link.
        """
        path = self.file(RECORD_FILE)
        stored = atomic.read_json_object(path, RunDirError, "move it away or use another --model_dir")
        if stored is None:
            return None
        names = stored.get("written")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(
                stored.get("overwriting", False), bool):
            raise RunDirError(f"{path} is not brainseg's record of its files; move it away or use "
                              "another --model_dir")
        for name in names:
            confined(self.path, name, source=path)
        return stored

    def written(self) -> list[str] | None:
        """The relative paths the engine recorded writing here, or None for a run without a record.

        Raises:
          RunDirError: the record is unreadable, not brainseg's, or names a path it cannot own.
        """
        record = self._record()
        return None if record is None else record["written"]

    @_writes()
    def record(self, *names: str) -> None:
        """Adds paths to the record, before they are written, so a crash midway leaves them listed.

        A directory without a record (a run begun before brainseg kept one, a bare model folder)
        gets none: a record that missed the run's first files would pass for a complete one.
        """
        if not os.path.exists(self.file(RECORD_FILE)):
            return
        known = self.written()
        if not set(names) <= set(known):
            for name in names:
                self._target(name)
            atomic.atomic_write_json(self._target(RECORD_FILE), {"written": sorted({*known, *names})})

    @_writes(lambda self, folder, pattern, make: make())
    def recording(self, folder: str, pattern: str, make):
        """Returns make(), recording the entries matching `pattern` that it created in `folder`
        (relative): files whose names another library picks, as TensorFlow's event file."""
        where = self.file(folder)
        listing = lambda: set(os.listdir(where)) if os.path.isdir(where) else set()  # noqa: E731
        before = listing()
        made = make()
        self.record(*(os.path.join(folder, n) for n in sorted(listing() - before)
                      if fnmatch.fnmatch(n, pattern)))
        return made

    def _owned(self) -> list[str]:
        """Every path --overwrite removes here, config.json and written.json last: the recorded
        files and their temporaries, the checkpoint manager's own checkpoints, a SavedModel export
        writes its marker into, and the same in each member that is brainseg's.

        A run with no record (begun before brainseg kept one) is refused rather than cleaned by
        name patterns: a pattern cannot tell the engine's eval_test.md from the user's
        eval_my_notes.md, and a refusal deletes nothing.

        Raises:
          RunDirError: this run or a member has no record, or a record names a path outside
            its folder or through a link; nothing has been removed yet.
        """
        written = self.written()
        if written is None:
            raise RunDirError(f"{self.path} holds a run written before brainseg recorded its files "
                              f"in {RECORD_FILE}, so --overwrite cannot tell its files from yours and "
                              "removes nothing: delete the folder yourself or use another --model_dir")
        last = [n for n in (CONFIG_FILE, RECORD_FILE) if os.path.lexists(self.file(n))]
        paths = [self._target(n) for n in written if n not in last and os.path.lexists(self.file(n))]
        paths += [self.file(n) for n in self._temporaries(written)]
        paths += [os.path.join(self._target(CHECKPOINTS), n) for n in checkpoint.owned_entries(self.checkpoints)]
        for export in (SAVED_MODEL, ONNX_EXPORT):  # only what the export recorded: a user's file stays
            paths += export_owned(self._target(export))
        for member in _members(self._target(MEMBERS)):
            paths += member._owned() + [member._target(LOCK_FILE)]  # its lock went with its training
        return paths + [self.file(n) for n in last]

    def _temporaries(self, written: list[str]) -> list[str]:
        """The temporaries of the recorded files left here by a killed write: exactly the form
        data/atomic.py gives them (`.tmp-config.json-<pid>[.json]`), never a name merely like it."""
        ours = {os.path.basename(w): {"", os.path.splitext(w)[1]} for w in [*written, RECORD_FILE]
                if "/" not in w}
        found = []
        for entry in os.listdir(self.path):
            temporary = atomic.parse_temporary(entry)
            if (temporary is not None and temporary.prefix == atomic.TMP_PREFIX
                    and temporary.suffix in ours.get(temporary.name, ())
                    and not os.path.islink(self.file(entry)) and os.path.isfile(self.file(entry))):
                found.append(entry)
        return found

    def _remove_owned(self) -> None:
        """Deletes what _owned lists, then the folders that left empty (checkpoints/, members/<k>/).

        written.json is marked first and goes last, after config.json: a kill midway leaves a
        folder `check` recognises, which only --overwrite continues, and never resumes.
        """
        paths = self._owned()  # every refusal comes before the first deletion
        atomic.atomic_write_json(self._target(RECORD_FILE), {"written": self.written(), "overwriting": True})
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
            if os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder):
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

    @_writes()
    def append_history(self, record: dict) -> None:
        self.record(HISTORY_FILE)
        fd = os.open(self._target(HISTORY_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "a") as f:
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
            atomic.atomic_write(self._target(HISTORY_FILE),
                                "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        return records

    @_writes()
    def truncate_history(self, last_epoch: int) -> None:
        """Drops records past the restored epoch, written before a crash hit the checkpoint."""
        records = self.history()
        kept = [r for r in records if r.get("epoch", 0) <= last_epoch]
        if len(kept) != len(records):
            atomic.atomic_write(self._target(HISTORY_FILE),
                                "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    @_writes()
    def write(self, name: str, content) -> str | None:
        """Atomically writes one of the run's files (bytes, text, or a path writer; see atomic_write)."""
        self.record(name)
        suffix = os.path.splitext(name)[1]
        return atomic.atomic_write(self._target(name), content, suffix=suffix)

    @_writes(lambda self, name: False)
    def remove(self, name: str) -> bool:
        """Deletes one of the run's files; True if there was one."""
        path = self._target(name)
        if not os.path.isfile(path):
            return False
        os.remove(path)
        return True

    @_writes()
    def write_json(self, name: str, payload) -> str | None:
        self.record(name)
        return atomic.atomic_write_json(self._target(name), payload)


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
    """The fold members under members/ that are brainseg's runs (a brainseg config.json, or its
    record of a member whose config.json is gone); any other folder, and a link, is left alone."""
    if not os.path.isdir(folder):
        return []
    members = []
    for name in sorted(os.listdir(folder)):
        member = RunDir(os.path.join(folder, name))
        try:
            ours = (os.path.isdir(member.path) and not os.path.islink(member.path)
                    and (member.read_config() is not None or os.path.isfile(member.file(RECORD_FILE))))
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


def _confined(name) -> bool:
    """A recorded path that stays inside its folder: relative, no '.', '..' or empty parts."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        return False
    return all(part not in ("", ".", "..") for part in name.rstrip("/").split("/"))


def export_record(folder: str) -> list[str] | None:
    """What an export recorded writing in `folder` (its brainseg_export.json's "written": relative
    paths, folders ending in '/'), the marker itself included; None where there is no marker, or
    it is one from before exports kept a record.

    Raises:
      RunDirError: the marker is unreadable, or its record names a path outside the folder.
    """
    path = os.path.join(folder, EXPORT_MARKER)
    if os.path.islink(folder) or not os.path.isfile(path):
        return None
    stored = atomic.read_json_object(path, RunDirError, "move the folder away or choose another --export_dir")
    names = stored.get("written")
    if names is None:
        return None
    if not isinstance(names, list) or not all(_confined(n) for n in names):
        bad = next((n for n in names if not _confined(n)), names) if isinstance(names, list) else names
        raise RunDirError(f"{path}: written must list paths inside {folder}, got {bad!r}; move the "
                          "folder away or choose another --export_dir")
    return sorted({*names, EXPORT_MARKER})


def export_owned(folder: str) -> list[str]:
    """The files --overwrite removes from an export in a run (and its recorded folders that are
    empty): only recorded paths, none reached through a symbolic link inside the folder."""
    owned = []
    for name in export_record(folder) or ():
        relative = name.rstrip("/")
        path = os.path.join(folder, relative)
        inside = os.path.normpath(os.path.join(os.path.realpath(folder), os.path.dirname(relative)))
        if os.path.realpath(os.path.dirname(path)) != inside:
            continue  # a link on the way: what lies behind it is not the export's
        if name.endswith("/"):
            if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
                owned.append(path)
        elif os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path)):
            owned.append(path)
    return owned
