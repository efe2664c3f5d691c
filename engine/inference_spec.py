"""A run's recorded inference (inference.json): the InferenceSpec schema, checked, read and made from flags."""

from __future__ import annotations

import dataclasses
import os

from data import atomic
from engine.checkpoint import CheckpointError
from engine.config import NORMALIZE
from engine.rundir import FINAL_MODEL, INFERENCE_FILE, RunDirError

THRESHOLD = 0.5


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


def read_spec(run_dir: str) -> InferenceSpec | None:
    """The run's recorded inference, or None for a run that has none (trained before it existed)."""
    path = os.path.join(run_dir, INFERENCE_FILE)
    payload = atomic.read_json_object(path, CheckpointError, "train again or remove it")
    return None if payload is None else InferenceSpec.from_json(payload, path)
