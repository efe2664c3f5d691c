"""The one inference path: a trained model, uint8 slices in, probability maps at their own size out."""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile

import keras
import numpy as np
import tensorflow as tf

from data import pipeline
from data import volume as data_volume
from data import atomic
from engine import checkpoint as checkpoint_lib
from engine.checkpoint import CheckpointError
from engine.config import NORMALIZE
from engine.rundir import FINAL_MODEL, INFERENCE_FILE, RunDir, RunDirError
from engine.state import build_model
from models import fused_batch_norm  # noqa: F401  (registers the layer that load_model reads)
from models import postprocess

log = logging.getLogger(__name__)

THRESHOLD = 0.5
# The flags of a run that its model and its inference are made of, read from its config.json.
MODEL_FIELDS = ("image_size", "base_filters", "depth", "dropout", "batch_norm", "normalize", "neighbours",
                "tta", "min_component_voxels")


def model_image_size(model, fallback: int) -> int:
    """The square input size the model was built for (its own shape wins over flags)."""
    shape = getattr(model, "input_shape", None)
    if shape and len(shape) == 4 and isinstance(shape[1], int):
        return int(shape[1])
    return fallback


def probabilities(model, images: tf.Tensor, *, image_size: int, tta: bool = False) -> tf.Tensor:
    """Probability maps at the input's own size for a uint8 batch (graph-safe).

    Training's overlays, evaluation, prediction and the exported SavedModel all call this, so
    they agree to the last bit: data.pipeline.preprocess, the model, a float32 sigmoid, optional
    flip averaging, and a bilinear resize back to the slices' size.

    Args:
      model: a Keras model mapping float32 [B, S, S, 3] in [0, 1] to logits [B, S, S, 1].
      images: uint8 [B, H, W, 3], any H and W.
      image_size: S, the model's input size.
      tta: average the probabilities of the identity, left-right, up-down and
        both flips (each flipped back), the flips training augments with.

    Returns:
      float32 [B, H, W, 1] probabilities (bilinear resize of the model-size map).
    """
    size = tf.shape(images)[1:3]
    x = pipeline.preprocess(images, image_size)
    if tta:
        batch = tf.shape(x)[0]
        flips = ((), (2,), (1,), (1, 2))
        # One model call on the four views keeps batches large.
        views = tf.concat([tf.reverse(x, axis) if axis else x for axis in flips], axis=0)
        p = tf.sigmoid(tf.cast(model(views, training=False), tf.float32))
        parts = [p[i * batch:(i + 1) * batch] for i in range(len(flips))]
        p = tf.add_n([tf.reverse(q, axis) if axis else q for q, axis in zip(parts, flips)]) / len(flips)
    else:
        p = tf.sigmoid(tf.cast(model(x, training=False), tf.float32))
    return tf.image.resize(p, size, method="bilinear")


class Predictor:
    """Batched probability maps for numpy slices of any size; one trace per slice size."""

    def __init__(self, model, *, image_size: int, tta: bool = False):
        self.model = model
        self.image_size = image_size
        self.tta = tta
        self.traces = 0
        self._fns = {}

    def _fn(self, images: tf.Tensor) -> tf.Tensor:
        # One trace per slice size, the batch left open: with the height and width unknown too,
        # the TTA graph ran a third slower (a bfloat16 batch of 16 at 256x256: 428 against 318 ms).
        shape = tuple(images.shape[1:])
        if shape not in self._fns:
            def fn(x):
                self.traces += 1
                return probabilities(self.model, x, image_size=self.image_size, tta=self.tta)

            self._fns[shape] = tf.function(fn, input_signature=[tf.TensorSpec([None, *shape], tf.uint8)])
        return self._fns[shape](images)

    def __call__(self, images: np.ndarray, *, batch_size: int) -> np.ndarray:
        """Probabilities of a stack of same-sized slices.

        Args:
          images: uint8 [N, H, W, C], as the model reads them (data.volume.model_inputs).
          batch_size: slices per model call.

        Returns:
          float32 [N, H, W] probabilities.
        """
        images = np.asarray(images)
        out = np.empty(images.shape[:3], np.float32)
        batch_size = min(batch_size, len(images)) or 1
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            n = len(batch)
            if n < batch_size:  # padded to the one batch shape: oneDNN builds its kernels per shape
                batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
            out[start:start + n] = self._fn(tf.constant(batch))[:n, ..., 0].numpy()
        return out


