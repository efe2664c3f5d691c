"""Property: whatever sequence of train, resume, evaluate, predict, export and --overwrite runs over
folders seeded with a user's files, no user file changes and no command ends in a traceback."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import tifffile

from tests.helpers import config_flags, run_engine, synthetic_dir, tiny_config

pytestmark = pytest.mark.slow

TINY = dict(image_size=32, base_filters=4, depth=2, batch_size=8)
# Names chosen to look like the engine's own files: a rule by pattern would take them.
USER_FILES = {
    "run/eval_my_notes.md": b"notes",
    "run/per_patient_manual.csv": b"patient,dice\n",
    "run/events.out.tfevents.my_own_log": b"mine",
    "run/checkpoints/ckpt-manual-backup/weights": b"backup",
    "run/members/mine/config.json": b'{"mine": true}',
    "out/notes.txt": b"about my predictions",
    "export/notes.txt": b"about my export",
}


def _seed(root) -> dict:
    for name, content in USER_FILES.items():
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_bytes(content)
    mask = root / "out/TCGA_CS_0000_20000101/TCGA_CS_0000_20000101_1_mask.tif"  # a ground truth
    os.makedirs(mask.parent, exist_ok=True)
    tifffile.imwrite(mask, np.full((16, 16), 255, np.uint8))
    return {**USER_FILES, str(mask.relative_to(root)): mask.read_bytes()}


def _commands(root, rng: random.Random) -> list[tuple[str, list[str]]]:
    run = root / "run"
    train = lambda **kw: config_flags(tiny_config(run, **TINY, **kw))  # noqa: E731
    reading = [f"--model_dir={run}", "--precision=float32"]
    choices = [
        ("train", lambda: train(epochs=rng.choice([1, 2]))),
        ("resume longer", lambda: train(epochs=3)),
        ("overwrite", lambda: train(epochs=1, overwrite=True)),
        ("evaluate", lambda: reading + ["--mode=evaluate", "--split=test"]),
        ("predict", lambda: reading + ["--mode=predict", f"--input={synthetic_dir()}", f"--output={root / 'out'}"]),
        ("export", lambda: reading + ["--mode=export", f"--export_dir={root / 'export'}"]),
    ]
    return [("train", train(epochs=1))] + [(n, make()) for n, make in rng.choices(choices, k=5)]


@pytest.mark.parametrize("seed", [0, 1])
def test_no_sequence_of_commands_changes_a_users_file(tmp_path, seed):
    user = _seed(tmp_path)
    for name, args in _commands(tmp_path, random.Random(seed)):
        proc = run_engine(args)
        assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        changed = [f for f, content in user.items()
                   if not (tmp_path / f).is_file() or (tmp_path / f).read_bytes() != content]
        assert not changed, f"{name} changed {changed}"
