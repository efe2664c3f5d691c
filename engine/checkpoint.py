"""A hand-written checkpoint manager: atomic saves, verified restores, keeping the latest and the best."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil

import tensorflow as tf

from data import atomic
from data.atomic import fsync_dir as _fsync_dir
from engine.monitor import BestMetric

log = logging.getLogger(__name__)

# Layout of a checkpoint directory, `<directory>/ckpt-<step:09d>/`:
#   ckpt.index, ckpt.data-*   what tf.train.Checkpoint.write(<dir>/ckpt) writes
#   state.json                step, epoch, metrics, the monitor that ranks them, the run
#                             state, and the size and sha256 of every file above, with a
#                             checksum of itself
# Each checkpoint directory therefore verifies on its own, and the directory listing is the
# index: there is no separate manifest to fall out of date.
PREFIX = "ckpt"
STATE_FILE = "state.json"
CHECKPOINTS_SUBDIR = "checkpoints"  # <run_dir>/checkpoints, where the training loop keeps them
FORMAT = 1
_CKPT_DIR = re.compile(r"^ckpt-(\d+)$")
# Saves and deletions go through data/atomic.py's folder writes, whose temporary names are
# dot-prefixed (.tmp-, .old-, .del-) so they are never mistaken for checkpoints.


class CheckpointError(Exception):
    """A user-facing checkpoint problem. Its message names the path and what is wrong."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint on disk, as its state.json describes it."""

    name: str  # "ckpt-000001200"
    path: str  # absolute path of the checkpoint directory
    step: int
    epoch: int
    metrics: dict  # {"val_loss": 0.12, ...}; empty for mid-epoch saves
    state: dict  # JSON-able run state: policies, data order, best metric, ...
    monitor: str | None = None  # the metric its manager ranked checkpoints by
    mode: str | None = None  # "min" or "max" for that metric


