"""Decodes LGG slice TIFFs in parallel into checked uint8 arrays, with a checksummed on-disk cache."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import struct
import zlib

import numpy as np
import tifffile

from data.lgg import Problem, SliceRecord
# The one atomic write (data/atomic.py imports nothing of the project).
from data import atomic

SLICE_SHAPE = (256, 256)
IMAGE_SHAPE = SLICE_SHAPE + (3,)
# Bump when the cache layout or the decoding rules change, so old caches are rebuilt, not misread.
CACHE_FORMAT = 1
CACHE_MAGIC = b"BSLGGC01"
# Preamble: magic, header length (uint64), crc32 of the header (uint32); then the JSON header, the
# images and the masks as raw C-order uint8.
_PREAMBLE = struct.Struct("<8sQI")
# Checksum granularity: big enough that zlib's per-call overhead vanishes, small enough that two
# threads overlap reading one chunk with checksumming the previous one.
CHUNK_BYTES = 64 << 20

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Decoded:
    """The decoded slices that passed validation, and the problems of those that did not."""

    records: tuple[SliceRecord, ...]  # only the good ones
    images: np.ndarray  # uint8 [N, 256, 256, 3]
    masks: np.ndarray  # uint8 [N, 256, 256], values {0, 1}
    problems: tuple[Problem, ...]
    from_cache: bool


def _tiff_error(e: Exception) -> str:
    return f"unreadable or truncated TIFF ({type(e).__name__}: {e})"


def multi_page(pages: int) -> str:
    """What is wrong with a TIFF of several pages: which one is the slice is anybody's guess."""
    return f"multi-page TIFF ({pages} pages): expected one slice per file"


def read_page(path: str, check, out: np.ndarray | None = None) -> tuple[np.ndarray | None, str | None]:
    """The one TIFF read: a single-page file, its page checked by `check(shape, dtype)` (what is
    wrong, or None) before it is decoded, into `out` when given.

    Returns:
      (array, None), or (None, what is wrong with the file).
    """
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) > 1:
                return None, multi_page(len(tif.pages))
            page = tif.pages[0]
            problem = check(tuple(page.shape), np.dtype(page.dtype))
            if problem:
                return None, problem
            return page.asarray(out=out, maxworkers=1), None  # we parallelise across files
    except Exception as e:  # noqa: BLE001 - any tifffile/zlib/OS failure is a bad file, not a crash
        return None, _tiff_error(e)


def _image_problem(shape: tuple, dtype: np.dtype) -> str | None:
    if shape[:2] == SLICE_SHAPE and shape != IMAGE_SHAPE:
        return f"image is not 3-channel: shape {shape}, expected {IMAGE_SHAPE}"
    if shape != IMAGE_SHAPE:
        return f"wrong image shape {shape}, expected {IMAGE_SHAPE}"
    return f"wrong image dtype {dtype}, expected uint8" if dtype != np.uint8 else None


def _mask_problem(shape: tuple, dtype: np.dtype) -> str | None:
    if shape != SLICE_SHAPE:
        return f"wrong mask shape {shape}, expected {SLICE_SHAPE} (single-channel)"
    return f"wrong mask dtype {dtype}, expected uint8" if dtype != np.uint8 else None


def _read_image(path: str, out: np.ndarray) -> str | None:
    """Reads one image straight into `out`; returns what is wrong with it, or None."""
    return read_page(path, _image_problem, out)[1]


def _read_mask(path: str, out: np.ndarray) -> str | None:
    """Reads one mask into `out` as {0, 1}; returns what is wrong with it, or None."""
    problem = read_page(path, _mask_problem, out)[1]
    if problem:
        return problem
    top = int(out.max())
    # Fast path (two vector passes): every nonzero pixel equals the maximum, which is 1 or 255.
    if top not in (0, 1, 255) or (top and np.count_nonzero(out) != np.count_nonzero(out == top)):
        values = set(np.flatnonzero(np.bincount(out.ravel(), minlength=256)).tolist())
        shown = ", ".join(str(v) for v in sorted(values)[:6]) + (", ..." if len(values) > 6 else "")
        return f"mask values {{{shown}}} are outside {{0, 255}} (or {{0, 1}})"
    np.minimum(out, 1, out=out)
    return None


