"""A run's recorded inference (inference.json): the InferenceSpec schema, checked, read and made from flags."""

from __future__ import annotations

import dataclasses
import functools
import os

from data import atomic
from engine.config import field_problem
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
                raise RunDirError(f"{source}: {name} {problem}; fix it, or remove the file to use "
                                  "the run's config.json")
        return cls(**{**payload, "members": tuple(payload["members"])})


def _check(accepts, wording: str):
    return lambda v: None if accepts(v) else f"{wording}, got {v!r}"


def _members(v) -> bool:
    return bool(isinstance(v, list) and v and all(isinstance(m, str) and m and not os.path.isabs(m)
                                                  and ".." not in m.split("/") for m in v))


# The fields the flags also have are checked as the flags are: type, then range (engine.config).
_FLAG_FIELDS = ("normalize", "neighbours", "tta", "min_component_size", "min_component_voxels",
                "keep_largest_component")
_SPEC_CHECKS = {
    "members": _check(_members, "must be a non-empty list of model files inside the run directory"),
    "threshold": _check(lambda v: type(v) in (int, float) and 0 < v < 1, "must be a number in (0, 1)"),
    "chosen_on": _check(lambda v: isinstance(v, str), "must be text"),
    **{name: functools.partial(field_problem, name) for name in _FLAG_FIELDS},
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
    # Empty or cut short, it is a damaged record like any other: the user's to fix (exit 2).
    payload = atomic.read_json_object(path, RunDirError, "train again, or remove it to use the run's "
                                      "config.json")
    return None if payload is None else InferenceSpec.from_json(payload, path)
