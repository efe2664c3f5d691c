"""What brainseg reads back is input: its records and a user's files checked like flags, refused
with exit 2 and one line naming the file and the field, and nothing it did not write is replaced."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from tests.helpers import (REPO, config_flags, copy_run, finished_run, model_only_config, pointwise_model,
                           run_engine)


def _error_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's C++ start-up lines, which ignore TF_CPP_MIN_LOG_LEVEL."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(
        ("I0000", "W0000", "E0000", "WARNING: All log messages"))]


def _one_line(proc, *words) -> str:
    """The refusal's one line, after checking exit 2, no traceback, and the words it must name."""
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    return lines[0]


def _tree(folder) -> dict[str, bytes | None]:
    """Every path under folder with its bytes (None for a folder), but the lock."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


def _module(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _model_dir(tmp_path, name: str = "model"):
    """A saved 1x1-conv model at 64x64: lesion where FLAIR is bright."""
    folder = tmp_path / name
    folder.mkdir()
    pointwise_model(64).save(str(folder / "final_model.keras"))
    return folder


# --- smaller ones ------------------------------------------------------------------------------------


def test_a_tif_and_a_tiff_of_one_name_are_refused_by_name(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    image = np.full((64, 64, 3), 30, np.uint8)
    tifffile.imwrite(source / "a.tif", image)
    tifffile.imwrite(source / "a.tiff", image)
    config = model_only_config(tmp_path, image_size=64, mode="predict", model_dir=str(_model_dir(tmp_path)),
                               input=str(source), output=str(tmp_path / "out"))
    _one_line(run_engine(config_flags(config)), "a.tif", "a.tiff")
    assert not (tmp_path / "out").exists()


def test_folds_refuses_a_csv_without_dice_and_a_patient_listed_twice(tmp_path):
    run = tmp_path / "fold"
    run.mkdir()
    for text, says in (("patient,score\nTCGA_CS_0001_20000101,0.5\n", "dice"),
                       ("patient,dice\nTCGA_CS_0001_20000101,0.5\nTCGA_CS_0001_20000101,0.9\n",
                        "TCGA_CS_0001_20000101")):
        (run / "per_patient_test.csv").write_text(text)
        proc = _module("engine.folds", run)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "per_patient_test.csv" in lines[0] and says in lines[0], lines


def test_inspect_refuses_an_infinite_positive_fraction_in_one_line(fake_lgg_tree):
    proc = _module("data.inspect", f"--data_dir={fake_lgg_tree()}", "--positive_fraction=inf")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--positive_fraction" in lines[0], lines


def test_lzw_compressed_slices_pass_inspect_and_load(fake_lgg_tree):
    from data import dataset

    root = fake_lgg_tree({"TCGA_CS_0001_20000101": 3, "TCGA_DU_0002_20010101": 3})
    for path in sorted(root.rglob("*.tif")):
        tifffile.imwrite(path, tifffile.imread(path), compression="lzw")
    proc = _module("data.inspect", f"--data_dir={root}", "--positive_fraction=0")
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])["problems"] == 0, proc.stdout
    assert len(dataset.load(str(root), cache_dir=None).records) == 6


def test_lower_case_patient_folders_are_found_and_paired(fake_lgg_tree, tmp_path):
    from data import lgg

    root = fake_lgg_tree({"TCGA_CS_0001_20000101": 3, "TCGA_DU_0002_20010101": 2})
    # A tree whose names were lower-cased whole (folders and files), and one with only its folder renamed.
    whole = root / "TCGA_CS_0001_20000101"
    for path in whole.iterdir():
        path.rename(whole / path.name.lower())
    whole.rename(root / "tcga_cs_0001_20000101")
    (root / "TCGA_DU_0002_20010101").rename(root / "tcga_du_0002_20010101")
    records, problems = lgg.scan(str(root))
    assert not problems
    assert [(r.patient, r.institution, r.slice_number) for r in records] == [
        ("tcga_cs_0001_20000101", "CS", 1), ("tcga_cs_0001_20000101", "CS", 2),
        ("tcga_cs_0001_20000101", "CS", 3), ("tcga_du_0002_20010101", "DU", 1),
        ("tcga_du_0002_20010101", "DU", 2)]
    for r in records:
        assert os.path.basename(r.mask_path).lower() == os.path.basename(r.image_path).lower()[:-4] + "_mask.tif"
    assert lgg.clinical_id(records[0].patient) == "TCGA_CS_0001"
    # The same patient in two folders whose names differ only in case is one patient, not two.
    shutil.copytree(root / "tcga_du_0002_20010101", root / "TCGA_DU_0002_20010101")
    _, problems = lgg.scan(str(root))
    assert len(problems) == 1 and "tcga_du_0002_20010101" in str(problems[0]), problems


# --- records read back are checked like flags ---------------------------------------------------------

TINY = dict(image_size=32, base_filters=4, depth=2, batch_size=8, num_overlays=0)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch tiny run, copied by each test that changes it."""
    return finished_run(tmp_path_factory.mktemp("finished"), **TINY)