def _decode_slice(record: SliceRecord, image_out: np.ndarray, mask_out: np.ndarray) -> list[Problem]:
    problems = []
    reason = _read_image(record.image_path, image_out)
    if reason:
        problems.append(Problem(record.image_path, reason))
    reason = _read_mask(record.mask_path, mask_out)
    if reason:
        problems.append(Problem(record.mask_path, reason))
    return problems


def default_workers() -> int:
    """Thread count for decoding: file reads release the GIL but tifffile's header parsing does not,
    so threads beyond about twice the cores only add contention."""
    return min(8, 2 * (os.cpu_count() or 1))


def _decode_files(records: tuple[SliceRecord, ...], workers: int) -> tuple[Decoded, list[int]]:
    """Decodes every slice; returns the Decoded and the indices of the bad slices."""
    n = len(records)
    images = np.empty((n,) + IMAGE_SHAPE, np.uint8)
    masks = np.empty((n,) + SLICE_SHAPE, np.uint8)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        per_slice = list(pool.map(lambda i: _decode_slice(records[i], images[i], masks[i]), range(n)))
    good = np.array([not p for p in per_slice], bool)
    problems = tuple(p for ps in per_slice for p in ps)
    if not good.all():
        # Copies ~1 GB only when some slices are bad; the usual all-good case keeps the arrays as-is.
        images, masks = images[good], masks[good]
    kept = tuple(r for r, ok in zip(records, good) if ok)
    return Decoded(kept, images, masks, problems, from_cache=False), np.flatnonzero(~good).tolist()


def cache_key(records) -> str:
    """Hashes every image and mask path with its size, mtime, ctime and inode (and the rules' version).

    Any added, removed, renamed, rewritten or touched file changes the key, so a stale cache is never
    used. A copy that keeps the mtime (`cp -p`, `rsync -t`, `tar`) still changes the ctime, which no
    tool can set back, and a file replaced by a copy has a new inode. A file that cannot be stat'ed
    hashes as size -1 and will fail decoding with a named problem.

    Args:
      records: the SliceRecords to decode, in order.

    Returns:
      A sha256 hex digest.
    """
    h = hashlib.sha256(f"brainseg-lgg-cache/{CACHE_FORMAT}/{IMAGE_SHAPE}\n".encode())
    for r in records:
        for path in (r.image_path, r.mask_path):
            try:
                st = os.stat(path)
                facts = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            except OSError:
                facts = (-1, -1, -1, -1)
            # fsencode: a path that is not valid UTF-8 hashes by its bytes.
            h.update(os.fsencode(path) + "\t{}\t{}\t{}\t{}\n".format(*facts).encode())
    return h.hexdigest()


def cache_path(cache_dir, records) -> pathlib.Path:
    """The cache file for this list of files: named by the paths only, so an edited dataset
    overwrites its own stale cache instead of piling up new files, and two datasets sharing a
    cache_dir (real and synthetic, say) do not evict each other."""
    h = hashlib.sha256(b"\n".join(os.fsencode(r.image_path) + b"\t" + os.fsencode(r.mask_path)
                                  for r in records))
    return pathlib.Path(cache_dir) / f"lgg-decoded-{h.hexdigest()[:20]}.bin"


def _array_views(arrays) -> list[memoryview]:
    """Splits arrays into CHUNK_BYTES byte views, the unit of both I/O and checksums."""
    views = []
    for a in arrays:
        flat = memoryview(a).cast("B")
        views += [flat[i:i + CHUNK_BYTES] for i in range(0, len(flat), CHUNK_BYTES)]
    return views


def _write_cache(path: pathlib.Path, key: str, records, decoded: Decoded, bad: list[int]) -> None:
    """Writes the cache atomically (data/atomic.py), never fsynced."""
    views = _array_views([decoded.images, decoded.masks])
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        crcs = list(pool.map(zlib.crc32, views))
    header = json.dumps({
        "format": CACHE_FORMAT,
        "key": key,
        "num_records": len(records),
        "bad_indices": bad,
        "problems": [[p.path, p.reason] for p in decoded.problems],
        "num_good": len(decoded.records),
        "chunk_bytes": CHUNK_BYTES,
        "crc32": crcs,
    }).encode()
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(_PREAMBLE.pack(CACHE_MAGIC, len(header), zlib.crc32(header)))
            f.write(header)
            for v in views:
                f.write(v)

    # Not durable: a crash may leave a renamed but partial file, which the size check and checksums
    # reject on the next load; fsyncing 1 GB would cost more than an occasional rebuild.
    atomic.atomic_write(str(path), write, durable=False)


