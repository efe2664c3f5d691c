"""A user's mistake is refused before anything is written, by name, with exit code 2, and a run that
cannot resume on its own clock is never restarted over its history."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from engine import folds
from engine.config import Config
from tests.helpers import (config_flags, copy_run, finished_run, read_history, run_engine, synthetic_dir,
                           tiny_config)

TINY = dict(image_size=32, base_filters=4, depth=2, batch_size=8)


def _error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _snapshot(folder) -> dict:
    """Every file under a folder with its bytes: what a refusal must leave as it was (the lock
    file, which only ever holds the last holder's pid, aside)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in set(names) - {".lock"}:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch tiny run, copied by each test that changes it."""
    return finished_run(tmp_path_factory.mktemp("finished"), **TINY)


def test_resuming_with_another_batch_size_is_refused_by_name(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    before = _snapshot(run_dir)
    proc = run_engine(config_flags(tiny_config(run_dir, **{**TINY, "batch_size": 4}, epochs=3)))
    assert proc.returncode == 2 and "--batch_size: run has 8, flags say 4" in proc.stderr, proc.stderr
    assert _snapshot(run_dir) == before
    assert [r["epoch"] for r in read_history(run_dir)] == [1, 2]


@pytest.mark.slow
def test_a_finished_run_whose_checkpoints_were_deleted_stays_finished(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    before = _snapshot(run_dir)
    proc = run_engine(config_flags(tiny_config(run_dir, **TINY)))
    assert proc.returncode == 2 and "no checkpoint to resume from" in _error(proc)
    assert "--overwrite" in _error(proc)
    assert _snapshot(run_dir) == before  # final_model.keras and history.jsonl as they were
    assert run_engine(config_flags(tiny_config(run_dir, **TINY, overwrite=True))).returncode == 0
    assert [r["epoch"] for r in read_history(run_dir)] == [1, 2]


def test_checkpoints_replaced_by_a_file_is_refused_before_the_final_model_goes(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").write_text("not a folder")
    before = _snapshot(run_dir)
    proc = run_engine(config_flags(tiny_config(run_dir, **TINY)))
    assert proc.returncode == 2 and "is a file, not the run's checkpoints folder" in _error(proc)
    assert _snapshot(run_dir) == before and "final_model.keras" in before


@pytest.mark.parametrize("flags, says", [
    ({"data_dir": "/nonexistent/dataTYPO"}, "dataTYPO"),
    ({"num_folds": 7}, "--num_folds=7 is more than the 6 patients"),
    ({"restore_from": "/nonexistent/run"}, "--restore_from"),
    ({"base_filters": 256, "depth": 8, "image_size": 256}, "more than this machine's"),
])
def test_a_refused_start_writes_nothing_and_the_corrected_command_runs(tmp_path, flags, says):
    run_dir = tmp_path / "run"
    proc = run_engine(config_flags(tiny_config(run_dir, **{**TINY, **flags})))
    assert proc.returncode == 2 and says in _error(proc)
    assert not run_dir.exists()
    if "num_folds" in flags:  # the corrected command is not refused by what the typo wrote
        assert run_engine(config_flags(tiny_config(run_dir, **TINY, num_folds=3, epochs=1))).returncode == 0


def test_every_slice_with_a_lesion_and_a_positive_fraction_is_one_line(fake_lgg_tree, tmp_path):
    patients = {f"TCGA_CS_{i:04d}_20000101": 3 for i in range(5)}
    root = fake_lgg_tree(patients, lesion_slices={p: {1, 2, 3} for p in patients})
    proc = run_engine(config_flags(tiny_config(tmp_path / "run", **TINY, data_dir=str(root),
                                               positive_fraction=0.5, decode_cache=False)))
    assert proc.returncode == 2 and "every one of the" in _error(proc)
    assert not (tmp_path / "run").exists()


def test_inspect_and_training_agree_on_lesion_free_data(fake_lgg_tree, tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    patients = {f"TCGA_CS_{i:04d}_20000101": 3 for i in range(5)}
    root = fake_lgg_tree(patients, lesion_slices={})
    inspect = subprocess.run([sys.executable, "-m", "data.inspect", f"--data_dir={root}"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 1 and json.loads(inspect.stdout.splitlines()[-1])["problems"] == 1
    assert "none of" in inspect.stdout
    proc = run_engine(config_flags(tiny_config(tmp_path / "run", **TINY, data_dir=str(root),
                                               positive_fraction=0.5, decode_cache=False,
                                               val_fraction=0.0, test_fraction=0.0)))
    assert proc.returncode == 2 and "lesion" in _error(proc)


def test_reading_modes_on_a_folder_that_is_not_a_run_exit_2(tmp_path):
    (tmp_path / "notarun").mkdir()
    (tmp_path / "afile").write_text("x")
    for mode in ("evaluate", "predict", "export"):
        proc = run_engine([f"--mode={mode}", f"--model_dir={tmp_path / 'notarun'}", f"--data_dir={synthetic_dir()}",
                           f"--input={synthetic_dir()}", f"--output={tmp_path / 'out'}",
                           f"--export_dir={tmp_path / 'export'}", "--precision=float32"])
        assert proc.returncode == 2 and "is not a brainseg run" in _error(proc), (mode, proc.stderr)
    proc = run_engine(["--mode=benchmark", f"--model_dir={tmp_path / 'afile'}", "--image_size=32",
                       "--base_filters=4", "--depth=2", "--batch_size=2", "--benchmark_steps=1"])
    assert proc.returncode == 2 and "is a file" in _error(proc)
    assert not (tmp_path / "out").exists() and not (tmp_path / "export").exists()


def test_help_exits_0_and_a_flagfile_that_is_not_utf8_is_one_line(tmp_path):
    for flag in ("--help", "--helpfull"):
        proc = run_engine([flag])
        assert proc.returncode == 0 and "--base_filters" in proc.stdout, (flag, proc.stderr)
    bad = tmp_path / "bad.cfg"
    bad.write_bytes(b"--epochs=2\n--run_name=\xff\xfe\n")
    proc = run_engine([f"--flagfile={bad}"])
    assert proc.returncode == 2 and "bad.cfg" in _error(proc) and "not valid UTF-8" in _error(proc)


@pytest.mark.parametrize("flag, says", [("--warmup_epochs=1e308", "--warmup_epochs"),
                                        ("--run_name=../../escape", "--run_name"),
                                        ("--run_name=a/b", "--run_name")])
def test_values_that_overflow_or_leave_logs_are_refused(flag, says):
    proc = run_engine([f"--data_dir={synthetic_dir()}", "--epochs=1", flag])
    assert proc.returncode == 2 and says in _error(proc)


@pytest.mark.slow
def test_tf_config_that_is_not_json_is_one_line():
    proc = run_engine(["--mode=benchmark", "--benchmark_steps=1"], env={"TF_CONFIG": "not json"})
    assert proc.returncode == 2 and "TF_CONFIG is not valid JSON" in _error(proc)


@pytest.mark.parametrize("field, value", [("threshold", "high"), ("threshold", 1.5), ("tta", "yes"),
                                          ("min_component_voxels", -3), ("members", []),
                                          ("members", ["../../elsewhere.keras"]), ("normalize", "zscore"),
                                          ("neighbours", 2.5), ("surprise", 1)])
def test_an_inference_json_with_a_bad_field_is_named(finished, tmp_path, field, value):
    run_dir = copy_run(finished, tmp_path)
    spec = json.loads((run_dir / "inference.json").read_text())
    (run_dir / "inference.json").write_text(json.dumps({**spec, field: value}))
    proc = run_engine([f"--model_dir={run_dir}", "--mode=evaluate", "--split=test", "--precision=float32"])
    assert proc.returncode == 2 and "inference.json" in _error(proc) and field in _error(proc)


def test_folds_refuses_empty_csvs_a_corrupt_split_and_bad_flags(tmp_path, capsys):
    run = tmp_path / "fold"
    run.mkdir()
    (run / "per_patient_test.csv").write_text("patient,dice\n")
    assert folds.main([str(run)]) == 2 and "holds no patients" in capsys.readouterr().err
    (run / "per_patient_test.csv").write_text("patient,dice\nTCGA_CS_0001_20000101,0.5\n")
    (run / "split.json").write_text("{torn")
    assert folds.main([str(run)]) == 2 and "split.json is not a split" in capsys.readouterr().err
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.run([sys.executable, "-m", "engine.folds", "--split=nope", str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--split" in proc.stderr and "Traceback" not in proc.stderr


def test_batch_size_is_part_of_the_run_identity():
    assert Config.__dataclass_fields__["batch_size"].metadata["identity"]


@pytest.mark.slow
def test_evaluate_without_inference_json_applies_the_runs_recorded_normalisation(tmp_path):
    run_dir = tmp_path / "run"
    run_engine(config_flags(tiny_config(run_dir, **TINY, normalize="volume", epochs=3)), check=True)
    evaluate = [f"--model_dir={run_dir}", "--mode=evaluate", "--split=test", "--precision=float32",
                f"--data_dir={synthetic_dir()}"]
    run_engine(evaluate, check=True)
    recorded = (run_dir / "per_patient_test.csv").read_text()
    os.remove(run_dir / "inference.json")
    proc = run_engine(evaluate, check=True)
    assert "normalize volume" in proc.stdout and "config.json" in proc.stdout
    assert (run_dir / "per_patient_test.csv").read_text() == recorded


def test_export_onto_a_full_disk_is_one_line_and_keeps_the_previous_export(finished, tmp_path, monkeypatch):
    import tensorflow as tf

    export_dir = tmp_path / "export"
    export = [f"--model_dir={finished}", "--mode=export", f"--export_dir={export_dir}", "--precision=float32"]
    run_engine(export, check=True)
    before = _snapshot(export_dir)

    def full(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", full)
    proc = run_engine(export)
    assert proc.returncode == 1 and "No space left on device" in _error(proc)
    assert _snapshot(export_dir) == before
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary left beside it


@pytest.mark.slow
def test_a_run_killed_between_its_first_record_and_its_first_save_trains_again(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    os.remove(run_dir / "final_model.keras")
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    (run_dir / "history.jsonl").write_text(lines[0] + "\n")  # epoch 1 recorded, its save never made
    proc = run_engine(config_flags(tiny_config(run_dir, **TINY)))
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in read_history(run_dir)] == [1, 2]