class CheckpointManager:
    """Saves, verifies, restores and prunes the checkpoints of one run directory.

    One process writes a directory at a time: `remove_temporaries` treats every
    temporary name in it as left behind by a crash.
    """

    def __init__(self, *, directory: str, keep: int = 3, monitor: str = "val_loss",
                 mode: str = "min"):
        """Creates nothing on disk, so it can also point at another run's checkpoints.

        Args:
          directory: where the `ckpt-*` directories live.
          keep: how many of the latest checkpoints to keep, besides the best.
          monitor: the metric that picks the best checkpoint, e.g. "val_loss".
          mode: "min" or "max": whether a lower or a higher `monitor` is better.

        Raises:
          ValueError: `keep` is below 1 or `mode` is neither "min" nor "max".
        """
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the latest checkpoint must be kept (keep >= 1)")
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r}: expected 'min' or 'max'")
        self.directory = directory
        self.keep = keep
        self.monitor = monitor
        self.mode = mode
        self._reported: set[str] = set()  # damaged checkpoints already named in the log

    # -- Reading -----------------------------------------------------------------

    def entries(self) -> list[CheckpointInfo]:
        """Checkpoints whose state.json is intact, oldest first (their data is not hashed here).

        A checkpoint whose state.json is damaged is named in the log (once) and left out; the
        next save's retention removes it.
        """
        infos = []
        for _, path in _checkpoint_dirs(self.directory):
            try:
                infos.append(_info(path, _read_record(path)))
            except CheckpointError as e:
                if path not in self._reported:
                    self._reported.add(path)
                    log.info(f"A damaged checkpoint is not counted: {e}; the next save removes it")
        return infos

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint with the highest step, or None."""
        infos = self.entries()
        return infos[-1] if infos else None

    def best(self) -> CheckpointInfo | None:
        """The checkpoint with the best finite `monitor` (the earliest on ties), or None."""
        return _best(self.entries(), self.monitor, self.mode)

    # -- Writing -----------------------------------------------------------------

    def remove_temporaries(self) -> list[str]:
        """Cleans up after a crash: call once at start, before restoring.

        Removes partial saves and half-done deletions, and puts back a checkpoint
        that a crashed same-step replacement had moved aside.

        Returns:
          The paths removed.

        Raises:
          CheckpointError: the directory cannot be cleaned (e.g. it is read-only).
        """
        if not os.path.isdir(self.directory):
            return []
        try:
            restored, removed = atomic.recover_dirs(self.directory, names=lambda n: bool(_CKPT_DIR.match(n)))
        except OSError as e:
            raise CheckpointError(f"Could not clean up {self.directory}: {_reason(e)}") from e
        for final in restored:
            log.info(f"Put back checkpoint {final}: a save of the same step crashed before replacing it")
        return removed

    def save(self, checkpoint: tf.train.Checkpoint, *, step: int, epoch: int,
             metrics: dict[str, float], state: dict) -> CheckpointInfo:
        """Writes a checkpoint atomically, then applies retention.

        The variables are written into a temporary folder, every file and the folder
        are fsynced, and the folder is renamed into place (data/atomic.py), so a
        `ckpt-*` directory is always complete.

        Args:
          checkpoint: the variables to save (model, optimizer, step, ...).
          step: the run's global step; it names the checkpoint.
          epoch: the epoch to record with it.
          metrics: the metrics of this save, {} for a mid-epoch save.
          state: JSON-able run state restored with it (policies, data order, ...).

        Returns:
          The saved checkpoint.

        Raises:
          CheckpointError: the directory is unwritable or the disk is full. A
            partial save is removed and earlier checkpoints stay as they were.
          TypeError: `state` is not JSON-serialisable.
        """
        step, epoch = int(step), int(epoch)
        if step < 0 or epoch < 0:
            raise ValueError(f"step={step}, epoch={epoch}: both must be >= 0")
        record = {"format": FORMAT, "step": step, "epoch": epoch,
                  "metrics": {str(k): float(v) for k, v in metrics.items()},
                  "monitor": self.monitor, "mode": self.mode,
                  "state": _json_round_trip(state, f"state of checkpoint step {step}")}
        name = f"{PREFIX}-{step:09d}"
        final = os.path.join(self.directory, name)
        tmp = None
        try:
            _make_dirs(self.directory)
            tmp = atomic.temporary_dir(final)
            checkpoint.write(os.path.join(tmp, PREFIX))
            # Hashing reads the files back while they are still in the page
            # cache; the same open file is then fsynced.
            record["files"] = {f: _hash_file(os.path.join(tmp, f), fsync=True)
                               for f in sorted(os.listdir(tmp))}
            record["checksum"] = _checksum(record)
            _write_json(os.path.join(tmp, STATE_FILE), record)
            # A checkpoint of the same step is replaced: the second save of a step (an epoch end
            # after a --checkpoint_every_steps save) carries newer metrics and policy state.
            atomic.swap_in_dir(tmp, final)
        except BaseException as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (OSError, tf.errors.OpError)):
                raise CheckpointError(
                    f"Could not save checkpoint {name} in {self.directory}: {_reason(e)}. "
                    f"The partial save was removed; earlier checkpoints are intact.") from e
            raise
        info = _info(final, record)

        self._retain(info)
        return info

    # -- Restoring ---------------------------------------------------------------

    def newest_verified(self) -> CheckpointInfo | None:
        """The newest checkpoint that verifies, reporting each one skipped; None if there are none.

        Raises:
          CheckpointError: there are checkpoints but none verifies.
        """
        dirs = _checkpoint_dirs(self.directory)
        if not dirs:
            return None
        return first_that_verifies([p for _, p in reversed(dirs)], self.directory,
                                   advice="Move them away (or pass --overwrite) to start afresh.")

    # -- Internals ---------------------------------------------------------------

    def _retain(self, newest: CheckpointInfo) -> None:
        """Keeps the latest `keep`, the best and `newest`; deletes the rest, now that `newest` is on disk.

        Damaged checkpoints before `newest` go too: they can never be restored.
        """
        infos = self.entries()
        best = _best(infos, self.monitor, self.mode)
        kept = {i.name for i in infos[-self.keep:]} | {newest.name} | ({best.name} if best else set())
        intact = {i.path for i in infos}
        for doomed in infos:
            if doomed.name not in kept:
                self._delete(doomed.path)
        for old_step, path in _checkpoint_dirs(self.directory):
            if path not in intact and old_step < newest.step:
                self._delete(path)

    def _delete(self, path: str) -> None:
        try:
            atomic.remove_dir(path)
        except OSError as e:
            log.info(f"Could not delete the old checkpoint {path}: {_reason(e)}")


def verify(info_or_path: CheckpointInfo | str) -> CheckpointInfo:
    """Checks that every file of one checkpoint is present, of its saved size and sha256.

    Args:
      info_or_path: a CheckpointInfo or a checkpoint directory.

    Returns:
      The checkpoint, as its (intact) state.json describes it.

    Raises:
      CheckpointError: naming the checkpoint and the first file that does not match.
    """
    path = info_or_path.path if isinstance(info_or_path, CheckpointInfo) else str(info_or_path)
    record = _read_record(path)
    for name, saved in record["files"].items():
        file_path = os.path.join(path, name)
        try:
            size = os.path.getsize(file_path)
        except OSError as e:
            raise CheckpointError(f"checkpoint {path} is incomplete: {name}: {_reason(e)}") from None
        if size != saved["size"]:
            how = "truncated" if size < saved["size"] else "grown"
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is {size} bytes, "
                                  f"{saved['size']} were saved ({how})")
        if _hash_file(file_path)["sha256"] != saved["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: the content of {name} does not "
                                  f"match the sha256 recorded when it was saved")
    return _info(path, record)


def restore(checkpoint: tf.train.Checkpoint, info_or_path: CheckpointInfo | str, *,
            partial: bool = False) -> CheckpointInfo:
    """Verifies one checkpoint, then reads it into `checkpoint`.

    Args:
      checkpoint: the objects to restore into.
      info_or_path: a CheckpointInfo, a checkpoint directory, or anything
        `find_checkpoint` accepts.
      partial: True to restore only what `checkpoint` holds (e.g. a warm
        start of the model weights); False also requires every variable
        that `checkpoint` holds to be found in the checkpoint.

    Returns:
      The restored checkpoint.

    Raises:
      CheckpointError: it does not verify or does not fit `checkpoint`.
    """
    if isinstance(info_or_path, CheckpointInfo) or _is_checkpoint_dir(str(info_or_path)):
        info = verify(info_or_path)
    else:
        info = find_checkpoint(str(info_or_path))
    try:
        status = checkpoint.read(os.path.join(info.path, PREFIX))
        if partial:
            status.expect_partial()
        else:
            status.assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        reason = e.message if isinstance(e, tf.errors.OpError) else str(e)
        raise CheckpointError(f"checkpoint {info.path} does not fit this model: "
                              f"{reason.strip().splitlines()[0]}") from None
    return info


def find_checkpoint(path: str, *, monitor: str | None = None, mode: str | None = None) -> CheckpointInfo:
    """The checkpoint that --restore_from or --checkpoint names, verified.

    Args:
      path: a run directory, its checkpoints directory, or one checkpoint directory.
      monitor: the metric that picks the best; defaults to the one the run saved with.
      mode: "min" or "max" for `monitor`; defaults to the one the run saved with.

    Returns:
      The best checkpoint when one has the monitored metric, else the latest;
      if that one does not verify, the newest other one that does.

    Raises:
      CheckpointError: `path` holds no checkpoint, or none of them verifies.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist: expected a run directory, its "
                              f"'{CHECKPOINTS_SUBDIR}' folder or one {PREFIX}-* checkpoint folder")
    if _is_checkpoint_dir(path):
        return verify(path)
    directory = os.path.join(path, CHECKPOINTS_SUBDIR)
    if not os.path.isdir(directory):
        directory = path
    dirs = _checkpoint_dirs(directory)
    if not dirs:
        raise CheckpointError(f"{path} holds no checkpoints (looked for {PREFIX}-* folders in {directory})")
    infos = CheckpointManager(directory=directory).entries()
    if infos and not monitor:  # Without a monitor there is no best: the latest will do.
        monitor, mode = infos[-1].monitor, mode or infos[-1].mode
    best = _best(infos, monitor, mode or "min") if monitor else None
    candidates = ([best.path] if best else []) + [p for _, p in reversed(dirs) if not best or p != best.path]
    return first_that_verifies(candidates, directory, advice="Name another one, or train again.")


