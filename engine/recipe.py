"""`--mode=train` as a whole: the run's members (one model, or K fold members), then the
post-processing chosen on patients they did not train on, recorded in inference.json."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from data.dataset import LggDataset
from engine import build, loop
from engine.config import Config
from engine.inference import InferenceSpec, Segmenter, load_model, model_image_size
from engine.rundir import FINAL_MODEL, INFERENCE_FILE, MEMBERS, SPLIT_FILE, RunDir
from engine.runtime import Runtime
from models import losses, postprocess

log = logging.getLogger(__name__)

# Candidates for the smallest 3D component kept, in pixels of the original 256x256 slices. The
# largest-component rule is not among them: it helped on development patients but cost Dice on
# unseen ones (a false-positive blob larger than the lesion takes the lesion's place).
MIN_VOXELS = (0, 250, 500, 1000, 2000, 4000)


def train(config: Config, runtime: Runtime) -> dict:
    """Trains the run's members and records the inference evaluate, predict and export apply.

    With --ensemble=K (K >= 2) the patients outside the test split are cut into K folds (by
    --seed) and member k trains on all of them but fold k, in <run_dir>/members/<k>; each member
    is a run of its own, resumed where it stopped. The members' predictions on their own
    held-out fold (out-of-fold, as nnU-Net's cross-validation) choose the post-processing. With
    one model, its validation patients choose it, if there are any.

    Returns:
      The last member's training summary, with "inference" (the recorded spec) when it finished.
    """
    if config.ensemble < 2:
        summary = loop.train(config, runtime)
        if summary["stopped"] in ("SIGTERM", "SIGINT") or not runtime.is_chief:
            return summary
        run = RunDir(config.run_dir)
        data = build.load_split(config, run, create=False)
        held_out = [(FINAL_MODEL, data.part("val"))] if data.split["val"] else []
        return {**summary, "inference": _record(config, run, held_out, members=[FINAL_MODEL])}

    top = RunDir(config.run_dir, writer=runtime.is_chief).open(config)
    data = build.load_split(config, top, create=True)
    pool = sorted(data.split["train"] + data.split["val"])
    order = [pool[i] for i in np.random.RandomState(config.seed).permutation(len(pool))]
    folds = [sorted(order[i] for i in chunk) for chunk in np.array_split(np.arange(len(pool)), config.ensemble)]
    members, held_out = [], []
    for k, fold in enumerate(folds):
        member_dir = os.path.join(config.run_dir, MEMBERS, str(k))
        split = {"train": [p for p in pool if p not in fold], "val": fold, "test": data.split["test"]}
        member = RunDir(member_dir, writer=runtime.is_chief)
        if runtime.is_chief and not os.path.exists(member.file(SPLIT_FILE)):
            os.makedirs(member_dir, exist_ok=True)
            member.write_json(SPLIT_FILE, {"seed": config.seed, "num_folds": 0, "fold": 0,
                                           "ensemble_member": k, **split})
        log.info(f"Member {k + 1} of {config.ensemble}: {len(split['train'])} training patients, "
                 f"{len(fold)} held out for the post-processing")
        member_config = dataclasses.replace(config, model_dir=member_dir, ensemble=0, num_folds=0,
                                            fold=0, overwrite=False)
        summary = loop.train(member_config, runtime)
        if summary["stopped"] in ("SIGTERM", "SIGINT"):
            return summary
        relative = os.path.join(MEMBERS, str(k), FINAL_MODEL)
        members.append(relative)
        held_out.append((relative, data.dataset.subset(fold)))
    if not runtime.is_chief:
        return summary
    return {**summary, "inference": _record(config, RunDir(config.run_dir), held_out, members=members)}


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


def _held_out_volumes(config: Config, run_dir: str, held_out: list[tuple[str, LggDataset]]):
    """Each held-out patient's probabilities from the member that did not train on it."""
    for relative, dataset in held_out:
        model, _ = load_model(os.path.join(run_dir, relative))
        segmenter = Segmenter([model], InferenceSpec(normalize=config.normalize, neighbours=config.neighbours,
                                                     tta=config.tta),
                              image_size=model_image_size(model, config.image_size), sources=[relative])
        names = np.array([r.patient for r in dataset.records])
        for patient in dataset.patients:
            idx = np.flatnonzero(names == patient)
            yield (segmenter.probabilities(dataset.images[idx], batch_size=config.eval_batch),
                   dataset.masks[idx] > 0)


def _record(config: Config, run: RunDir, held_out, *, members: list[str]) -> dict:
    """Chooses the post-processing on the held-out patients and writes inference.json."""
    spec = InferenceSpec(members=tuple(members), normalize=config.normalize,
                         neighbours=config.neighbours, tta=config.tta)
    patients = sum(len(d.patients) for _, d in held_out)
    if patients:
        chosen, means = choose_min_voxels(_held_out_volumes(config, run.path, held_out))
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
    return spec.to_json()
