"""Runs are safe from each other and from a user's mistakes: the run lock, --overwrite, exit codes,
precision changes, odd paths, stale caches, the synthetic writer and predict's symlinks."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from data import decode as decode_lib
from data import lgg
from engine import export
from engine.checkpoint import CheckpointManager, verify
from engine.inference_spec import InferenceSpec
from engine.segmenter import Segmenter
from tests.helpers import (REPO, config_flags, pointwise_model, read_history, run_engine,
                           synthetic_dir, tiny_config)

pytestmark = pytest.mark.slow


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "engine.main", *args], cwd=REPO,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(proc, needle, timeout=180) -> str:
    deadline, lines = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return "".join(lines)
    raise AssertionError(f"never saw {needle!r}:\n{''.join(lines)}")


def _error_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's C++ start-up lines, which ignore TF_CPP_MIN_LOG_LEVEL."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(
        ("I0000", "W0000", "E0000", "WARNING: All log messages"))]


# --- 1. the run lock ---------------------------------------------------------------------------------


def test_a_second_training_into_a_run_directory_in_use_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = _start(config_flags(tiny_config(run_dir, epochs=3)))
    _wait_for_line(first, "Training from step")
    second = run_engine(config_flags(tiny_config(run_dir, epochs=3, learning_rate=1e-3)))
    assert second.returncode == 2, second.stdout + second.stderr
    lines = _error_lines(second.stderr)
    assert len(lines) == 1 and str(run_dir) in lines[0] and f"pid {first.pid}" in lines[0], lines
    out, _ = first.communicate(timeout=180)
    assert first.returncode == 0, out
    assert [h["epoch"] for h in read_history(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / "config.json").read_text())["config"]["learning_rate"] == 1e-2
    assert len([n for n in os.listdir(run_dir) if n.startswith("events.out.tfevents")]) == 1
    # The kernel released the lock with the process: the same command now resumes.
    assert "Resumed from" in run_engine(config_flags(tiny_config(run_dir, epochs=3)), check=True).stdout


# --- 2. --overwrite removes the engine's files and nothing else ----------------------------------------


def test_overwrite_refuses_a_folder_brainseg_did_not_write(tmp_path):
    folder = tmp_path / "theirs"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "checkpoints" / "model-epoch-50.pt").write_bytes(b"weights")
    (folder / "notes.md").write_text("my notes")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    for overwrite in (False, True):
        proc = run_engine(config_flags(tiny_config(folder, epochs=1, overwrite=overwrite)))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = _error_lines(proc.stderr)
        assert len(lines) == 1 and "not written by brainseg" in lines[0], lines
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != ".lock") == before
    assert (folder / "checkpoints" / "model-epoch-50.pt").read_bytes() == b"weights"


def test_overwrite_of_a_brainseg_run_keeps_the_users_own_files(tmp_path):
    run_dir = tmp_path / "run"
    run_engine(config_flags(tiny_config(run_dir, epochs=1)), check=True)
    (run_dir / "notes.md").write_text("my notes")
    (run_dir / "checkpoints" / "model-epoch-50.pt").write_bytes(b"weights")
    (run_dir / "eval_plan.txt").write_text("not ours")  # close to our names, but not one of them
    old = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("ckpt-"))
    run_engine(config_flags(tiny_config(run_dir, epochs=1, base_filters=8, overwrite=True)), check=True)
    assert (run_dir / "notes.md").read_text() == "my notes"
    assert (run_dir / "checkpoints" / "model-epoch-50.pt").read_bytes() == b"weights"
    assert (run_dir / "eval_plan.txt").exists()
    assert json.loads((run_dir / "config.json").read_text())["config"]["base_filters"] == 8
    assert len(read_history(run_dir)) == 1  # the old run's history went with it
    new = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("ckpt-"))
    assert new == old  # same steps, but written by the new run
    assert len([n for n in os.listdir(run_dir) if n.startswith("events.out.tfevents")]) == 1


def test_a_config_json_that_is_not_an_object_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("[]")
    proc = run_engine(config_flags(tiny_config(run_dir, epochs=1)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "config.json was not written by brainseg" in proc.stderr
    assert (run_dir / "config.json").read_text() == "[]"


# --- 3. an interrupted run says so, and leaves no stale final model --------------------------------------


def test_an_interrupted_run_exits_143_and_removes_the_final_model_it_goes_past(tmp_path):
    run_dir = tmp_path / "run"
    run_engine(config_flags(tiny_config(run_dir, epochs=1)), check=True)
    assert (run_dir / "final_model.keras").exists()
    args = config_flags(tiny_config(run_dir, epochs=2))
    proc = _start(args)
    _wait_for_line(proc, "Training from step")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out  # 128 + SIGTERM: interrupted, resumable
    assert "interrupted by SIGTERM" in out and "run the same command to resume" in out
    saved = int(out.split("SIGTERM received: saved a checkpoint at step ")[1].split()[0])
    latest = CheckpointManager(directory=str(run_dir / "checkpoints")).latest()
    assert latest.step == saved
    verify(latest)
    assert not (run_dir / "final_model.keras").exists()
    evaluated = run_engine([*args, "--mode=evaluate"])
    assert evaluated.returncode == 1 and "final_model.keras does not exist" in evaluated.stderr
    resumed = run_engine(args, check=True)
    assert f"Training from step {saved} " in resumed.stdout
    assert (run_dir / "final_model.keras").exists()
    assert [h["epoch"] for h in read_history(run_dir)] == [1, 2]


# --- 4. a run resumes under another precision ---------------------------------------------------------


def test_a_run_resumes_under_another_precision_and_back(tmp_path):
    run_dir = tmp_path / "run"
    run_engine(config_flags(tiny_config(run_dir, epochs=1, precision="float32")), check=True)
    for epochs, first, then in ((2, "float32", "mixed_float16"), (3, "mixed_float16", "float32")):
        proc = run_engine(config_flags(tiny_config(run_dir, epochs=epochs, precision=then)))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"trained in {first} so far; it continues in {then}" in proc.stdout
        assert ("with a fresh float16 loss scale" in proc.stdout) == (then == "mixed_float16")
    history = read_history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2, 3] and np.isfinite(history[-1]["loss"])


# --- 6. paths that are not UTF-8, and the decode cache off -------------------------------------------


def test_a_data_dir_that_is_not_utf8_trains_and_a_model_dir_is_a_clear_error(tmp_path):
    odd = os.path.join(os.fsencode(tmp_path), b"data-\xff")
    os.symlink(os.fsencode(synthetic_dir()), odd)
    data_dir = os.fsdecode(odd)  # how Python hands such a command-line argument over
    run_dir = tmp_path / "run"
    proc = run_engine(config_flags(tiny_config(run_dir, epochs=1, data_dir=data_dir)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run_dir / "final_model.keras").exists()
    bad_run = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"run-\xfe"))
    proc = run_engine([*config_flags(tiny_config(tmp_path / "x", epochs=1)), f"--model_dir={bad_run}"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: --model_dir:") and "UTF-8" in lines[0]


def test_the_decode_cache_can_be_turned_off(tmp_path):
    run_dir = tmp_path / "run"
    run_engine(config_flags(tiny_config(run_dir, epochs=1, decode_cache=False,
                                        cache_dir=str(tmp_path / "cache"))), check=True)
    assert not (tmp_path / "cache").exists()


# --- 8. the synthetic writer's --out --------------------------------------------------------------------


def test_synthetic_out_that_is_a_file_or_a_dataset_is_one_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (tmp_path / "done" / "kaggle_3m").mkdir(parents=True)
    for out, words in ((a_file, "is a file"), (tmp_path / "done", "already exists")):
        proc = subprocess.run([sys.executable, "-m", "data.synthetic", f"--out={out}", "--patients=1"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = _error_lines(proc.stderr)
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert a_file.read_text() == "x"


# --- 10. predict follows symlinked patient folders -------------------------------------------------------


def test_predict_reads_a_tree_whose_patient_folders_are_symlinks(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    pointwise_model(64).save(str(model_dir / "final_model.keras"))
    linked = tmp_path / "subset" / "kaggle_3m"
    linked.mkdir(parents=True)
    patients = lgg.find_patient_dirs(synthetic_dir())[:2]
    for folder in patients:
        os.symlink(folder, linked / folder.name)
    os.symlink(linked, linked / "loop")  # a link back up the tree is walked once
    out = tmp_path / "out"
    config = tiny_config(model_dir, mode="predict", input=str(linked), output=str(out))
    proc = run_engine(config_flags(config), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for folder in patients:
        images = [p for p in folder.iterdir() if not p.stem.endswith("_mask")]
        assert len(images) > 10
        for image in images:
            assert (out / folder.name / f"{image.stem}_mask.tif").exists(), image


# --- 11. the decode cache sees a file copied over with its mtime kept -------------------------------------


def test_a_mask_rewritten_with_its_mtime_kept_is_not_served_from_the_cache(fake_lgg_tree, tmp_path):
    root = fake_lgg_tree()
    records, _ = lgg.scan(root)
    cache = str(tmp_path / "cache")
    assert not decode_lib.decode(records, cache_dir=cache).problems
    assert decode_lib.decode(records, cache_dir=cache).from_cache
    mask = records[0].mask_path
    st = os.stat(mask)
    bad = tifffile.imread(mask)
    bad[0, 0] = 128
    tifffile.imwrite(mask, bad)
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p, rsync -t and tar do
    again = decode_lib.decode(records, cache_dir=cache)
    assert not again.from_cache
    assert any(p.path == mask and "128" in p.reason for p in again.problems), again.problems


# --- 12. --synthetic_patients never writes into the user's folder ---------------------------------------


def test_synthetic_patients_never_writes_into_a_folder_with_something_in_it(tmp_path):
    data = tmp_path / "mine"
    (data / "archive" / "kaggle_3m").mkdir(parents=True)  # a layout the loader does not look in
    (data / "archive" / "kaggle_3m" / "README.txt").write_text("mine")
    proc = run_engine(config_flags(tiny_config(tmp_path / "run", data_dir=str(data), epochs=1,
                                               synthetic_patients=3)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--synthetic_patients" in proc.stderr and "not empty" in proc.stderr
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == [
        "archive", "archive/kaggle_3m", "archive/kaggle_3m/README.txt"]


# --- 13. the smaller ones ---------------------------------------------------------------------------------


def test_a_killed_export_leaves_nothing_the_next_export_does_not_clean(tmp_path):
    model = pointwise_model(64)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = tmp_path / "exports"
    (parent / f".tmp-saved_model-{dead.pid}").mkdir(parents=True)
    (parent / f".tmp-saved_model-{dead.pid}" / "saved_model.pb").write_bytes(b"half")
    (parent / f".tmp-saved_model-{dead.pid}" / export.METADATA_FILE).write_text("{}\n")  # written first
    live = parent / f".tmp-saved_model-{os.getppid()}"  # an export running now is left alone
    live.mkdir()
    segmenter = Segmenter([model], InferenceSpec(), image_size=64, sources=["test"])
    export.export_saved_model(segmenter, str(parent / "saved_model"))
    assert sorted(p.name for p in parent.iterdir()) == [live.name, "saved_model"]
    # Killed after moving the previous export aside: the next export puts it back, then replaces it.
    os.rename(parent / "saved_model", parent / f".old-saved_model-{dead.pid}")
    export.export_saved_model(segmenter, str(parent / "saved_model"))
    assert sorted(p.name for p in parent.iterdir()) == [live.name, "saved_model"]


def test_a_damaged_final_model_is_reported_as_damaged_and_the_run_s_own_file_is_accepted(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pointwise_model(64).save(str(run_dir / "final_model.keras"))
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", np.full((64, 64, 3), 30, np.uint8))
    common = dict(mode="predict", input=str(src), output=str(tmp_path / "out"))
    ok = run_engine(config_flags(tiny_config(tmp_path / "elsewhere", checkpoint=str(run_dir / "final_model.keras"),
                                             **common)))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shutil.copy(run_dir / "final_model.keras", tmp_path / "whole.keras")
    data = (run_dir / "final_model.keras").read_bytes()
    (run_dir / "final_model.keras").write_bytes(data[: len(data) // 2])
    bad = run_engine(config_flags(tiny_config(run_dir, **common)))
    assert bad.returncode == 1 and "is damaged" in bad.stderr and "does not exist" not in bad.stderr


def test_a_multi_page_tiff_is_named_not_read_from_its_first_page(fake_lgg_tree, tmp_path):
    root = fake_lgg_tree()
    records, _ = lgg.scan(root)
    path = records[0].image_path
    first = tifffile.imread(path)
    with tifffile.TiffWriter(path) as tif:
        tif.write(first)
        tif.write(first)
    decoded = decode_lib.decode(records, cache_dir=None)
    assert [(p.path, p.reason) for p in decoded.problems] == [
        (path, "multi-page TIFF (2 pages): expected one slice per file")]
    pathlib.Path(tmp_path / "in").mkdir()
    shutil.copy(path, tmp_path / "in" / "stack.tif")
    from engine import predict

    with pytest.raises(predict.InputImageError, match="multi-page TIFF"):
        predict.read_image(str(tmp_path / "in" / "stack.tif"))