def first_that_verifies(paths: list[str], directory: str, *, advice: str) -> CheckpointInfo:
    """The first of `paths` that verifies, naming each one skipped in the log.

    Raises:
      CheckpointError: none verifies; the message lists why, then `advice`.
    """
    problems = []
    for path in paths:
        try:
            return verify(path)
        except CheckpointError as e:
            problems.append(str(e))
            log.info(f"Skipping a damaged checkpoint: {e}; falling back to the one before it")
    raise CheckpointError(f"None of the {len(paths)} checkpoints in {directory} verifies:\n  "
                          + "\n  ".join(problems) + "\n" + advice)


# -- Helpers -------------------------------------------------------------------

def _checkpoint_dirs(directory: str) -> list[tuple[int, str]]:
    """(step, path) of every ckpt-* directory, by step; a link is not one (it is never followed,
    so retention never deletes through it)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), os.path.join(os.path.abspath(directory), n))
             for n in names if (m := _CKPT_DIR.match(n))]
    return sorted(p for p in found if os.path.isdir(p[1]) and not os.path.islink(p[1]))


def owned_entries(directory: str) -> list[str]:
    """The names in `directory` this manager wrote: its ckpt-<step> folders (its index) and the
    temporaries of their saves and deletions; anything else there (ckpt-manual-backup, a link,
    `.tmp-ckpt-1-mine`) is not."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []

    def ours(name: str) -> bool:
        path = os.path.join(directory, name)
        if os.path.islink(path):
            return False
        if _CKPT_DIR.match(name):
            return os.path.isdir(path)
        temporary = atomic.parse_temporary(name)
        return temporary is not None and not temporary.suffix and bool(_CKPT_DIR.match(temporary.name))

    return sorted(n for n in names if ours(n))


