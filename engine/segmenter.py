"""A run's whole inference on volumes, as evaluate, predict and export apply it, and how a mode finds it."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from data import volume as data_volume
from engine.inference import Predictor, model_image_size
from engine.inference_spec import InferenceSpec, read_spec, spec_for
from engine.loading import load_model
from engine.config import ConfigError, from_record
from engine.rundir import CONFIG_FILE, FINAL_MODEL, INFERENCE_FILE, RunDir, RunDirError
from engine.state import build_model
from models import postprocess

log = logging.getLogger(__name__)

# The flags of a run that its model and its inference are made of, read from its config.json.
MODEL_FIELDS = ("image_size", "base_filters", "depth", "dropout", "batch_norm", "normalize", "neighbours",
                "tta", "min_component_voxels")


class Segmenter:
    """A run's whole inference on volumes: model inputs, the members' averaged probabilities,
    the threshold and the post-processing. Evaluate, predict and export all go through it."""

    def __init__(self, models: list, spec: InferenceSpec, *, image_size: int, sources: list[str]):
        self.spec, self.image_size, self.sources = spec, image_size, sources
        self.predictors = [Predictor(m, image_size=image_size, tta=spec.tta) for m in models]

    @property
    def models(self) -> list:
        return [p.model for p in self.predictors]

    def probabilities(self, volume: np.ndarray, *, batch_size: int) -> np.ndarray:
        """float32 [D, H, W] for one patient's uint8 slices [D, H, W, 3], in slice order."""
        return self.probabilities_of([volume], batch_size=batch_size)[0]

    def probabilities_of(self, volumes: list[np.ndarray], *, batch_size: int) -> list[np.ndarray]:
        """`probabilities` of each volume (all of one slice size), their slices through the model
        in shared batches: a volume's last partial batch is filled by the next one's slices."""
        inputs = [data_volume.model_inputs(v, normalize=self.spec.normalize,
                                           neighbours=self.spec.neighbours).numpy() for v in volumes]
        x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        total = None
        for predictor in self.predictors:
            p = predictor(x, batch_size=batch_size)
            total = p if total is None else total + p
        return np.split(total / len(self.predictors), np.cumsum([len(i) for i in inputs])[:-1])

    def masks(self, probabilities: np.ndarray) -> np.ndarray:
        """bool [D, H, W]: the threshold, then the post-processing of the whole volume."""
        s = self.spec
        return postprocess.postprocess_volume(
            probabilities > s.threshold, min_component_size=s.min_component_size,
            min_component_voxels=s.min_component_voxels, keep_largest=s.keep_largest_component)

    def segment_volumes(self, volumes: list[np.ndarray], *, batch_size: int) -> list[np.ndarray]:
        """The masks of each volume (all of one slice size), the model batches shared."""
        return [self.masks(p) for p in self.probabilities_of(volumes, batch_size=batch_size)]

    def describe(self) -> str:
        s = self.spec
        post = [f"2D components < {s.min_component_size} px removed"] if s.min_component_size > 1 else []
        post += [f"3D components < {s.min_component_voxels} voxels removed"] if s.min_component_voxels > 1 else []
        post += ["largest 3D component kept"] if s.keep_largest_component else []
        return (f"{len(self.predictors)} model(s) at {self.image_size}x{self.image_size}, "
                f"normalize {s.normalize}, neighbours {s.neighbours}, tta {'on' if s.tta else 'off'}, "
                f"threshold {s.threshold:g}, post-processing: {', '.join(post) or 'none'} "
                f"(chosen on {s.chosen_on})")


def stored_flags(run_dir: str) -> dict | None:
    """The run's own flags, checked like flags, where it has a config.json (else None).

    Raises:
      RunDirError: config.json is not brainseg's.
      ConfigError: a field has the wrong type or range; the file and field are named.
    """
    run = RunDir(run_dir)
    stored = run.read_config()
    return None if stored is None else from_record(stored, run.file(CONFIG_FILE)).to_dict()


def segmenter(config, *, precision: str) -> Segmenter:
    """The inference a reading mode applies (evaluate, predict, export).

    The run's own, as training recorded it in inference.json (its members, model inputs, TTA,
    threshold and post-processing), with --tta and the post-processing flags added on top; or,
    with --checkpoint, that one model; or, for a run trained before inference.json existed, its
    final model with the model inputs its config.json records. The models compute in
    `precision` (Runtime.precision).

    Raises:
      CheckpointError: nothing loadable where the flags point.
      ConfigError: --checkpoint names nothing, or the run's config.json holds a bad field.
      RunDirError: --model_dir is not a run, or its inference.json is damaged.
    """
    if config.checkpoint and not os.path.lexists(config.checkpoint):
        raise ConfigError("checkpoint", f"{config.checkpoint} does not exist: name a .keras model, a "
                          "run directory, its checkpoints folder or one checkpoint in it")
    recorded = read_spec(config.run_dir)
    flags = stored_flags(config.run_dir)
    if not config.checkpoint and recorded is None and flags is None \
            and not os.path.exists(os.path.join(config.run_dir, FINAL_MODEL)):
        raise RunDirError(f"--model_dir={config.run_dir} is not a brainseg run (no {INFERENCE_FILE}, "
                          f"config.json or {FINAL_MODEL}): point it at a trained run's directory, or "
                          "name a model with --checkpoint")
    run_config = config if flags is None else dataclasses.replace(
        config, **{k: flags[k] for k in MODEL_FIELDS if k in flags})
    spec = recorded or spec_for(run_config, chosen_on="the run's config.json (no inference.json)"
                                if flags is not None else "flags")
    extra = dataclasses.replace(
        spec, tta=spec.tta or config.tta,
        min_component_size=max(spec.min_component_size, config.min_component_size),
        min_component_voxels=max(spec.min_component_voxels, config.min_component_voxels),
        keep_largest_component=spec.keep_largest_component or config.keep_largest_component)
    if recorded is not None and extra != recorded:
        log.info("Adding the flags' --tta / post-processing to the run's recorded inference")
    paths = [config.checkpoint] if config.checkpoint else [os.path.join(config.run_dir, m) for m in spec.members]
    models, sources = [], []
    for path in paths:
        model, source = load_model(path, precision=precision, build=lambda: build_model(run_config))
        models.append(model)
        sources.append(source)
    image_size = model_image_size(models[0], run_config.image_size)
    if image_size != config.image_size and recorded is None and flags is None:
        log.info(f"The model takes {image_size}x{image_size} inputs (--image_size={config.image_size} ignored)")
    return Segmenter(models, extra, image_size=image_size, sources=sources)
