"""The whole training recipe: fold members, post-processing chosen out of fold, one inference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine import postprocessing
from tests.helpers import config_flags, read_history, run_engine, tiny_config

pytestmark = pytest.mark.slow


def test_an_ensemble_trains_its_members_chooses_its_post_processing_and_evaluates_as_one(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, ensemble=2, epochs=1, lr_schedule="cosine", normalize="volume")
    proc = run_engine(config_flags(config), timeout=300, check=True)
    split = json.loads((run_dir / "split.json").read_text())
    pool = sorted(split["train"] + split["val"])
    held = []
    for k in (0, 1):
        member = run_dir / "members" / str(k)
        member_split = json.loads((member / "split.json").read_text())
        assert member_split["test"] == split["test"]
        assert sorted(member_split["train"] + member_split["val"]) == pool
        held += member_split["val"]
        assert (member / "final_model.keras").exists() and len(read_history(member)) == 1
    assert sorted(held) == pool  # every patient outside the test split is held out exactly once
    spec = json.loads((run_dir / "inference.json").read_text())
    assert spec["members"] == ["members/0/final_model.keras", "members/1/final_model.keras"]
    assert spec["normalize"] == "volume" and spec["min_component_voxels"] in postprocessing.MIN_VOXELS
    chosen = json.loads((run_dir / "postprocessing.json").read_text())
    assert chosen["chosen"] == spec["min_component_voxels"] and chosen["patients"] == len(pool)
    assert max(chosen["min_component_voxels"].values()) == chosen["min_component_voxels"][str(chosen["chosen"])]
    assert "Post-processing chosen on out-of-fold predictions" in proc.stdout
    evaluated = run_engine([*config_flags(config), "--mode=evaluate"], timeout=180, check=True)
    assert "2 model(s)" in evaluated.stdout
    report = json.loads((run_dir / "eval_test.json").read_text())
    assert report["model"] == [str(run_dir / m) for m in spec["members"]]
    assert report["inference_spec"]["min_component_voxels"] == spec["min_component_voxels"]


def test_choose_min_voxels_keeps_the_best_and_the_smaller_on_ties():
    target = np.zeros((4, 32, 32), bool)
    target[1:3, 5:20, 5:20] = True
    probs = np.where(target, 0.9, 0.1).astype(np.float32)
    probs[0, 28:31, 28:31] = 0.8  # a 9-voxel false positive: removed by any size above it
    chosen, means = postprocessing.choose_min_voxels([(probs, target)])
    # 250 removes the false positive; from 500 on, the 450-voxel lesion goes too.
    assert chosen == 250 and means[0] < means[250] == 1.0 and means[500] == 0.0
    clean = np.where(target, 0.9, 0.1).astype(np.float32)
    assert postprocessing.choose_min_voxels([(clean, target)])[0] == 0  # nothing to remove: no filter
