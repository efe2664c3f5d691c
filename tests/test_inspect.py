"""Tests for `python -m data.inspect`, run as a user would: a subprocess, its output and exit code."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.inspect", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_clean_tree_summary_and_exit_0(fake_lgg_tree, tmp_path):
    root = fake_lgg_tree(lesion_slices={"TCGA_DU_0002_20010101": {1, 2, 3}})
    run = _inspect("--data_dir", tmp_path)
    assert run.returncode == 0, run.stderr
    assert _last_json(run.stdout) == {"patients": 3, "slices": 9, "positive_slices": 3, "problems": 0}
    assert f"dataset:          {root}" in run.stdout
    assert "slices/patient:   min 2, median 3, max 4" in run.stdout
    assert "data.csv:         rows for 3 of 3 patients" in run.stdout
    assert "  DU      1 patients      4 slices      3 positive" in run.stdout


def test_every_problem_is_listed_and_exit_1(fake_lgg_tree, tmp_path):
    root = fake_lgg_tree(data_csv=False)
    truncated = root / "TCGA_CS_0001_20000101" / "TCGA_CS_0001_20000101_1.tif"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    orphan = root / "TCGA_DU_0002_20010101" / "TCGA_DU_0002_20010101_2_mask.tif"
    (root / "TCGA_DU_0002_20010101" / "TCGA_DU_0002_20010101_2.tif").unlink()
    run = _inspect("--data_dir", tmp_path, "--skip_bad_slices", "--cache_dir", tmp_path / "cache")
    assert run.returncode == 1
    assert "Traceback" not in run.stdout + run.stderr
    assert _last_json(run.stdout) == {"patients": 3, "slices": 7, "positive_slices": 4, "problems": 2}
    assert f"{truncated}: unreadable or truncated TIFF" in run.stdout
    assert f"{orphan}: mask has no image" in run.stdout
    assert "training with --skip_bad_slices would skip these and use 7 slices" in run.stdout
    assert "data.csv:         missing" in run.stdout


def test_no_patients_found_is_reported_not_a_traceback(tmp_path):
    run = _inspect("--data_dir", tmp_path)
    assert run.returncode == 1
    assert "Traceback" not in run.stdout + run.stderr
    assert "no patients found" in run.stdout and str(tmp_path / "kaggle_3m") in run.stdout
    assert _last_json(run.stdout) == {"patients": 0, "slices": 0, "positive_slices": 0, "problems": 1}


@pytest.mark.real_data
def test_real_subset(lgg_real_data_dir):
    run = _inspect("--data_dir", lgg_real_data_dir)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _last_json(run.stdout) == {"patients": 55, "slices": 1934, "positive_slices": 694, "problems": 0}
