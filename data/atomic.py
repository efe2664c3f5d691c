"""The one atomic write of a file or a folder: a temporary beside the target, fsynced, then renamed into place."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, NamedTuple

# Temporary names start with these, so cleaners (the checkpoint manager, export, --overwrite) know
# them: a write in progress, a folder moved aside while its replacement goes in, a folder being
# deleted. Each is exactly <prefix><final name>-<pid>[<suffix>], the pid of the process that made
# it: a user's `.tmp-config.json-mine.txt` or `.old-exp-20240101` is not of that form.
TMP_PREFIX, OLD_PREFIX, DEL_PREFIX = ".tmp-", ".old-", ".del-"
_TEMPORARY = re.compile(r"^(\.tmp-|\.old-|\.del-)(.+)-([1-9][0-9]*)(\.[A-Za-z0-9]+)?$")


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 4194304  # Linux's largest


PID_MAX = _pid_max()


class Temporary(NamedTuple):
    """A temporary's name taken apart: prefix, the final name it stands for, pid, suffix."""

    prefix: str
    name: str
    pid: int
    suffix: str


def temporary_name(prefix: str, name: str, suffix: str = "") -> str:
    """The name of this process's temporary for `name` (see parse_temporary)."""
    return f"{prefix}{name}-{os.getpid()}{suffix}"


def parse_temporary(entry: str) -> Temporary | None:
    """The parts of a name of temporary_name's form, or None for any other name (a user's).

    The pid must be one a process can have, so a date (`.old-exp-20240101`) is not one.
    """
    found = _TEMPORARY.match(entry)
    if not found or int(found.group(3)) > PID_MAX:
        return None
    return Temporary(found.group(1), found.group(2), int(found.group(3)), found.group(4) or "")


def fsync_dir(path: str) -> None:
    """Makes a directory's entries (a rename into it, say) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, content: bytes | str | Callable[[str], None], *, suffix: str = "",
                 durable: bool = True) -> str:
    """Writes `path` so that a reader sees the old file or the new one, never a part of either.

    Args:
      path: the file to write.
      content: bytes or text, or a function that writes the file at the temporary path it is
        given (for writers that take a path, like Keras' model.save or tifffile).
      suffix: ending of the temporary name, for writers that go by it (".keras", ".tif").
      durable: fsync the file and its folder, so the new file survives a power cut; False
        keeps the all-or-nothing rename but skips the fsyncs (outputs that can be remade).

    Returns:
      path.

    Raises:
      OSError: the folder is not writable or the disk is full; the temporary file is removed
        and an existing file at `path` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, temporary_name(TMP_PREFIX, os.path.basename(path), suffix))
    fd = _create(tmp)
    try:
        if callable(content):
            os.close(fd)
            fd = None
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                fd = None
                f.write(content.encode() if isinstance(content, str) else content)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(folder)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    return path


def _create(tmp: str) -> int:
    """Creates this process's temporary file, never through a link.

    One process writes one path at a time, so a file already there was left by a dead process
    that had the same pid: it is replaced.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(tmp, flags, 0o644)
    except FileExistsError:
        if os.path.islink(tmp) or not os.path.isfile(tmp):
            raise
        os.remove(tmp)
        return os.open(tmp, flags, 0o644)


def read_json_object(path: str, error: type[Exception], advice: str, *, object_only: bool = True):
    """The JSON object in `path`, or None if there is no such file.

    Raises:
      error: the file is unreadable, not JSON, or (object_only) not an object; the message
        names the path and ends with `advice` (what the user can do).
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{path} is unreadable ({type(e).__name__}: {e}); {advice}") from None
    if object_only and not isinstance(payload, dict):
        raise error(f"{path} does not hold a JSON object; {advice}")
    return payload


def atomic_write_json(path: str, payload) -> str:
    """atomic_write of a JSON document (sorted keys, indented)."""
    return atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def temporary_dir(final: str) -> str:
    """A new empty folder beside `final` (same file system, so renaming it into place is atomic)."""
    parent = os.path.dirname(os.path.abspath(final))
    path = os.path.join(parent, temporary_name(TMP_PREFIX, os.path.basename(final)))
    if os.path.isdir(path) and not os.path.islink(path):  # a dead process's with the same pid
        shutil.rmtree(path)
    os.mkdir(path)
    return path


def swap_in_dir(tmp: str, final: str) -> str:
    """Puts the finished folder `tmp` at `final`, replacing a folder already there.

    The old folder is renamed aside (`.old-<name>-<pid>`) and deleted only once the new one is in
    place, so a crash leaves the new folder, or the old one (or its moved-aside copy, which
    `recover_dirs` puts back); never a half-written one.

    Raises:
      OSError: a rename failed; the old folder is put back where it can be.
    """
    parent = os.path.dirname(os.path.abspath(final))
    old = os.path.join(parent, temporary_name(OLD_PREFIX, os.path.basename(final)))
    fsync_dir(tmp)
    moved = os.path.exists(final)
    if moved:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if moved and not os.path.exists(final):
            os.replace(old, final)
        raise
    fsync_dir(parent)
    if moved:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_dir(path: str) -> None:
    """Deletes a folder so that a crash midway never leaves it half deleted under its own name."""
    doomed = os.path.join(os.path.dirname(os.path.abspath(path)),
                          temporary_name(DEL_PREFIX, os.path.basename(path)))
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def recover_dirs(parent: str, *, names: Callable[[str], bool] = lambda name: True,
                 alive: Callable[[int], bool] = lambda pid: False,
                 owned: Callable[[str], bool] = lambda path: True) -> tuple[list[str], list[str]]:
    """Cleans up after writes that crashed in `parent`: puts back every moved-aside folder whose
    replacement never arrived, and removes temporaries and half-done deletions.

    Only entries of temporary_name's exact form are touched, never a link, and only those the
    caller claims: a name like a temporary's that is not one stays.

    Args:
      parent: the folder to clean.
      names: which final names are this caller's (the part between the prefix and "-<pid>").
      alive: whether a pid's process still runs: its temporaries are left alone.
      owned: whether a temporary's content is the caller's (a marker it writes first, say).

    Returns:
      (the folders put back, the temporaries removed).
    """
    restored, removed = [], []
    for entry in sorted(os.listdir(parent)):
        temporary, path = parse_temporary(entry), os.path.join(parent, entry)
        if (temporary is None or temporary.suffix or not names(temporary.name)
                or os.path.islink(path) or alive(temporary.pid) or not owned(path)):
            continue
        prefix, final = temporary.prefix, os.path.join(parent, temporary.name)
        if prefix == OLD_PREFIX and not os.path.lexists(final):
            os.replace(path, final)
            fsync_dir(parent)
            restored.append(final)
        elif os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(path)
        else:
            os.remove(path)
            removed.append(path)
    return restored, removed
