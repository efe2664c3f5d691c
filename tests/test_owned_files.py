"""brainseg deletes or replaces only files it recorded writing: --overwrite beside the user's files,
an ensemble's members/, predict into a labelled tree, export over a foreign folder, and a torn
history.jsonl."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile

from engine import predict
from engine.rundir import RECORD_FILE, RunDir, RunDirError, versions
from tests.helpers import config_flags, model_only_config, pointwise_model, read_history, run_engine, tiny_config

pytestmark = pytest.mark.slow


def _tiny(run_dir, **overrides):
    values = dict(image_size=32, base_filters=4, depth=2, batch_size=8, epochs=1, num_overlays=0)
    return tiny_config(run_dir, **{**values, **overrides})


def _error_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's C++ start-up lines, which ignore TF_CPP_MIN_LOG_LEVEL."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(
        ("I0000", "W0000", "E0000", "WARNING: All log messages"))]


def _tree(folder) -> dict[str, bytes | None]:
    """Every path under folder with its bytes (None for a folder), but the lock."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


# --- 1. --overwrite removes what the run recorded, beside files of the engine's own name patterns -----


def test_overwrite_keeps_user_files_that_look_like_the_engines(tmp_path):
    run_dir = tmp_path / "run"
    run_engine(config_flags(_tiny(run_dir)), check=True)
    run_engine(config_flags(_tiny(run_dir, mode="evaluate", split="val")), check=True)
    assert (run_dir / "eval_val.md").exists()
    mine = {"eval_my_notes.md": b"notes", "per_patient_manual.csv": b"a,b\n",
            "events.out.tfevents.my_own_log": b"log", "checkpoints/ckpt-manual-backup/weights.h5": b"w"}
    for name, data in mine.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(data)
    old_events = {p.name for p in run_dir.glob("events.out.tfevents.*")} - {"events.out.tfevents.my_own_log"}
    run_engine(config_flags(_tiny(run_dir, base_filters=8, overwrite=True)), check=True)
    for name, data in mine.items():
        assert (run_dir / name).read_bytes() == data, name
    assert not list(run_dir.glob("eval_val*")), "the engine's own evaluation goes with its run"
    assert not old_events & {p.name for p in run_dir.glob("events.out.tfevents.*")}
    assert json.loads((run_dir / "config.json").read_text())["config"]["base_filters"] == 8
    assert len(read_history(run_dir)) == 1
    written = json.loads((run_dir / RECORD_FILE).read_text())["written"]
    assert {"config.json", "split.json", "history.jsonl", "final_model.keras"} <= set(written)
    assert len([n for n in written if n.startswith("events.out.tfevents.")]) == 1
    assert not any(n.startswith(("eval_", "per_patient_")) for n in written)


def test_overwrite_of_a_run_without_a_record_is_refused_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    # What a brainseg from before written.json leaves: its config.json and files of its names.
    (run_dir / "config.json").write_text(json.dumps({"config": _tiny(run_dir).to_dict(),
                                                     "versions": versions()}))
    (run_dir / "history.jsonl").write_text('{"epoch": 1}\n')
    (run_dir / "eval_my_notes.md").write_text("mine")
    before = _tree(run_dir)
    proc = run_engine(config_flags(_tiny(run_dir, base_filters=8, overwrite=True)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and RECORD_FILE in lines[0] and str(run_dir) in lines[0], lines
    assert _tree(run_dir) == before


# --- 2. members/ holds only brainseg's members for --overwrite ---------------------------------------


def test_overwrite_of_an_ensemble_leaves_a_members_folder_brainseg_did_not_write(tmp_path):
    run_dir = tmp_path / "ens"
    run_engine(config_flags(_tiny(run_dir, ensemble=2)), check=True)
    mine = run_dir / "members" / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"lr": 0.1}')
    (mine / "history.jsonl").write_text("my own\n")
    stale = run_dir / "members" / "1" / "history.jsonl"
    stale.write_text(stale.read_text() + '{"epoch": 99}\n')
    run_engine(config_flags(_tiny(run_dir, ensemble=2, base_filters=8, overwrite=True)), check=True)
    assert (mine / "config.json").read_text() == '{"lr": 0.1}'
    assert (mine / "history.jsonl").read_text() == "my own\n"
    for k in ("0", "1"):
        member = run_dir / "members" / k
        assert json.loads((member / "config.json").read_text())["config"]["base_filters"] == 8
        assert [h["epoch"] for h in read_history(member)] == [1]


# --- 3, 4. predict replaces only the masks it recorded writing ---------------------------------------


def _model_dir(tmp_path, name: str, sign: float = 1.0):
    """A saved 1x1-conv model: lesion where FLAIR is bright (sign 1) or where it is dark (-1)."""
    model = pointwise_model(64)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * sign, bias * sign])
    folder = tmp_path / name
    folder.mkdir()
    model.save(str(folder / "final_model.keras"))
    return folder


