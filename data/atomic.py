"""The one atomic write of a file or a folder: a temporary beside the target, fsynced, then renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

# Temporary names start with these, so cleaners (the checkpoint manager, export, --overwrite) know
# them: a write in progress, a folder moved aside while its replacement goes in, a folder being
# deleted. Each ends in "-<pid>" of the process that made it.
TMP_PREFIX, OLD_PREFIX, DEL_PREFIX = ".tmp-", ".old-", ".del-"


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
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.path.basename(path)}-", suffix=suffix,
                               dir=folder)
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
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


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
    path = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(final)}-{os.getpid()}")
    if os.path.exists(path):
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
    old = os.path.join(parent, f"{OLD_PREFIX}{os.path.basename(final)}-{os.getpid()}")
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
                          f"{DEL_PREFIX}{os.path.basename(path)}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def recover_dirs(parent: str, *, names: Callable[[str], bool] = lambda name: True,
                 alive: Callable[[int], bool] = lambda pid: False) -> tuple[list[str], list[str]]:
    """Cleans up after writes that crashed in `parent`: puts back every moved-aside folder whose
    replacement never arrived, and removes temporaries and half-done deletions.

    Args:
      parent: the folder to clean.
      names: which final names are this caller's (the part between the prefix and "-<pid>").
      alive: whether a pid's process still runs: its temporaries are left alone.

    Returns:
      (the folders put back, the temporaries removed).
    """
    restored, removed = [], []
    for entry in sorted(os.listdir(parent)):
        prefix = next((p for p in (TMP_PREFIX, OLD_PREFIX, DEL_PREFIX) if entry.startswith(p)), None)
        if prefix is None or "-" not in entry[len(prefix):]:
            continue
        name, pid = entry[len(prefix):].rsplit("-", 1)
        if not names(name) or not pid.isdigit() or alive(int(pid)):
            continue
        path, final = os.path.join(parent, entry), os.path.join(parent, name)
        if prefix == OLD_PREFIX and not os.path.exists(final):
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