@dataclasses.dataclass(frozen=True)
class InferenceSpec:
    """Everything a run applies to a volume, recorded in its inference.json by training.

    Attributes:
      members: model files, relative to the run directory; their probabilities are averaged.
      normalize, neighbours: how a volume becomes model inputs (data.volume.model_inputs).
      tta: average over the four flips as well.
      threshold: probability above which a pixel is lesion.
      min_component_size: remove predicted 2D components smaller than this (pixels; 0: off).
      min_component_voxels: remove predicted 3D components smaller than this (voxels; 0: off).
      keep_largest_component: keep only the largest 3D component of a volume.
      chosen_on: what the threshold and post-processing were chosen on, for the record.
    """

    members: tuple[str, ...] = (FINAL_MODEL,)
    normalize: str = "none"
    neighbours: int = 0
    tta: bool = False
    threshold: float = THRESHOLD
    min_component_size: int = 0
    min_component_voxels: int = 0
    keep_largest_component: bool = False
    chosen_on: str = "defaults"

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "members": list(self.members)}

    @classmethod
    def from_json(cls, payload: dict, source: str) -> "InferenceSpec":
        """The spec of a run's inference.json, every field checked as strictly as the flags.

        Raises:
          RunDirError: a field is missing, unknown, of the wrong type or out of range (named).
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(payload) - fields), sorted({"members"} - set(payload))
        if unknown or missing:
            raise RunDirError(f"{source}: " + (f"unknown fields {unknown}" if unknown else f"no {missing[0]}")
                              + "; train again, or remove the file to use the run's config.json")
        for name, value in payload.items():
            problem = _SPEC_CHECKS[name](value)
            if problem:
                raise RunDirError(f"{source}: {name} {problem}, got {value!r}; fix it, or remove the "
                                  "file to use the run's config.json")
        return cls(**{**payload, "members": tuple(payload["members"])})


def _integer(low: int, high: int):
    return lambda v: None if type(v) is int and low <= v <= high else f"must be an integer in [{low}, {high}]"


def _flag(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _members(v) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(m, str) and m and not os.path.isabs(m)
                                           and ".." not in m.split("/") for m in v)
    return None if ok else "must be a non-empty list of model files inside the run directory"


_SPEC_CHECKS = {
    "members": _members,
    "normalize": lambda v: None if v in NORMALIZE else f"must be one of {', '.join(NORMALIZE)}",
    "neighbours": _integer(0, 3),
    "tta": _flag,
    "threshold": lambda v: None if type(v) in (int, float) and 0 < v < 1 else "must be a number in (0, 1)",
    "min_component_size": _integer(0, 10**9),
    "min_component_voxels": _integer(0, 10**9),
    "keep_largest_component": _flag,
    "chosen_on": lambda v: None if isinstance(v, str) else "must be text",
}


def spec_for(config, *, members=(FINAL_MODEL,), chosen_on: str = "the flags") -> InferenceSpec:
    """The inference a run's flags describe (a Config, or the "config" of a run's config.json):
    its model inputs, TTA and --min_component_voxels, and the default threshold."""
    values = config if isinstance(config, dict) else config.to_dict()
    return InferenceSpec(members=tuple(members), normalize=values.get("normalize", "none"),
                         neighbours=int(values.get("neighbours", 0)), tta=bool(values.get("tta", False)),
                         min_component_voxels=int(values.get("min_component_voxels", 0)),
                         chosen_on=chosen_on)


# Slices per group of volumes in predict and evaluate. Each volume's last batch padded alone cost
# a fifth of the model calls on the development data (81 calls of 16 for 1,034 slices in 29
# volumes, against 65); a group holds 256 slices' probabilities in memory.
GROUP_SLICES = 256


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


def groups(lengths: list[int], slices: int = GROUP_SLICES) -> list[list[int]]:
    """Consecutive volumes gathered until they hold `slices` slices: the model's batches run
    full across a group, and memory holds one group's probabilities."""
    out, size = [[]], 0
    for i, n in enumerate(lengths):
        if size >= slices:
            out, size = out + [[]], 0
        out[-1].append(i)
        size += n
    return [g for g in out if g]