def _slices(folder, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((64, 64, 3), 30, np.uint8)
    image[:, :32, 1] = 200  # bright on the left half
    for name in names:
        tifffile.imwrite(folder / f"{name}.tif", image)


def _predict(tmp_path, model_dir, source, target):
    config = model_only_config(tmp_path, image_size=64, mode="predict", batch_size=3,
                               model_dir=str(model_dir), input=str(source), output=str(target))
    return run_engine(config_flags(config))


def test_predict_into_a_labelled_tree_is_refused_before_writing(tmp_path):
    model_dir = _model_dir(tmp_path, "model")
    images = tmp_path / "images" / "P1"
    _slices(images, ["P1_1", "P1_2", "P1_3"])
    labelled = tmp_path / "kaggle_3m" / "P1"
    _slices(labelled, ["P1_1", "P1_2", "P1_3"])
    for n in (1, 2):
        tifffile.imwrite(labelled / f"P1_{n}_mask.tif", np.full((64, 64), 255, np.uint8))
    before = _tree(tmp_path / "kaggle_3m")
    proc = _predict(tmp_path, model_dir, tmp_path / "images", tmp_path / "kaggle_3m")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and str(labelled / "P1_1_mask.tif") in lines[0] and "2 such" in lines[0], lines
    assert _tree(tmp_path / "kaggle_3m") == before  # no mask, no record, no temporary


def test_predicting_again_in_place_replaces_its_own_masks_and_keeps_ground_truth(tmp_path):
    folder = tmp_path / "data" / "P1"
    _slices(folder, ["P1_1", "P1_2", "P1_3"])
    truth = np.zeros((64, 64), np.uint8)
    truth[5:9, 5:9] = 255
    tifffile.imwrite(folder / "P1_3_mask.tif", truth)
    root = tmp_path / "data"
    bright, dark = _model_dir(tmp_path, "bright"), _model_dir(tmp_path, "dark", sign=-1.0)
    assert _predict(tmp_path, bright, root, root).returncode == 0
    first = tifffile.imread(folder / "P1_1_mask.tif")
    assert (first[:, :28] == 255).all() and (first[:, 36:] == 0).all()
    assert json.loads((root / predict.RECORD_FILE).read_text())["written"] == [
        "P1/P1_1_mask.tif", "P1/P1_2_mask.tif"]
    proc = _predict(tmp_path, dark, root, root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Wrote 2 mask(s)" in proc.stdout and "Skipping 1 image(s)" in proc.stdout, proc.stdout
    for n in (1, 2):
        again = tifffile.imread(folder / f"P1_{n}_mask.tif")
        assert (again[:, :28] == 0).all() and (again[:, 36:] == 255).all()  # the second model's
    np.testing.assert_array_equal(tifffile.imread(folder / "P1_3_mask.tif"), truth)
    jobs, protected = predict.plan(root, root)  # its own masks are never read as images
    assert sorted(j.source.name for j in jobs) == ["P1_1.tif", "P1_2.tif"]
    assert [j.source.name for j in protected] == ["P1_3.tif"]


# --- 5. export replaces only an export of brainseg's -----------------------------------------------


def test_export_over_a_folder_brainseg_did_not_export_changes_nothing(tmp_path):
    model_dir = _model_dir(tmp_path, "model")
    theirs = tmp_path / "theirs"
    (theirs / "variables").mkdir(parents=True)
    (theirs / "saved_model.pb").write_bytes(b"their graph")
    (theirs / "variables" / "variables.index").write_bytes(b"their weights")
    (theirs / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    before = _tree(tmp_path)
    for target, words in ((theirs, "brainseg_export.json"), (a_file / "sub", "is a file")):
        config = model_only_config(tmp_path, image_size=64, mode="export", model_dir=str(model_dir),
                                   export_dir=str(target))
        proc = run_engine(config_flags(config))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        lines = _error_lines(proc.stderr)
        assert len(lines) == 1 and str(target) in lines[0] and words in lines[0], lines
    assert _tree(tmp_path) == before
    ours = tmp_path / "ours"
    for _ in range(2):  # its own export is replaced
        config = model_only_config(tmp_path, image_size=64, mode="export", model_dir=str(model_dir),
                                   export_dir=str(ours))
        assert run_engine(config_flags(config)).returncode == 0
    assert (ours / "brainseg_export.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- 6. history.jsonl: a torn last line is dropped, a damaged middle is named -----------------------


def test_a_torn_last_history_line_is_dropped_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    run_engine(config_flags(_tiny(run_dir)), check=True)
    with open(run_dir / "history.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a kill during the append
    proc = run_engine(config_flags(_tiny(run_dir, epochs=2)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "history.jsonl" in proc.stdout and "dropped its last line" in proc.stdout
    assert [h["epoch"] for h in read_history(run_dir)] == [1, 2]


def test_history_tolerates_only_a_bad_last_line(tmp_path, caplog):
    path = tmp_path / "history.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\ngarbage\n')
    with caplog.at_level(logging.WARNING, logger="engine"):
        assert RunDir(str(tmp_path), writer=False).history() == [{"epoch": 1}, {"epoch": 2}]
    assert any("history.jsonl" in r.getMessage() for r in caplog.records)
    assert path.read_text().endswith("garbage\n")  # a reader never writes
    assert RunDir(str(tmp_path)).history() == [{"epoch": 1}, {"epoch": 2}]
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    path.write_text('{"epoch": 1}\n[1, 2\n{"epoch": 3}\n')
    with pytest.raises(RunDirError, match=r"history.jsonl, line 2"):
        RunDir(str(tmp_path)).history()
    assert path.read_text() == '{"epoch": 1}\n[1, 2\n{"epoch": 3}\n'


def test_a_garbage_line_inside_the_history_is_exit_2_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"config": _tiny(run_dir).to_dict(),
                                                     "versions": versions()}))
    (run_dir / "history.jsonl").write_text('garbage\n{"epoch": 1}\n')
    proc = run_engine(config_flags(_tiny(run_dir, epochs=2)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "history.jsonl, line 1" in lines[0], lines