def _read_cache(path: pathlib.Path, key: str, records) -> Decoded | None:
    """Returns the cached Decoded, or None (with a log line saying why) if it is missing or unusable."""
    if not path.exists():
        return None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic, header_len, header_crc = _PREAMBLE.unpack(f.read(_PREAMBLE.size))
        if magic != CACHE_MAGIC:
            raise ValueError("bad magic")
        header_bytes = f.read(header_len)
        if len(header_bytes) != header_len or zlib.crc32(header_bytes) != header_crc:
            raise ValueError("header truncated or corrupt")
        header = json.loads(header_bytes)
        if header["format"] != CACHE_FORMAT or header["chunk_bytes"] != CHUNK_BYTES:
            raise ValueError(f"format {header['format']} is not {CACHE_FORMAT}")
        if header["key"] != key or header["num_records"] != len(records):
            log.info("decode cache %s is stale (files changed); rebuilding it", path)
            return None
        n = header["num_good"]
        images = np.empty((n,) + IMAGE_SHAPE, np.uint8)
        masks = np.empty((n,) + SLICE_SHAPE, np.uint8)
        expected = _PREAMBLE.size + header_len + images.nbytes + masks.nbytes
        if size != expected:
            raise ValueError(f"size {size} bytes, expected {expected} (truncated?)")
        views = _array_views([images, masks])
        if len(views) != len(header["crc32"]):
            raise ValueError("chunk count does not match the header")
        # Read chunk k while a worker checksums chunk k-1: both release the GIL.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            futures = []
            for v in views:
                if f.readinto(v) != len(v):
                    raise ValueError("short read (truncated?)")
                futures.append(pool.submit(zlib.crc32, v))
            crcs = [fut.result() for fut in futures]
        if crcs != header["crc32"]:
            raise ValueError("checksum mismatch (corrupt)")
    bad = set(header["bad_indices"])
    kept = tuple(r for i, r in enumerate(records) if i not in bad)
    if len(kept) != n:
        raise ValueError("record count does not match the header")
    problems = tuple(Problem(p, r) for p, r in header["problems"])
    return Decoded(kept, images, masks, problems, from_cache=True)


def decode(records, *, cache_dir: str | None, workers: int | None = None) -> Decoded:
    """Reads and validates every slice image and mask, using the disk cache when it is valid.

    Each image must be a readable 256x256x3 uint8 TIFF; each mask a readable 256x256 uint8 TIFF with
    values in {0, 255} or {0, 1} (returned as {0, 1}). Failures become Problems naming the file and
    the reason; the slice is left out of the result. Nothing from tifffile escapes as an exception.

    The cache is one uncompressed file per list of files (cache_path): a JSON header carrying the
    key (cache_key: sha256 of every path, size and mtime_ns) and the crc32 of every 64 MiB chunk,
    then the raw arrays. Loading it is a size check, a read and a crc32 (~0.5 s per GB per core).
    crc32 over every byte rather than a cryptographic hash: the cache guards against truncation and
    disk or copy corruption, not an adversary, and crc32 catches any burst error of up to 32 bits and
    other damage with probability 1 - 2**-32 per chunk. Hashing only a strided sample would be
    cheaper still but would miss damage between samples, so every byte is checked. A stale (key
    mismatch), truncated (size mismatch) or corrupt (checksum mismatch) cache is logged and rebuilt.
    The cache is written atomically (temp file + rename), so readers never see a half-written file.

    Args:
      records: SliceRecords from data.lgg.scan.
      cache_dir: folder for the decoded cache; None disables caching.
      workers: decoding threads; None means default_workers().

    Returns:
      A Decoded with the good slices, in input order, and the problems of the bad ones.
    """
    records = tuple(records)
    workers = workers or default_workers()
    if cache_dir is None or not records:
        return _decode_files(records, workers)[0]
    key, path = cache_key(records), cache_path(cache_dir, records)
    try:
        cached = _read_cache(path, key, records)
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, whatever the damage
        log.warning("decode cache %s is unusable (%s); rebuilding it", path, e)
        cached = None
    if cached is not None:
        return cached
    decoded, bad = _decode_files(records, workers)
    try:
        _write_cache(path, key, records, decoded, bad)
    except OSError as e:
        log.warning("could not write decode cache %s (%s); continuing without it", path, e)
    return decoded