def _train_again(run_dir, **overrides):
    from tests.helpers import tiny_config

    return run_engine(config_flags(tiny_config(run_dir, **{**TINY, "epochs": 3, **overrides})))


def _evaluate(run_dir, *flags):
    from tests.helpers import synthetic_dir

    return run_engine([f"--model_dir={run_dir}", "--mode=evaluate", "--split=test", "--precision=float32",
                       f"--data_dir={synthetic_dir()}", *flags])


@pytest.mark.parametrize("field, value", [("normalize", "Volume"), ("tta", "false"), ("neighbours", "two"),
                                          ("neighbours", 1.0), ("learning_rate", None)])
def test_a_config_json_field_of_the_wrong_type_is_named_and_nothing_is_written(finished, tmp_path,
                                                                                 field, value):
    run_dir = copy_run(finished, tmp_path)
    stored = json.loads((run_dir / "config.json").read_text())
    stored["config"][field] = value
    (run_dir / "config.json").write_text(json.dumps(stored))
    before = _tree(run_dir)
    for proc in (_evaluate(run_dir), _train_again(run_dir)):
        line = _one_line(proc, str(run_dir / "config.json"), field)
        assert repr(value) in line, line
        assert _tree(run_dir) == before


@pytest.mark.parametrize("epoch", ["2", None, 0, True])
def test_a_history_epoch_that_is_not_a_positive_integer_is_named(finished, tmp_path, epoch):
    run_dir = copy_run(finished, tmp_path)
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    (run_dir / "history.jsonl").write_text("\n".join(lines[:-1] + [json.dumps({**last, "epoch": epoch})]) + "\n")
    before = _tree(run_dir)
    line = _one_line(_train_again(run_dir), "history.jsonl", "line 2", "epoch")
    assert repr(epoch) in line, line
    assert _tree(run_dir) == before


def test_a_checkpoint_pointing_nowhere_is_a_flag_error(finished, tmp_path):
    proc = _evaluate(finished, f"--checkpoint={tmp_path / 'nowhere'}")
    _one_line(proc, "--checkpoint", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("text", ["", '{"members": ["final_model.keras"], "thresh'])
def test_an_empty_or_truncated_inference_json_exits_2(finished, tmp_path, text):
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "inference.json").write_text(text)
    before = _tree(run_dir)
    _one_line(_evaluate(run_dir), str(run_dir / "inference.json"))
    assert _tree(run_dir) == before


# --- a user's files inside brainseg's folders stay ----------------------------------------------------


def test_exporting_again_keeps_the_users_files_inside_the_export(finished, tmp_path):
    export_dir = tmp_path / "export"
    export = [f"--model_dir={finished}", "--mode=export", f"--export_dir={export_dir}", "--precision=float32"]
    run_engine(export, check=True)
    (export_dir / "notes.txt").write_text("how I served it")
    (export_dir / "variables" / "mine.txt").write_text("mine")
    (export_dir / "extra").mkdir()
    (export_dir / "extra" / "client.py").write_text("print(1)")
    written = json.loads((export_dir / "brainseg_export.json").read_text())["written"]
    assert "saved_model.pb" in written and "notes.txt" not in written
    os.remove(export_dir / "saved_model.pb")  # so that the next export is seen to write it again
    run_engine(export, check=True)
    assert (export_dir / "saved_model.pb").exists()
    assert (export_dir / "notes.txt").read_text() == "how I served it"
    assert (export_dir / "variables" / "mine.txt").read_text() == "mine"
    assert (export_dir / "extra" / "client.py").read_text() == "print(1)"
    assert sorted(os.listdir(tmp_path)) == ["export"]  # nothing left beside it


def test_overwrite_keeps_the_users_files_inside_saved_model(finished, tmp_path):
    from tests.helpers import tiny_config

    run_dir = copy_run(finished, tmp_path)
    run_engine([f"--model_dir={run_dir}", "--mode=export", "--precision=float32"], check=True)
    (run_dir / "saved_model" / "notes.txt").write_text("mine")
    run_engine(config_flags(tiny_config(run_dir, **{**TINY, "epochs": 1, "overwrite": True})), check=True)
    assert sorted(os.listdir(run_dir / "saved_model")) == ["notes.txt"]
    assert (run_dir / "saved_model" / "notes.txt").read_text() == "mine"


def test_evaluate_never_replaces_a_report_it_did_not_write(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "eval_test.md").write_text("my own notes on the test split")
    before = _tree(run_dir)
    _one_line(_evaluate(run_dir), str(run_dir / "eval_test.md"))
    assert _tree(run_dir) == before
    os.remove(run_dir / "eval_test.md")
    for _ in range(2):  # its own report it replaces
        assert _evaluate(run_dir).returncode == 0
    assert "eval_test.md" in json.loads((run_dir / "written.json").read_text())["written"]


def test_evaluate_with_only_model_dir_scores_the_runs_own_test_split(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    proc = run_engine([f"--model_dir={run_dir}", "--mode=evaluate", "--precision=float32"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((run_dir / "eval_test.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    stored = json.loads((run_dir / "config.json").read_text())["config"]
    assert report["patients"] == len(split["test"]) and report["data_dir"] == stored["data_dir"]
