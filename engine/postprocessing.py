"""The post-processing chosen on patients the models did not train on, and the inference record of a run."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from data.dataset import LggDataset
from engine.config import Config
from engine.inference import model_image_size
from engine.inference_spec import InferenceSpec, spec_for
from engine.loading import load_model
from engine.rundir import INFERENCE_FILE, RunDir
from engine.segmenter import Segmenter
from models import losses, postprocess

log = logging.getLogger(__name__)

# Candidates for the smallest 3D component kept, in pixels of the original 256x256 slices. The
# largest-component rule is not among them: it helped on development patients but cost Dice on
# unseen ones (a false-positive blob larger than the lesion takes the lesion's place).
MIN_VOXELS = (0, 250, 500, 1000, 2000, 4000)


def choose_min_voxels(volumes) -> tuple[int, dict[int, float]]:
    """The smallest-component size that gives the best mean per-patient Dice (the smaller on ties).

    Args:
      volumes: (probabilities [D, H, W], true mask [D, H, W]) of each held-out patient.

    Returns:
      (chosen, {candidate: mean Dice}).
    """
    scores = {v: [] for v in MIN_VOXELS}
    for probs, target in volumes:
        pred = probs > InferenceSpec.threshold
        for v in MIN_VOXELS:
            scores[v].append(losses.volume_dice(postprocess.remove_small_volumes(pred, v), target))
    means = {v: float(np.mean(s)) for v, s in scores.items()}
    best = max(means.values())
    return min(v for v, m in means.items() if m == best), means


def _held_out_volumes(config: Config, run_dir: str, held_out: list[tuple[str, LggDataset]],
                      precision: str):
    """Each held-out patient's probabilities from the member that did not train on it."""
    for relative, dataset in held_out:
        model, _ = load_model(os.path.join(run_dir, relative), precision=precision)
        segmenter = Segmenter([model], spec_for(config), image_size=model_image_size(model, config.image_size),
                              sources=[relative])
        for idx in dataset.patient_slices.values():
            yield (segmenter.probabilities(dataset.images[idx], batch_size=config.eval_batch),
                   dataset.masks[idx] > 0)


def record(config: Config, run: RunDir, held_out: list[tuple[str, LggDataset]], *,
           members: list[str], precision: str) -> InferenceSpec:
    """Chooses the post-processing on the held-out patients (if any) and writes inference.json.

    Args:
      config: the run's flags (model inputs, TTA, batch size).
      run: the run directory.
      held_out: (member file relative to the run, the patients it did not train on).
      members: every member file, relative to the run.
      precision: what the members compute in (Runtime.precision).

    Returns:
      The recorded spec.
    """
    spec = spec_for(config, members=members)
    patients = sum(len(d.patients) for _, d in held_out)
    if patients:
        chosen, means = choose_min_voxels(_held_out_volumes(config, run.path, held_out, precision))
        what = "out-of-fold predictions" if len(members) > 1 else "validation predictions"
        spec = dataclasses.replace(spec, min_component_voxels=chosen,
                                   chosen_on=f"{what} of {patients} patients")
        log.info(f"Post-processing chosen on {what} of {patients} patients: 3D components smaller "
                 f"than {chosen} voxels removed (mean Dice "
                 + ", ".join(f"{v}: {m:.4f}" for v, m in means.items()) + ")")
        run.write_json("postprocessing.json", {"min_component_voxels": means, "chosen": chosen,
                                               "patients": patients})
    run.write_json(INFERENCE_FILE, spec.to_json())
    log.info(f"Recorded the inference in {run.file(INFERENCE_FILE)}: {len(members)} member(s)")
    return spec
