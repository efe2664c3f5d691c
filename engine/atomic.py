"""The one atomic write: a temporary file beside the target, fsynced, then renamed over it."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

# Temporary names start with this, so cleaners (the checkpoint manager, --overwrite) know them.
TMP_PREFIX = ".tmp-"


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
