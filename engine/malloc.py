"""glibc malloc thresholds for TensorFlow's CPU tensors: puts back the limits tf.data switches off.

The first tf.data iterator of a process over a generator (every distributed dataset has one)
calls mallopt(M_TRIM_THRESHOLD, 128 KiB). Setting any threshold turns off glibc's adaptive
policy, so the mmap threshold also stays at 128 KiB: every tensor above it is mapped fresh and
unmapped when freed, and its pages are faulted in again at the next step. On a 2-core Zen 3 that
was 260,000 page faults a second and 40% of the training time in the kernel (BUILD.md, "Host
memory"). `apply(True)` sets what the adaptive policy itself grows to: mmap above 32 MiB (its
ceiling) and trim above twice that. Nothing is computed differently: the same bits, sooner.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import tensorflow as tf

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
TUNED = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}
TENSORFLOW = {M_MMAP_THRESHOLD: 128 << 10, M_TRIM_THRESHOLD: 128 << 10}  # what tf.data leaves


@functools.lru_cache(maxsize=None)
def _mallopt():
    """glibc's mallopt, or None on another C library or system."""
    if not sys.platform.startswith("linux") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
        return None
    return getattr(ctypes.CDLL("libc.so.6"), "mallopt", None)


@functools.lru_cache(maxsize=None)
def _let_tf_data_set_its_threshold() -> None:
    """Makes TensorFlow apply its once-per-process mallopt now, so that ours comes after it."""
    dataset = tf.data.Dataset.from_generator(lambda: iter(()), output_signature=tf.TensorSpec([], tf.int32))
    for _ in dataset:
        pass


def apply(tuned: bool) -> bool:
    """Sets the thresholds: TUNED, or TensorFlow's own. Returns False where there is no glibc."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _let_tf_data_set_its_threshold()
    for option, value in (TUNED if tuned else TENSORFLOW).items():
        if mallopt(option, value) != 1:
            raise OSError(f"mallopt({option}, {value}) failed")
    return True
