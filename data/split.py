"""The patient-level train/val/test split: made from a seed, or checked when read back."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

from data.lgg import DataError

SPLITS = ("train", "val", "test")
# Re-draws allowed to find a split where every part has lesion-positive slices. Each draw comes from
# one RandomState(seed), so the accepted split is still a pure function of the seed.
MAX_DRAWS = 1000

log = logging.getLogger(__name__)


def _group_split(groups: np.ndarray, n_out: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Splits slice indices so that exactly n_out whole groups (patients) land in the second part."""
    if n_out == 0:
        return np.arange(len(groups)), np.arange(0)
    splitter = GroupShuffleSplit(n_splits=1, test_size=n_out, random_state=rng)
    keep, out = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return keep, out


def make_split(dataset, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
               seed: int = 0, num_folds: int = 0, fold: int = 0) -> dict[str, list[str]]:
    """Splits the dataset's patients into train, val and test.

    Patients, never slices, are split (scikit-learn GroupShuffleSplit with the patient as group):
    neighbouring slices of one patient are nearly identical, so a slice-level split would leak test
    anatomy into training. Each part gets round(fraction * patients) patients (at least one), and
    draws are repeated from one RandomState(seed) until every part has lesion-positive slices.

    With num_folds > 0 the test part is instead fold `fold` of a k-fold cut of the patients (see
    _kfold_split), so the folds of one seed together hold out every patient exactly once.

    Args:
      dataset: an LggDataset (needs .records and .positive).
      val_fraction: fraction of patients for validation, in [0, 1); 0 for no validation part.
      test_fraction: fraction of patients for test, in [0, 1); val + test < 1. Unused with folds.
      seed: the split seed; the same seed and dataset always give the same split.
      num_folds: 0 for the fraction split, else the number of folds (>= 2).
      fold: which fold is the test part, in [0, num_folds); 0 when num_folds is 0.

    Returns:
      {"train": [...], "val": [...], "test": [...]}: sorted patient folder names, no overlap.

    Raises:
      ValueError: a fraction, num_folds or fold is out of range.
      DataError: the split is impossible (too few patients, or fewer than 3 with lesions).
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    if num_folds == 1 or num_folds < 0:
        raise ValueError(f"num_folds must be 0 (fraction split) or >= 2, got {num_folds}")
    if not (0 <= fold < num_folds or fold == num_folds == 0):
        raise ValueError(f"fold must be in [0, num_folds={num_folds}), got {fold}")
    groups = np.array([r.patient for r in dataset.records])
    if num_folds:
        return _kfold_split(groups, np.asarray(dataset.positive), val_fraction=val_fraction,
                            seed=seed, num_folds=num_folds, fold=fold)
    patients = sorted(set(groups.tolist()))
    with_lesions = sorted(set(groups[np.asarray(dataset.positive)].tolist()))
    n = len(patients)
    n_test = max(1, round(test_fraction * n)) if test_fraction else 0
    n_val = max(1, round(val_fraction * n)) if val_fraction else 0
    if n - n_test - n_val < 1:
        raise DataError(f"cannot split {n} patients into train/val/test with val_fraction={val_fraction}"
                        f" and test_fraction={test_fraction}: need at least 3 patients")
    parts_wanted = 1 + (n_test > 0) + (n_val > 0)
    if len(with_lesions) < parts_wanted:
        raise DataError(f"cannot give every split lesion-positive slices: only {len(with_lesions)} "
                        f"patient(s) have lesions ({', '.join(with_lesions) or 'none'}); need at least "
                        f"{parts_wanted}")
    positive = np.asarray(dataset.positive)
    rng = np.random.RandomState(seed)
    for _ in range(MAX_DRAWS):
        rest, test = _group_split(groups, n_test, rng)
        train, val = _group_split(groups[rest], n_val, rng)
        parts = {"train": rest[train], "val": rest[val], "test": test}
        if all(positive[idx].any() for idx in parts.values() if len(idx)):
            return {k: sorted(set(groups[idx].tolist())) for k, idx in parts.items()}
    raise DataError(f"no split of {n} patients ({len(with_lesions)} with lesions) with lesion-positive "
                    f"slices in every part after {MAX_DRAWS} draws; lower val/test fractions or add data")


def _kfold_split(groups: np.ndarray, positive: np.ndarray, *, val_fraction: float, seed: int,
                 num_folds: int, fold: int) -> dict[str, list[str]]:
    """Test = fold `fold` of the shuffled patients cut into num_folds near-equal chunks.

    The cut depends only on the seed and the patients, so the test parts of folds 0..k-1 partition
    the patients. Val is round(val_fraction * patients) (at least one) of the others, taken in
    shuffled order; the test part is fixed by the fold, so lesion-positive val and train parts are
    found by sliding the val window along the others rather than by re-drawing. Where the fold
    leaves too few lesion patients for both, train gets them and a warning says so.
    """
    patients = sorted(set(groups.tolist()))
    n = len(patients)
    if num_folds > n:
        raise DataError(f"--num_folds={num_folds} is more than the {n} patients; use at most {n} folds")
    order = [patients[i] for i in np.random.RandomState(seed).permutation(n)]
    chunks = np.array_split(np.arange(n), num_folds)
    test = [order[i] for i in chunks[fold]]
    held_out = set(test)
    rest = [p for p in order if p not in held_out]
    n_val = max(1, round(val_fraction * n)) if val_fraction else 0
    if len(rest) - n_val < 1:
        raise DataError(f"--num_folds={num_folds} leaves {len(rest)} of {n} patients outside the test "
                        f"fold, too few for {n_val} val and at least 1 train; use fewer folds or a "
                        "smaller --val_fraction")
    has_lesion = {p: bool(positive[groups == p].any()) for p in patients}
    if not any(has_lesion[p] for p in test):
        log.warning("fold %d of %d: no test patient has lesion-positive slices", fold, num_folds)
    windows = [[rest[(offset + i) % len(rest)] for i in range(n_val)] for offset in range(len(rest))]
    if n_val == 0:  # no validation part: every patient outside the test fold trains
        return {"train": sorted(rest), "val": [], "test": sorted(test)}
    # Both parts with lesions if any window allows it; else at least train, which must learn them.
    for strict in (True, False):
        for val in windows:
            train = [p for p in rest if p not in val]
            if any(has_lesion[p] for p in train) and (any(has_lesion[p] for p in val) or not strict):
                if not strict:
                    log.warning("fold %d of %d: no val patient has lesion-positive slices", fold, num_folds)
                return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    raise DataError(f"fold {fold} of --num_folds={num_folds}: none of the {len(rest)} patients outside "
                    "the test fold has lesion-positive slices to train on; use fewer folds or add data")


def check_split(stored, dataset, source) -> dict[str, list[str]]:
    """Validates a stored split (split.json's content) against the dataset.

    Args:
      stored: the parsed JSON: a dict with "train", "val" and "test" lists of patient names.
      dataset: the LggDataset it must fit.
      source: where it came from, for the messages (a path).

    Returns:
      {"train": [...], "val": [...], "test": [...]} of sorted patient folder names.

    Raises:
      DataError: it is not such a dict, names patients not in the dataset, or lists one twice.
    """
    try:
        if not isinstance(stored, dict):
            raise TypeError(f"expected a JSON object, got {type(stored).__name__}")
        split = {k: stored[k] for k in SPLITS}
        if not all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in split.values()):
            raise TypeError("each split must be a list of patient names")
    except (KeyError, TypeError) as e:
        raise DataError(f"{source}: unreadable split file ({type(e).__name__}: {e}); "
                        "delete it to make a new split") from None
    unknown = sorted({p for v in split.values() for p in v} - set(dataset.patients))
    if unknown:
        raise DataError(f"{source}: names {len(unknown)} patient(s) not in the dataset: "
                        f"{', '.join(unknown)}; use the same --data_dir as the run, or a new run_dir")
    seen: dict[str, str] = {}
    for k in SPLITS:
        for p in split[k]:
            if p in seen:
                raise DataError(f"{source}: patient {p} is in both {seen[p]} and {k}")
            seen[p] = k
    unused = len(dataset.patients) - len(seen)
    if unused:
        log.warning(f"{source}: {unused} dataset patient(s) are in no split and will not be used")
    return {k: sorted(v) for k, v in split.items()}