def load_model(path: str, *, build=None) -> tuple[keras.Model, str]:
    """One trained model, and where it came from.

    Args:
      path: a `.keras` model file; or a run directory, its checkpoints folder, or one checkpoint
        (weights read into `build()`).
      build: makes the model a checkpoint's weights are read into (from the current config).

    Raises:
      CheckpointError: nothing loadable at `path`; a damaged file is named as such.
    """
    if not path.endswith(".keras"):
        model = build()
        info = checkpoint_lib.restore(tf.train.Checkpoint(model=model), path, partial=True)
        log.info(f"Model weights from checkpoint {info.path}")
        return model, info.path
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path} does not exist: train first (--mode=train with the same --run_name/--model_dir), "
            f"or name a checkpoint with --checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is damaged: not a Keras model archive (truncated or "
                              "overwritten?); train again, or name a checkpoint with --checkpoint")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # A damaged file: name it rather than show Keras' internals.
        raise CheckpointError(f"{path} is damaged and could not be loaded ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    log.info(f"Model from {path}")
    return in_global_precision(model), path


def in_global_precision(model: keras.Model) -> keras.Model:
    """The model computing in the global precision policy (the run's --precision, resolved).

    A .keras file keeps the policy it was trained in; predict and evaluate run in the precision
    chosen for this machine instead, so the model is rebuilt from its config with that policy
    (the logits stay float32, as models/unet.py builds them) and given the same weights.
    """
    policy = keras.mixed_precision.global_policy().name
    layers = [layer for layer in model.layers if layer.name != "logits" and layer.weights]
    if policy == "float64" or all(layer.dtype_policy.name == policy for layer in layers):
        return model
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer" and layer["config"].get("name") != "logits":
            layer["config"]["dtype"] = policy
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def read_spec(run_dir: str) -> InferenceSpec | None:
    """The run's recorded inference, or None for a run that has none (trained before it existed)."""
    path = os.path.join(run_dir, INFERENCE_FILE)
    payload = atomic.read_json_object(path, CheckpointError, "train again or remove it")
    return None if payload is None else InferenceSpec.from_json(payload, path)


def segmenter(config) -> Segmenter:
    """The inference a reading mode applies (evaluate, predict, export).

    The run's own, as training recorded it in inference.json (its members, model inputs, TTA,
    threshold and post-processing), with --tta and the post-processing flags added on top; or,
    with --checkpoint, that one model; or, for a run trained before inference.json existed, its
    final model with the model inputs its config.json records.

    Raises:
      CheckpointError: nothing loadable where the flags point.
    """
    recorded = read_spec(config.run_dir)
    flags = RunDir(config.run_dir).read_config()  # the run's own flags, where it has a config.json
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
        model, source = load_model(path, build=lambda: build_model(run_config))
        models.append(model)
        sources.append(source)
    image_size = model_image_size(models[0], run_config.image_size)
    if image_size != config.image_size and recorded is None and flags is None:
        log.info(f"The model takes {image_size}x{image_size} inputs (--image_size={config.image_size} ignored)")
    return Segmenter(models, extra, image_size=image_size, sources=sources)
