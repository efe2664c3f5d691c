"""brainseg changes nothing outside its run folder and nothing it did not write: records whose paths
leave the folder, links inside it, names like its temporaries, a user's files of its names, an
--overwrite stopped midway, and refusals that would leave a folder behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from engine.rundir import RECORD_FILE
from tests.helpers import config_flags, read_history, run_engine, tiny_config

pytestmark = pytest.mark.slow

TINY = dict(image_size=32, base_filters=4, depth=2, batch_size=8, epochs=1, num_overlays=0)


def _flags(run_dir, **overrides) -> list[str]:
    return config_flags(tiny_config(run_dir, **{**TINY, **overrides}))


def _error(proc) -> str:
    """The one error line of a refusal (exit 2), with no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (
        proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    return lines[0]


def _tree(folder) -> dict[str, bytes | str | None]:
    """Every entry under folder, without following links: a file's bytes, a link's target, None
    for a folder."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out[rel] = f.read()
            else:
                out[rel] = None
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch tiny run, copied by each test."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_engine(_flags(run_dir), check=True)
    return run_dir


def _copy(finished, target):
    shutil.copytree(finished, target, symlinks=True)
    return target


def _add_entry(run_dir, entry: str) -> None:
    record = json.loads((run_dir / RECORD_FILE).read_text())
    record["written"].append(entry)
    (run_dir / RECORD_FILE).write_text(json.dumps(record))


# --- 1. paths that leave the folder ------------------------------------------------------------------


@pytest.mark.parametrize("entry", [".", "", "checkpoints/..", "ABSOLUTE", "../precious.txt", "linked/precious.txt"])
def test_a_record_entry_outside_the_folder_is_refused_and_nothing_is_deleted(finished, tmp_path, entry):
    (tmp_path / "precious.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("mine too")
    run_dir = _copy(finished, tmp_path / "run")
    os.symlink(tmp_path / "mine", run_dir / "linked")
    entry = str(tmp_path / "precious.txt") if entry == "ABSOLUTE" else entry
    _add_entry(run_dir, entry)
    before = _tree(tmp_path)
    line = _error(run_engine(_flags(run_dir, overwrite=True)))
    assert RECORD_FILE in line and (repr(entry) in line or "linked" in line), line
    assert _tree(tmp_path) == before


def test_a_member_that_is_a_link_to_another_run_is_left_alone(finished, tmp_path):
    other = _copy(finished, tmp_path / "other")
    run_dir = _copy(finished, tmp_path / "run")
    (run_dir / "members").mkdir()
    os.symlink(other, run_dir / "members" / "0")
    before = _tree(other)
    proc = run_engine(_flags(run_dir, overwrite=True))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _tree(other) == before
    assert os.readlink(run_dir / "members" / "0") == str(other)


# --- 2. links are never written through --------------------------------------------------------------


@pytest.mark.parametrize("name", [".lock", "history.jsonl", "written.json", "config.json", "checkpoints"])
def test_a_link_among_the_runs_files_is_refused_before_anything_is_written(finished, tmp_path, name):
    other = _copy(finished, tmp_path / "other")
    run_dir = _copy(finished, tmp_path / "run")
    target = run_dir / name
    (shutil.rmtree if target.is_dir() else os.remove)(target)
    os.symlink(other / name, target)
    before = _tree(tmp_path)
    line = _error(run_engine(_flags(run_dir, epochs=2)))
    assert str(target) in line and "link" in line, line
    assert _tree(tmp_path) == before


def test_a_fork_made_of_links_never_appends_to_the_original(finished, tmp_path):
    original = _copy(finished, tmp_path / "run")
    subprocess.run(["cp", "-rs", str(original), str(tmp_path / "fork")], check=True)
    before = _tree(original)
    line = _error(run_engine(_flags(tmp_path / "fork", epochs=2)))
    assert "cp -r" in line and "link" in line, line
    assert _tree(original) == before
    assert [r["epoch"] for r in read_history(original)] == [1]


# --- 3. names like the engine's temporaries ----------------------------------------------------------


def test_files_named_like_temporaries_are_not_removed(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    mine = {"run/.tmp-config.json-mine.txt": b"a", "run/.tmp-history.jsonl-20240101": b"b",
            "run/checkpoints/.del-ckpt-000000001-20240101/notes": b"c",
            "exports/.old-exp-20240101/notes": b"d", "exports/.tmp-exp-1/notes": b"e"}
    for name, data in mine.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert run_engine(_flags(run_dir, overwrite=True)).returncode == 0
    export = run_engine([f"--model_dir={run_dir}", "--precision=float32", "--mode=export",
                         f"--export_dir={tmp_path / 'exports' / 'exp'}"])
    assert export.returncode == 0, export.stderr[-2000:]
    for name, data in mine.items():
        assert (tmp_path / name).read_bytes() == data, name


# --- 4. a user's files of the engine's names ---------------------------------------------------------


@pytest.mark.parametrize("name", ["final_model.keras", "history.jsonl"])
def test_training_into_a_folder_with_a_users_file_of_an_engine_name_is_refused(tmp_path, name):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / name).write_bytes(b'{"epoch": 1}\n')
    before = _tree(tmp_path)
    for overwrite in (False, True):
        line = _error(run_engine(_flags(folder, overwrite=overwrite)))
        assert str(folder / name) in line, line
        assert _tree(tmp_path) == before


# --- 5. --overwrite starts over, however the last one was left -----------------------------------------


def test_a_run_left_half_removed_by_overwrite_starts_from_step_0(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    trained = run_engine(_flags(run_dir, epochs=2))  # two epochs, two checkpoints, a final model
    assert trained.returncode == 0, trained.stderr[-2000:]
    os.remove(run_dir / "config.json")  # what a kill during --overwrite leaves
    line = _error(run_engine(_flags(run_dir, epochs=2)))
    assert "--overwrite" in line and str(run_dir) in line, line
    proc = run_engine(_flags(run_dir, overwrite=True))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Resumed from" not in proc.stdout
    assert [r["epoch"] for r in read_history(run_dir)] == [1]


def test_an_ensemble_member_that_lost_its_config_is_not_resumed_by_overwrite(tmp_path):
    run_dir = tmp_path / "ens"
    run_engine(_flags(run_dir, ensemble=2, epochs=2), check=True)
    os.remove(run_dir / "members" / "1" / "config.json")
    proc = run_engine(_flags(run_dir, ensemble=2, overwrite=True))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Resumed from" not in proc.stdout
    for k in ("0", "1"):
        assert [r["epoch"] for r in read_history(run_dir / "members" / k)] == [1]


# --- 6. a refusal creates nothing --------------------------------------------------------------------


def test_a_batch_larger_than_the_training_slices_creates_no_folder(tmp_path):
    run_dir = tmp_path / "run"
    line = _error(run_engine(_flags(run_dir, batch_size=1000)))
    assert "fewer than one global batch" in line, line
    assert not run_dir.exists()
    assert run_engine(_flags(run_dir)).returncode == 0


def test_restore_from_a_run_of_another_architecture_creates_no_folder(finished, tmp_path):
    run_dir = tmp_path / "run"
    line = _error(run_engine(_flags(run_dir, base_filters=8, restore_from=str(finished))))
    assert "--restore_from" in line and "does not fit" in line, line
    assert not run_dir.exists()
    assert run_engine(_flags(run_dir, base_filters=8)).returncode == 0
