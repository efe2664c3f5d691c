"""Flag validation through the real entry point: one clear line naming the flag, exit code 2."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from absl import flags

from engine.config import Config, ConfigError, validate
from engine.flags import config_from_flags, define_flags
from tests.helpers import run_engine


@pytest.mark.parametrize("args, flag, words", [
    (["--batch_size=-4"], "--batch_size", "positive"),
    (["--precision=float8"], "--precision", "float8"),
    (["--image_size=100", "--depth=4"], "--image_size", "divisible"),
    (["--strategy=tpu"], "--strategy", "tpu"),
    (["--mode=fly"], "--mode", "fly"),
    (["--batch_size=abc"], "--batch_size", "abc"),
    (["--cpu_devices=2", "--jit_compile=true"], "--jit_compile", "logical CPU devices"),
    (["--shift=inf"], "--shift", "finite"),
    (["--rotation_deg=nan"], "--rotation_deg", "finite"),
    (["--zoom=1"], "--zoom", "[0, 1)"),
    (["--plateau_min_delta=-1"], "--plateau_min_delta", "zero or positive"),
    (["--early_stopping_min_delta=nan"], "--early_stopping_min_delta", "finite"),
    (["--image_size=16384"], "--image_size", "up to 512"),
])
def test_bad_flag_values_give_one_line_and_exit_2(args, flag, words):
    proc = run_engine(args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert flag in lines[0] and words in lines[0]


def test_a_data_dir_with_no_data_names_the_flag_and_where_it_looked(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    proc = run_engine([f"--data_dir={empty}", f"--model_dir={tmp_path / 'run'}",
                       "--image_size=64", "--base_filters=4", "--depth=2"], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(empty) in proc.stderr and "kaggle_3m" in proc.stderr


def test_helpfull_documents_every_config_field():
    proc = run_engine(["--helpfull"], timeout=60, process=True)  # absl defines --helpfull per process
    assert proc.returncode in (0, 1)  # absl exits 1 after printing help.
    assert "Traceback" not in proc.stderr
    for field in dataclasses.fields(Config):
        assert f"--{field.name}" in proc.stdout or f"--[no]{field.name}" in proc.stdout, field.name


def test_flagfile_comments_are_ignored_and_values_apply(tmp_path):
    flagfile = tmp_path / "bad.cfg"
    flagfile.write_text("# a comment line\n--batch_size=0\n")
    proc = run_engine([f"--flagfile={flagfile}"], timeout=60)
    assert proc.returncode == 2 and "--batch_size" in proc.stderr


def test_validate_names_the_flag_for_fraction_sums():
    with pytest.raises(ConfigError, match="--test_fraction"):
        validate(Config(val_fraction=0.5, test_fraction=0.5))
    assert validate(Config()).run_dir.endswith("default")


@pytest.mark.parametrize("num_folds, fold, flag, words", [
    (1, 0, "--num_folds", "at least 2"),
    (-2, 0, "--num_folds", "at least 2"),
    (5, 5, "--fold", "[0, --num_folds=5)"),
    (5, -1, "--fold", "must be zero or positive"),
    (0, 1, "--fold", "needs --num_folds"),
])
def test_validate_names_the_flag_for_bad_folds(num_folds, fold, flag, words):
    with pytest.raises(ConfigError) as e:
        validate(Config(num_folds=num_folds, fold=fold))
    assert e.value.flag == flag[2:] and words in str(e.value)


def test_folds_are_part_of_the_run_identity():
    from engine.config import RUN_IDENTITY_FIELDS
    assert {"num_folds", "fold"} <= set(RUN_IDENTITY_FIELDS)
    assert validate(Config(num_folds=5, fold=4)).fold == 4


def test_a_run_written_before_the_fold_fields_existed_still_resumes(tmp_path):
    import json
    from engine import rundir
    config = Config(model_dir=str(tmp_path / "old"), num_folds=0, fold=0)
    rundir.RunDir(config.run_dir).open(config).close()
    path = tmp_path / "old" / rundir.CONFIG_FILE
    written = json.loads(path.read_text())
    del written["config"]["num_folds"], written["config"]["fold"]
    path.write_text(json.dumps(written))
    rundir.RunDir(config.run_dir).open(config).close()
    with pytest.raises(rundir.RunDirError, match="--fold"):
        rundir.RunDir(config.run_dir).open(dataclasses.replace(config, num_folds=5, fold=1))


@pytest.mark.parametrize("flagfile", sorted(p.name for p in (Path(__file__).parents[1] / "flags").glob("*.cfg")))
def test_every_shipped_flagfile_is_a_valid_config_that_states_its_cost(flagfile):
    path = Path(__file__).parents[1] / "flags" / flagfile
    values = flags.FlagValues()
    define_flags(values)
    values([sys.argv[0], f"--flagfile={path}"])
    config = config_from_flags(values)  # Raises ConfigError naming the flag on a bad value.
    header = path.read_text().split("\n--", 1)[0]
    assert header.startswith("# python -m engine.main --flagfile=flags/" + flagfile), header[:80]
    assert "Expected runtime" in header and "Expected result" in header
    if config.lr_schedule == "cosine":
        assert not config.restore_best_weights  # The last weights: cosine ends at --min_lr.
