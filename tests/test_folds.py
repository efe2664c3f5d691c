"""Tests for engine.folds: combining per-patient CSVs of k-fold runs, and its one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from engine import folds
from tests.helpers import REPO


def _write_csv(run_dir, scores, split="test"):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = ["patient,slices,positive_slices,dice"] + [f"{p},20,5,{d:.6f}" for p, d in scores.items()]
    (run_dir / f"per_patient_{split}.csv").write_text("\n".join(lines) + "\n")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "engine.folds", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_two_folds_combine_into_one_table(tmp_path):
    a, b = tmp_path / "fold0", tmp_path / "fold1"
    _write_csv(a, {"P1": 0.9, "P2": 0.1, "P3": 0.8, "P4": 0.7})
    _write_csv(b, {"P5": 0.0, "P6": 0.6, "P7": 0.95})
    summary = folds.summarize(folds.read_runs([str(a), str(b)]))
    assert summary["patients"] == 7
    assert summary["mean"] == pytest.approx((0.9 + 0.1 + 0.8 + 0.7 + 0.0 + 0.6 + 0.95) / 7)
    assert summary["median"] == pytest.approx(0.7)
    assert [(p, d) for p, d, _ in summary["worst"]] == [("P5", 0.0), ("P2", 0.1), ("P6", 0.6),
                                                        ("P4", 0.7), ("P3", 0.8)]
    assert [(n, round(m, 4)) for _, n, m in summary["per_run"]] == [(4, 0.625), (3, 0.5167)]

    proc = _run(a, b)
    assert proc.returncode == 0, proc.stderr
    assert "7 patients" in proc.stdout and "mean    0.5786" in proc.stdout and "median  0.7000" in proc.stdout
    assert "P5" in proc.stdout and "P1 " not in proc.stdout  # only the worst five are listed
    assert f"{b}  3 patients  mean 0.5167" in proc.stdout


def test_split_flag_picks_the_csv(tmp_path):
    _write_csv(tmp_path / "run", {"P1": 0.25}, split="val")
    proc = _run(tmp_path / "run", "--split=val")
    assert proc.returncode == 0, proc.stderr
    assert "val split of 1 runs: 1 patients" in proc.stdout and "mean    0.2500" in proc.stdout


def test_a_missing_csv_is_one_line_naming_it_and_exit_2(tmp_path):
    _write_csv(tmp_path / "fold0", {"P1": 0.9})
    (tmp_path / "fold1").mkdir()
    proc = _run(tmp_path / "fold0", tmp_path / "fold1")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(tmp_path / "fold1" / "per_patient_test.csv") in lines[0], proc.stderr
    assert "missing" in lines[0] and "Traceback" not in proc.stderr


def test_a_patient_in_two_runs_is_refused(tmp_path):
    _write_csv(tmp_path / "fold0", {"P1": 0.9, "P2": 0.5})
    _write_csv(tmp_path / "fold1", {"P2": 0.4, "P3": 0.3})
    with pytest.raises(folds.FoldsError, match="patient P2 is in both"):
        folds.read_runs([str(tmp_path / "fold0"), str(tmp_path / "fold1")])
    proc = _run(tmp_path / "fold0", tmp_path / "fold1")
    assert proc.returncode == 2 and "P2" in proc.stderr and "not disjoint folds" in proc.stderr


def test_columns_read_are_the_ones_evaluate_writes():
    from engine.evaluate import CSV_FIELDS
    assert folds.PATIENT in CSV_FIELDS and folds.DICE in CSV_FIELDS


def test_intervals_institutions_and_repeated_cuts(tmp_path):
    def fold(name, seed, scores):
        run = tmp_path / name
        _write_csv(run, scores)
        (run / "split.json").write_text(json.dumps({"seed": seed, "num_folds": 2, "train": [], "val": [],
                                                    "test": sorted(scores)}))
        return str(run)

    a = {"TCGA_CS_0001_1": 0.9, "TCGA_CS_0002_1": 0.5}
    b = {"TCGA_DU_0003_1": 0.7, "TCGA_DU_0004_1": 0.3}
    runs = [fold("s1f0", 1, a), fold("s1f1", 1, b),  # one cut of the four patients ...
            fold("s2f0", 2, {**{k: v - 0.1 for k, v in a.items()}, "TCGA_DU_0003_1": 0.5}),
            fold("s2f1", 2, {"TCGA_DU_0004_1": 0.1})]  # ... and a second cut, another seed
    summary = folds.summarize(folds.read_runs(runs))
    # Each patient averaged over the two cuts, then over patients.
    assert summary["patients"] == 4
    assert summary["mean"] == pytest.approx(np.mean([0.85, 0.45, 0.6, 0.2]))
    assert summary["ci_low"] < summary["mean"] < summary["ci_high"]
    assert summary["institutions"]["CS"]["mean"] == pytest.approx(0.65)
    assert summary["institutions"]["DU"]["mean"] == pytest.approx(0.4)
    assert sorted(summary["cuts"]) == ["seed 1, 2 folds", "seed 2, 2 folds"]
    text = folds.format_table(summary, "test")
    assert "95% CI" in text and "CS     2 patients  mean 0.6500" in text
    with pytest.raises(folds.FoldsError, match="not disjoint"):
        folds.read_runs([runs[0], fold("s1again", 1, {"TCGA_CS_0001_1": 0.2})])
