"""Loads a kaggle_3m folder into one checked in-memory LggDataset (scan, then decode)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import re
from typing import Iterable

import numpy as np

from data import decode as decode_lib
from data import lgg
from data.lgg import DataError, Problem, SliceRecord

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class LggDataset:
    """Every usable slice, in (patient, slice number) order, with its uint8 image and {0,1} mask."""

    records: tuple[SliceRecord, ...]
    images: np.ndarray  # uint8 [N, 256, 256, 3]
    masks: np.ndarray  # uint8 [N, 256, 256], values {0, 1}

    @functools.cached_property
    def patients(self) -> list[str]:
        """Sorted patient folder names."""
        return sorted({r.patient for r in self.records})

    @functools.cached_property
    def positive(self) -> np.ndarray:
        """bool [N]: the slice's mask has at least one lesion pixel."""
        return self.masks.reshape(len(self.masks), -1).max(axis=1, initial=0) > 0 if len(self.masks) else (
            np.zeros(0, bool))  # an empty part of a split (no validation patients)

    def indices_of(self, patients: Iterable[str]) -> np.ndarray:
        """Indices of the slices of the given patients, in dataset order.

        Args:
          patients: patient folder names.

        Returns:
          int64 [K] indices into records/images/masks.

        Raises:
          DataError: a patient is not in the dataset.
        """
        wanted = set(patients)
        unknown = sorted(wanted - set(self.patients))
        if unknown:
            raise DataError(f"patients not in the dataset: {', '.join(unknown)}")
        return np.array([i for i, r in enumerate(self.records) if r.patient in wanted], np.int64)

    @functools.cached_property
    def patient_slices(self) -> dict[str, np.ndarray]:
        """Each patient's slice indices, in slice order: the volumes that evaluation, the
        post-processing and per-volume inputs work on."""
        return {p: self.indices_of([p]) for p in self.patients}

    def subset(self, patients: Iterable[str]) -> "LggDataset":
        """A new LggDataset with only the given patients' slices (arrays are copied)."""
        idx = self.indices_of(patients)
        return LggDataset(tuple(self.records[i] for i in idx), self.images[idx], self.masks[idx])


def default_cache_dir() -> str:
    """The decoded-slice cache folder: $XDG_CACHE_HOME/brainseg, else ~/.cache/brainseg."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "brainseg")


def _natural_order(problem: Problem) -> tuple:
    """Sorts problems by path with digit runs compared as numbers (slice _9 before _10)."""
    parts = re.split(r"(\d+)", problem.path)
    return tuple((int(t), "") if t.isdigit() else (-1, t) for t in parts), problem.reason


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What load_with_problems found: the usable dataset, every problem, and some context."""

    dataset: LggDataset
    problems: tuple[Problem, ...]
    dataset_root: pathlib.Path
    from_cache: bool
    clinical_patients: int | None  # patients with a data.csv row; None if data.csv is missing


def load_with_problems(data_dir, *, cache_dir: str | None = None) -> LoadReport:
    """Scans and decodes everything, collecting every problem instead of raising on them.

    Args:
      data_dir: the --data_dir folder, in any supported layout.
      cache_dir: decode cache folder, or None for no cache.

    Returns:
      A LoadReport whose dataset holds only the good slices.

    Raises:
      DataError: no patient folders were found.
    """
    root = lgg.find_dataset_root(data_dir)
    records, scan_problems = lgg.scan(root)
    decoded = decode_lib.decode(records, cache_dir=cache_dir)
    dataset = LggDataset(decoded.records, decoded.images, decoded.masks)
    clinical = lgg.read_clinical_patients(root)
    with_rows = None
    if clinical is not None:
        with_rows = sum(lgg.clinical_id(p) in clinical for p in dataset.patients)
    problems = tuple(sorted(scan_problems + list(decoded.problems), key=_natural_order))
    return LoadReport(dataset, problems, root, decoded.from_cache, with_rows)


def load(data_dir, *, skip_bad_slices: bool = False, cache_dir: str | None = None) -> LggDataset:
    """Loads and validates a kaggle_3m folder.

    Args:
      data_dir: the --data_dir folder: DIR/kaggle_3m, DIR/lgg-mri-segmentation/kaggle_3m, or the
        patient folders directly in DIR.
      skip_bad_slices: log each problem and skip the affected slices instead of raising.
      cache_dir: decode cache folder (see default_cache_dir), or None for no cache.

    Returns:
      The LggDataset of every good slice.

    Raises:
      DataError: no patients found; any bad file when skip_bad_slices is False (the message lists all
        of them); or no usable slice left.
    """
    report = load_with_problems(data_dir, cache_dir=cache_dir)
    ds, problems = report.dataset, report.problems
    if problems and not skip_bad_slices:
        raise DataError(
            f"{len(problems)} problem(s) in {report.dataset_root}:\n{lgg.format_problems(problems)}\n"
            "Fix or remove these files, or pass --skip_bad_slices to skip the affected slices.")
    for p in problems:
        log.info(f"skipping bad input: {p}")
    if problems:
        log.info(f"skipped {len(problems)} problem(s) in {report.dataset_root} "
            f"({len({p.path for p in problems})} file(s)); {len(ds.records)} good slices remain")
    if not ds.records:
        raise DataError(f"{report.dataset_root}: no usable slices found")
    clinical = ("no data.csv" if report.clinical_patients is None
                else f"data.csv rows for {report.clinical_patients}/{len(ds.patients)} patients")
    log.info(f"loaded {len(ds.records)} slices ({int(ds.positive.sum())} lesion-positive) of "
        f"{len(ds.patients)} patients from {report.dataset_root}"
        f"{' (decode cache)' if report.from_cache else ''}; {clinical}")
    return ds


def class_problem(num_positive: int, num_slices: int, positive_fraction: float) -> str | None:
    """Why slices with this many lesion-positive ones cannot fill epochs of this share, or None."""
    n_pos = int(round(positive_fraction * num_slices)) if positive_fraction > 0 else 0
    if n_pos and not num_positive:
        return (f"--positive_fraction={positive_fraction:g} asks for lesion-positive slices, but none of "
                f"the {num_slices} training slices has a lesion; use --positive_fraction=0")
    if positive_fraction > 0 and n_pos < num_slices and num_positive == num_slices:
        return (f"--positive_fraction={positive_fraction:g} asks for lesion-free slices, but every one of "
                f"the {num_slices} training slices has a lesion; use --positive_fraction=0 or 1")
    return None