def _is_checkpoint_dir(path: str) -> bool:
    """One checkpoint (rather than a folder of them): it has a state.json or a ckpt-* name."""
    return (os.path.isfile(os.path.join(path, STATE_FILE))
            or bool(_CKPT_DIR.match(os.path.basename(os.path.normpath(path)))))


def _read_record(path: str) -> dict:
    """A checkpoint's state.json, checked against its own checksum and its directory name."""
    state_path = os.path.join(path, STATE_FILE)
    try:
        with open(state_path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {STATE_FILE} is unreadable ({e})") from None
    if not isinstance(record, dict) or record.get("checksum") != _checksum(record):
        raise CheckpointError(f"checkpoint {path} is corrupt: {STATE_FILE} does not match its checksum")
    match = _CKPT_DIR.match(os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != record["step"]:
        raise CheckpointError(f"checkpoint {path} holds step {record['step']}, not the step in its name")
    return record


def _info(path: str, record: dict) -> CheckpointInfo:
    path = os.path.abspath(path)
    return CheckpointInfo(name=os.path.basename(path), path=path, step=record["step"],
                          epoch=record["epoch"], metrics=record["metrics"], state=record["state"],
                          monitor=record.get("monitor"), mode=record.get("mode"))


def _best(infos: list[CheckpointInfo], monitor: str, mode: str) -> CheckpointInfo | None:
    """The checkpoint that Keras' ModelCheckpoint(save_best_only=True) would hold: the policy that
    decides it is the one the loop's early stopping is tested against."""
    best, tracker = None, BestMetric(mode=mode)
    for info in infos:
        value = info.metrics.get(monitor)
        if value is not None and math.isfinite(value) and tracker.update(value):
            best = info
    return best


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _json_round_trip(value, what: str):
    """`value` round-tripped through JSON, so what is saved is exactly what a restore returns."""
    def scalar(o):  # numpy scalars (e.g. a policy's float32 best) become Python numbers.
        if getattr(o, "ndim", None) == 0 and hasattr(o, "item"):
            return o.item()
        raise TypeError(f"{type(o).__name__} {o!r}")
    try:
        return json.loads(json.dumps(value, default=scalar))
    except (TypeError, ValueError) as e:
        raise TypeError(f"The {what} is not JSON-serialisable: {e}") from None


def _hash_file(path: str, *, fsync: bool = False) -> dict:
    """Size and sha256 of a file, streamed; optionally fsyncs it through the same descriptor."""
    with open(path, "rb") as f:
        digest = hashlib.sha256()
        # hashlib.file_digest would do this, but needs Python 3.11; pyproject allows 3.10.
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
        return {"size": os.fstat(f.fileno()).st_size, "sha256": digest.hexdigest()}


def _write_json(path: str, payload) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _make_dirs(path: str) -> None:
    """makedirs, making each new directory's entry durable in its parent."""
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    parent = os.path.dirname(os.path.abspath(path))
    _make_dirs(parent)
    try:
        os.mkdir(path)
    except FileExistsError:  # Made by someone else meanwhile.
        if not os.path.isdir(path):
            raise
    _fsync_dir(parent)


def _reason(e: BaseException) -> str:
    """The OS's words for an OSError or a TensorFlow I/O error, without TF's op decorations."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({e.filename})" if e.filename else e.strerror
    text = e.message if isinstance(e, tf.errors.OpError) else str(e)
    text = re.sub(r"\{\{.*?\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\]", "", text).strip()
