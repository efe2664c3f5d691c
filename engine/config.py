"""The one frozen, validated configuration of a brainseg run."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

MODES = ("train", "evaluate", "predict", "export", "benchmark")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", "true", "false")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
SPLITS = ("train", "val", "test")
BENCHMARK_DATA = ("synthetic", "pipeline")

# Fields whose change makes an existing run directory a different run: the
# weights or the data they were trained on would no longer match.
RUN_IDENTITY_FIELDS = (
    "image_size", "base_filters", "depth", "batch_norm", "data_dir",
    "val_fraction", "test_fraction", "seed", "num_folds", "fold",
)


class ConfigError(ValueError):
    """A bad flag value; the message names the flag."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run; built once from flags, then passed around as values."""

    mode: str = "train"
    # Data.
    data_dir: str = "source_data"
    cache_dir: str = ""
    skip_bad_slices: bool = False
    synthetic_patients: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    num_folds: int = 0  # 0: the fraction split; k >= 2: k-fold over patients, --fold is the test part.
    fold: int = 0
    seed: int = 42
    # Model.
    image_size: int = 256
    base_filters: int = 64
    depth: int = 4
    dropout: float = 0.0
    batch_norm: bool = True
    # Optimisation.
    epochs: int = 150
    batch_size: int = 16
    learning_rate: float = 1e-4
    warmup_epochs: float = 0.0
    steps_per_execution: int = 1
    dice_smooth: float = 1.0
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    # Augmentation and sampling.
    augment: bool = True
    rotation_deg: float = 0.2
    shift: float = 0.05
    shear: float = 0.05
    zoom: float = 0.05
    hflip: bool = True
    vflip: bool = True
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    missing_sequence: float = 0.0
    positive_fraction: float = 0.0
    # Device policy.
    precision: str = "auto"
    jit_compile: str = "auto"
    strategy: str = "auto"
    threads: int = 0
    cpu_devices: int = 0
    deterministic: bool = False
    # Run directory, logging, evaluation.
    model_dir: str = ""
    run_name: str = "default"
    eval_every: int = 1
    eval_batch_size: int = 0
    log_every: int = 50
    overlay_every: int = 1
    num_overlays: int = 8
    progress: bool = True
    # Checkpoints and policies.
    keep_checkpoints: int = 3
    checkpoint_every_steps: int = 0
    monitor: str = "val_loss"
    restore_from: str = ""
    overwrite: bool = False
    plateau_factor: float = 0.1
    plateau_patience: int = 5
    plateau_min_delta: float = 1e-4
    plateau_cooldown: int = 0
    min_lr: float = 1e-11
    early_stopping_patience: int = 15
    early_stopping_min_delta: float = 0.0
    restore_best_weights: bool = True
    # Evaluation, prediction, export.
    split: str = "test"
    input: str = ""
    output: str = ""
    checkpoint: str = ""
    tta: bool = False
    min_component_size: int = 0
    keep_largest_component: bool = False
    export_dir: str = ""
    # Benchmark.
    benchmark_data: str = "synthetic"
    benchmark_warmup: int = 5
    benchmark_steps: int = 20
    benchmark_compare_fit: bool = False
    benchmark_profile: bool = False

    @property
    def run_dir(self) -> str:
        """Where this run's files live: --model_dir, else logs/<run_name>."""
        return self.model_dir or os.path.join("logs", self.run_name)

    @property
    def monitor_mode(self) -> str:
        """'min' for loss-like monitors, 'max' for scores (Keras' 'auto' rule)."""
        return "min" if "loss" in self.monitor else "max"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _require(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(flag, message)


def validate(config: Config) -> Config:
    """Checks every value once, so nothing deeper has to.

    Args:
      config: the parsed configuration.

    Returns:
      The same config, for chaining.

    Raises:
      ConfigError: naming the first bad flag and what is wrong with it.
    """
    c = config
    _require(c.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {c.mode!r}")
    _require(c.precision in PRECISIONS, "precision",
             f"must be one of {', '.join(PRECISIONS)}, got {c.precision!r}")
    _require(c.jit_compile in JIT_CHOICES, "jit_compile",
             f"must be one of {', '.join(JIT_CHOICES)}, got {c.jit_compile!r}")
    _require(c.strategy in STRATEGIES, "strategy",
             f"must be one of {', '.join(STRATEGIES)}, got {c.strategy!r}")
    _require(c.split in SPLITS, "split", f"must be one of {', '.join(SPLITS)}, got {c.split!r}")
    _require(c.benchmark_data in BENCHMARK_DATA, "benchmark_data",
             f"must be one of {', '.join(BENCHMARK_DATA)}, got {c.benchmark_data!r}")
    for name in ("batch_size", "epochs", "image_size", "base_filters", "depth",
                 "steps_per_execution", "eval_every", "log_every", "overlay_every",
                 "keep_checkpoints", "benchmark_steps"):
        value = getattr(c, name)
        _require(value > 0, name, f"must be a positive integer, got {value}")
    for name in ("eval_batch_size", "threads", "cpu_devices", "synthetic_patients", "num_overlays",
                 "checkpoint_every_steps", "plateau_patience", "plateau_cooldown",
                 "early_stopping_patience", "benchmark_warmup", "min_component_size"):
        value = getattr(c, name)
        _require(value >= 0, name, f"must be zero or positive, got {value}")
    # XLA's CPU backend is a single device: a step compiled for one logical CPU cannot touch
    # the variables of another (Keras fit fails the same way). GPUs are separate XLA devices.
    _require(not (c.jit_compile == "true" and c.cpu_devices > 1), "jit_compile",
             f"XLA cannot run over logical CPU devices (--cpu_devices={c.cpu_devices}); "
             "use --jit_compile=false or auto with --cpu_devices")
    _require(c.image_size % (2 ** c.depth) == 0, "image_size",
             f"{c.image_size} is not divisible by 2**depth = {2 ** c.depth} "
             f"(--depth={c.depth}); try {max(2 ** c.depth, c.image_size // 2 ** c.depth * 2 ** c.depth)}")
    _require(c.learning_rate > 0, "learning_rate", f"must be positive, got {c.learning_rate}")
    _require(0 <= c.min_lr <= c.learning_rate, "min_lr",
             f"must be between 0 and --learning_rate={c.learning_rate}, got {c.min_lr}")
    _require(0 < c.plateau_factor < 1, "plateau_factor", f"must be in (0, 1), got {c.plateau_factor}")
    _require(0 <= c.dropout < 1, "dropout", f"must be in [0, 1), got {c.dropout}")
    _require(0 < c.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {c.val_fraction}")
    _require(0 < c.test_fraction < 1, "test_fraction", f"must be in (0, 1), got {c.test_fraction}")
    _require(c.val_fraction + c.test_fraction < 1, "test_fraction",
             f"--val_fraction + --test_fraction must leave patients for training, "
             f"got {c.val_fraction} + {c.test_fraction}")
    _require(c.num_folds == 0 or c.num_folds >= 2, "num_folds",
             f"must be 0 (the fraction split) or at least 2, got {c.num_folds}")
    if c.num_folds:
        _require(0 <= c.fold < c.num_folds, "fold",
                 f"must be in [0, --num_folds={c.num_folds}), got {c.fold}")
    else:
        _require(c.fold == 0, "fold", f"needs --num_folds >= 2, got --fold={c.fold} without folds")
    _require(0 <= c.positive_fraction < 1, "positive_fraction",
             f"must be in [0, 1), got {c.positive_fraction}")
    _require(c.warmup_epochs >= 0, "warmup_epochs", f"must be zero or positive, got {c.warmup_epochs}")
    _require(c.dice_smooth >= 0, "dice_smooth", f"must be zero or positive, got {c.dice_smooth}")
    _require(c.bce_weight >= 0 and c.dice_weight >= 0 and c.bce_weight + c.dice_weight > 0,
             "bce_weight", "--bce_weight and --dice_weight must be >= 0 and not both 0")
    for name in ("rotation_deg", "shift", "shear", "zoom", "brightness", "contrast", "gamma"):
        value = getattr(c, name)
        _require(value >= 0, name, f"must be zero or positive, got {value}")
    _require(0 <= c.missing_sequence <= 1, "missing_sequence",
             f"must be a probability in [0, 1], got {c.missing_sequence}")
    _require(c.monitor in ("val_loss", "val_dice", "val_iou"), "monitor",
             f"must be one of val_loss, val_dice, val_iou, got {c.monitor!r}")
    _require(bool(c.data_dir), "data_dir", "must not be empty")
    if c.mode == "predict":
        _require(bool(c.input), "input", "--mode=predict needs --input=DIR (a folder of .tif slices)")
        _require(bool(c.output), "output", "--mode=predict needs --output=DIR")
    return c
