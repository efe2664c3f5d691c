"""`python -m data.inspect --data_dir DIR`: summarises a kaggle_3m folder and lists every problem."""

from __future__ import annotations

import collections
import json
import sys

import numpy as np
from absl import app, flags

from data import dataset as dataset_lib
from data.lgg import DataError

_DATA_DIR = flags.DEFINE_string("data_dir", "source_data", "Folder holding the Kaggle LGG download.")
_SKIP = flags.DEFINE_bool("skip_bad_slices", False,
                          "Mirror the training flag: report what training would skip instead of "
                          "what would stop it. The exit code is 1 whenever there are problems.")
_POSITIVE_FRACTION = flags.DEFINE_float(
    "positive_fraction", 0.5, "Mirror the training flag (the recipes use 0.5): data whose slices "
    "cannot fill epochs of this lesion-positive share is a problem, as training refuses it.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None,
                                 "Decode cache folder to read or fill (default: no cache, so "
                                 "inspecting never writes to disk).")
# Training's range of --positive_fraction (engine.config; not imported: data/ never imports engine).
flags.register_validator("positive_fraction", lambda v: 0 <= v < 1,
                         "must be in [0, 1), as training's --positive_fraction")


def summarize(report: dataset_lib.LoadReport, *, skip_bad_slices: bool,
              positive_fraction: float = 0.0) -> tuple[str, dict]:
    """Builds the readable summary and the final JSON record of a LoadReport.

    Args:
      report: from dataset.load_with_problems.
      skip_bad_slices: phrase the verdict as training with --skip_bad_slices would behave.
      positive_fraction: training's --positive_fraction, which needs both kinds of slices.

    Returns:
      (text, record): multi-line summary, and {"patients", "slices", "positive_slices", "problems"}.
    """
    ds, problems = report.dataset, list(report.problems)
    balance = dataset_lib.class_problem(int(ds.positive.sum()), len(ds.records), positive_fraction)
    problems += [balance] if balance and ds.records else []
    per_patient = collections.Counter(r.patient for r in ds.records)
    counts = np.array([per_patient[p] for p in ds.patients]) if ds.patients else np.zeros(1, int)
    positive = int(ds.positive.sum())
    lines = [
        f"dataset:          {report.dataset_root}{' (from decode cache)' if report.from_cache else ''}",
        f"patients:         {len(ds.patients)}",
        f"slices:           {len(ds.records)}",
        f"positive slices:  {positive} ({100 * positive / max(1, len(ds.records)):.1f}%)",
        f"slices/patient:   min {counts.min()}, median {np.median(counts):g}, max {counts.max()}",
        "data.csv:         " + ("missing or unreadable" if report.clinical_patients is None
                                else f"rows for {report.clinical_patients} of {len(ds.patients)} patients"),
        "per institution:",
    ]
    institutions = collections.defaultdict(lambda: [set(), 0, 0])
    for r, pos in zip(ds.records, ds.positive):
        entry = institutions[r.institution]
        entry[0].add(r.patient)
        entry[1] += 1
        entry[2] += int(pos)
    for inst in sorted(institutions):
        pats, n, pos = institutions[inst]
        lines.append(f"  {inst:<4} {len(pats):4d} patients {n:6d} slices {pos:6d} positive")
    lines.append(f"problems:         {len(problems)}")
    lines += [f"  {p}" for p in problems]
    if problems:
        lines.append(f"training with --skip_bad_slices would skip these and use {len(ds.records)} slices"
                     if skip_bad_slices else
                     "training would stop on these; fix the files or pass --skip_bad_slices")
    record = {"patients": len(ds.patients), "slices": len(ds.records),
              "positive_slices": positive, "problems": len(problems)}
    return "\n".join(lines), record


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        report = dataset_lib.load_with_problems(_DATA_DIR.value, cache_dir=_CACHE_DIR.value)
    except DataError as e:  # no patients found: still one problem and the final JSON line
        print(f"problems:         1\n  {e}")
        print(json.dumps({"patients": 0, "slices": 0, "positive_slices": 0, "problems": 1}))
        return 1
    text, record = summarize(report, skip_bad_slices=_SKIP.value, positive_fraction=_POSITIVE_FRACTION.value)
    print(text)
    print(json.dumps(record))
    sys.stdout.flush()
    return 1 if record["problems"] else 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with a bad flag as one line and exit code 2, as engine.main does."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"data.inspect: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
