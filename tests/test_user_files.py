"""Property: whatever sequence of train, resume, evaluate, predict, export and --overwrite runs over
folders seeded with a user's files, with links (out of the run, into another run, a `cp -rs` fork)
and crafted records added before each command, no user file changes, no other run changes, and no
command ends in a traceback."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

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
    "outside/precious.txt": b"precious",
    "outside/folder/notes.txt": b"notes",
}
# What training writes by these names: a link in their place must never be written through.
LINKED_NAMES = ["history.jsonl", ".lock", "written.json", "config.json", "final_model.keras",
                "inference.json", "split.json", "checkpoints"]
BAD_ENTRIES = [".", "", "checkpoints/..", "../outside/precious.txt", "outlink/precious.txt", "ABSOLUTE"]


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


def _tree(folder) -> dict:
    """Every entry under folder without following links: bytes, a link's target, or None."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = ("-> " + os.readlink(path) if os.path.islink(path) else
                                                  open(path, "rb").read() if os.path.isfile(path) else None)
    return out


def _link(root, rng: random.Random):
    """Puts a link in place of one of the run's files, to a user's file or to another run's; returns
    how to undo it."""
    run, name = root / "run", rng.choice(LINKED_NAMES)
    outside = root / "outside" / ("folder" if name == "checkpoints" else "precious.txt")
    target = rng.choice([outside, root / "other" / name])
    aside = root / "aside" / name
    if os.path.lexists(run / name):
        aside.parent.mkdir(exist_ok=True)
        os.rename(run / name, aside)
    os.symlink(target, run / name)

    def undo():
        if os.path.islink(run / name):
            os.remove(run / name)
        if os.path.lexists(aside) and not os.path.lexists(run / name):
            os.rename(aside, run / name)
    return undo


def _craft_record(root, rng: random.Random):
    """Adds an entry that leaves the run folder to its written.json; returns how to undo it."""
    record_file = root / "run" / "written.json"
    if not record_file.is_file() or record_file.is_symlink():
        return lambda: None
    entry = rng.choice(BAD_ENTRIES)
    entry = str(root / "outside" / "precious.txt") if entry == "ABSOLUTE" else entry
    if not os.path.lexists(root / "run" / "outlink"):
        os.symlink(root / "outside", root / "run" / "outlink")
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "written": record["written"] + [entry]}))

    def undo():
        now = json.loads(record_file.read_text())
        record_file.write_text(json.dumps({**now, "written": [n for n in now["written"] if n != entry]}))
    return undo


def _member_link(root, rng: random.Random):
    """A member folder that is a link to another run; returns how to undo it."""
    member = root / "run" / "members" / "0"
    if os.path.lexists(member):
        return lambda: None
    os.symlink(root / "other", member)
    return lambda: os.remove(member)


def _fork(root, rng: random.Random):
    """Trains a `cp -rs` fork of the run (the original must not change); nothing to undo."""
    fork = root / "fork"
    subprocess.run(["cp", "-rs", str(root / "run"), str(fork)], check=True)
    before = _tree(root / "run")
    proc = run_engine(config_flags(tiny_config(fork, **TINY, epochs=3)))
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, ("fork", proc.stderr[-2000:])
    assert _tree(root / "run") == before, "training a fork made of links changed the original"
    shutil.rmtree(fork)
    return lambda: None


def _perturb(root, rng: random.Random, kind):
    """One of the things a user leaves in a run folder (once the run exists); returns the undo."""
    if not (root / "run" / "config.json").is_file():
        return lambda: None
    return kind(root, rng)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_sequence_of_commands_changes_a_users_file(tmp_path, seed):
    user = _seed(tmp_path)
    run_engine(config_flags(tiny_config(tmp_path / "other", **TINY, epochs=1)), check=True)
    rng = random.Random(seed)
    commands = _commands(tmp_path, rng)
    # Each kind once per sequence, before a command the seed picks (the first one trains).
    kinds = [_link, _link, _craft_record, _member_link, _fork]
    rng.shuffle(kinds)
    for (name, args), kind in zip(commands, [lambda root, rng: (lambda: None)] + kinds):
        undo = _perturb(tmp_path, rng, kind)
        other = _tree(tmp_path / "other")
        proc = run_engine(args)
        assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        undo()  # puts back what the perturbation moved aside, so the user's files are where they were
        changed = [f for f, content in user.items()
                   if not (tmp_path / f).is_file() or (tmp_path / f).read_bytes() != content]
        assert not changed, f"{name} changed {changed}"
        assert _tree(tmp_path / "other") == other, f"{name} changed another run"
