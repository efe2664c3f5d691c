"""The one frozen, validated configuration of a run: every setting's default, help text and range."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

MODES = ("train", "evaluate", "predict", "export", "benchmark")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", "true", "false")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
SPLITS = ("train", "val", "test", "all")
BENCHMARK_DATA = ("synthetic", "pipeline")
MONITORS = ("val_loss", "val_dice", "val_iou")
LR_SCHEDULES = ("plateau", "cosine")
EXPORT_FORMATS = ("saved_model", "onnx")
NORMALIZE = ("none", "volume")  # data.volume.NORMALIZE; not imported, so --help needs no TensorFlow
# The slices are 256x256: a model input beyond twice that only interpolates, at 4x the memory.
MAX_IMAGE_SIZE = 512


class ConfigError(ValueError):
    """A bad flag value; the message names the flag, or the file and field of a stored config."""

    def __init__(self, flag: str, message: str, *, source: str | None = None):
        super().__init__(f"{source}: {flag} {message}; fix the field, or train the run again with "
                         "--overwrite" if source else f"--{flag}: {message}")
        self.flag, self.message, self.source = flag, message, source


@dataclasses.dataclass(frozen=True)
class Check:
    """A field's range: called with a value, it returns what is wrong with it, or None.

    `inside` and `outside` are values at its edges that it accepts and refuses, so that a test
    can prove every check does what its message says.
    """

    accepts: Callable[[Any], bool]
    wording: str  # "must be ...", completed with ", got <value>"
    inside: tuple
    outside: tuple
    show: Callable[[Any], str] = str

    def __call__(self, value) -> str | None:
        return None if self.accepts(value) else f"{self.wording}, got {self.show(value)}"


def _at_least(low, high=None) -> Check:
    """low <= value (<= high): worded as "positive" / "zero or positive" for the usual lows."""
    words = {1: "a positive integer", 0: "zero or positive"}.get(low, f"at least {low}")
    step = 1 if isinstance(low, int) else 1e-3
    return Check(lambda v: low <= v and (high is None or v <= high),
                 f"must be {words}" + (f" up to {high}" if high is not None else ""),
                 inside=(low,) + ((high,) if high is not None else ()),
                 outside=(low - step,) + ((high + step,) if high is not None else ()))


def _between(low: float, high: float) -> Check:
    """low < value <= high."""
    return Check(lambda v: low < v <= high, f"must be in ({low:g}, {high:g}]", inside=(high, (low + high) / 2),
                 outside=(low, high * 1.01))


_open_unit = Check(lambda v: 0 < v < 1, "must be in (0, 1)", inside=(0.5,), outside=(0.0, 1.0))
_below_one = Check(lambda v: 0 <= v < 1, "must be in [0, 1)", inside=(0.0, 0.5), outside=(-0.1, 1.0))


def _one_of(choices) -> Check:
    return Check(lambda v: v in choices, f"must be one of {', '.join(choices)}", inside=tuple(choices),
                 outside=("none of them",), show=repr)


_FOLDS = Check(lambda v: v == 0 or 2 <= v <= 1000, "must be 0 (the fraction split) or at least 2 (at most 1000)",
               inside=(0, 2, 1000), outside=(1, -1, 1001))


def _valid_utf8(v) -> bool:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# TensorFlow writes checkpoints and events only to paths that are valid UTF-8.
_utf8 = Check(_valid_utf8, "must be valid UTF-8: TensorFlow cannot write or read its files there; "
              "rename the folder or choose another", inside=("logs/run",), outside=("run-\udcff",), show=repr)


def _plain_name(v) -> bool:
    return _valid_utf8(v) and v not in ("", ".", "..") and "/" not in v and "\0" not in v


# --run_name names one folder under logs/; a path would put the run elsewhere.
_run_name = Check(_plain_name, "must be one folder name under logs/ (no '/', not '.' or '..'); "
                  "use --model_dir for a run elsewhere", inside=("cpu",), outside=("../escape", "a/b", ".."),
                  show=repr)


def _field(default, help_text: str, check: Check | None = None, *, identity: bool = False,
           hparam: bool = False, local: bool = False):
    """A Config field and what the engine knows of it.

    Args:
      default, help_text, check: its default, its --help text and its range check.
      identity: part of the run's identity: a change makes an existing run directory a
        different run. Every identity field is also an hparam.
      hparam: shown in TensorBoard's HParams tab.
      local: may differ between the workers of one cluster (where things are on each machine,
        what each one shows); every other field must be the chief's.
    """
    return dataclasses.field(default=default, metadata={
        "help": help_text, "check": check, "identity": identity, "hparam": identity or hparam,
        "local": local})


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)
NON_NEGATIVE_FLOAT = _at_least(0.0)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run; built once from flags, then passed around as values."""

    mode: str = _field("train", "What to do: train, evaluate (a split), predict (a folder), "
                       "export (SavedModel or ONNX), benchmark.", _one_of(MODES))
    # Data.
    data_dir: str = _field("source_data", "Folder holding kaggle_3m (or lgg-mri-segmentation/kaggle_3m, "
                           "or patient folders).", identity=True, local=True)
    cache_dir: str = _field("", "Decoded-array cache folder ('' = $XDG_CACHE_HOME/brainseg or "
                            "~/.cache/brainseg).", local=True)
    decode_cache: bool = _field(True, "Keep decoded slices in a checked cache file in --cache_dir "
                                "(--nodecode_cache: decode every file each time, write nothing).", local=True)
    skip_bad_slices: bool = _field(False, "Log and skip bad slices instead of stopping before training.")
    synthetic_patients: int = _field(0, "If --data_dir has no patients, first write this many synthetic "
                                     "ones there (0: never).", _at_least(0, 10000))
    val_fraction: float = _field(0.15, "Fraction of patients in the validation split (0: none; the "
                                 "policies then have nothing to watch).", _below_one, identity=True)
    test_fraction: float = _field(0.15, "Fraction of patients in the test split (unused with "
                                  "--num_folds; 0: train on every patient, as a model to ship does).",
                                  _below_one, identity=True)
    num_folds: int = _field(0, "K-fold over patients: the test split is fold --fold of this many, cut by "
                            "--seed (0: --test_fraction split).", _FOLDS, identity=True)
    fold: int = _field(0, "With --num_folds: which fold, 0 to num_folds-1, is the test split; one run "
                       "directory per fold.", _at_least(0, 999), identity=True)
    seed: int = _field(42, "Seed of the split, the data order, augmentation and initialisation.",
                       _at_least(0, 2**31 - 1), identity=True)
    # Model.
    image_size: int = _field(256, "Side of the square model input; divisible by 2**depth.",
                             _at_least(1, MAX_IMAGE_SIZE), identity=True)
    base_filters: int = _field(64, "Filters of the first U-Net block (the seed uses 64, Buda et al. 32).",
                               _at_least(1, 256), identity=True)
    depth: int = _field(4, "Number of 2x2 poolings in the U-Net encoder.", _at_least(1, 8),
                        identity=True)
    dropout: float = _field(0.0, "Dropout rate after the U-Net bottleneck block (0 disables).",
                            _below_one, hparam=True)
    batch_norm: bool = _field(True, "BatchNorm in each U-Net block.", identity=True)
    normalize: str = _field("none", "Intensity standardisation of each volume: none, or volume (each "
                            "patient's channels scaled so their 99th percentile is the same).",
                            _one_of(NORMALIZE), identity=True)
    neighbours: int = _field(0, "2.5D input: the FLAIR of this many slices above and below as extra "
                             "channels.", _at_least(0, 3), identity=True)
    ensemble: int = _field(0, "Train this many fold members and average them: member k trains on "
                           "every patient outside the test split but fold k, and the folds it held "
                           "out choose the post-processing (0 or 1: one model).", _at_least(0, 20),
                           identity=True)
    # Optimisation.
    epochs: int = _field(150, "Training length, in epochs (an epoch: the training split's slices in "
                         "full global batches, the remainder dropped).", _at_least(1, 100000), hparam=True)
    batch_size: int = _field(16, "Batch size per replica; the global batch is this times the replicas "
                             "(a run's step clock counts its batches, so a run resumes only with its own).",
                             _at_least(1, 4096), identity=True)
    learning_rate: float = _field(1e-4, "Adam learning rate.", _between(0.0, 10.0), hparam=True)
    warmup_epochs: float = _field(0.0, "Linear learning-rate warm-up, in epochs (fractions allowed; "
                                  "turned into steps once; 0 disables).",
                                  _at_least(0.0, 100000.0), hparam=True)
    lr_schedule: str = _field("plateau", "After the warm-up: plateau (--learning_rate, lowered by the "
                              "plateau policy) or cosine (down to --min_lr at the last step; the "
                              "plateau policy is off).", _one_of(LR_SCHEDULES), hparam=True)
    steps_per_execution: int = _field(1, "Training steps (batches) run inside one tf.function call "
                                      "(cuts host overhead).", _at_least(1, 100000))
    dice_smooth: float = _field(1.0, "Smoothing term of the soft Dice loss.", NON_NEGATIVE_FLOAT, hparam=True)
    bce_weight: float = _field(1.0, "Weight of binary cross-entropy in the loss.", NON_NEGATIVE_FLOAT, hparam=True)
    dice_weight: float = _field(1.0, "Weight of (1 - soft Dice) in the loss.", NON_NEGATIVE_FLOAT, hparam=True)
    # Augmentation and sampling.
    augment: bool = _field(True, "Geometric (and optional intensity) augmentation of training batches.", hparam=True)
    rotation_deg: float = _field(0.2, "Maximum rotation in degrees.", _at_least(0.0, 180.0))
    shift: float = _field(0.05, "Maximum width/height shift as a fraction of the size.",
                          _at_least(0.0, 1.0))
    shear: float = _field(0.05, "Maximum shear.", _at_least(0.0, 1.0))
    zoom: float = _field(0.05, "Maximum zoom in or out, as a fraction (below 1).", _below_one)
    hflip: bool = _field(True, "Random horizontal flips.")
    vflip: bool = _field(True, "Random vertical flips.")
    brightness: float = _field(0.0, "Maximum brightness shift (0 disables).", _at_least(0.0, 1.0))
    contrast: float = _field(0.0, "Maximum relative contrast change (0 disables).", _at_least(0.0, 1.0))
    gamma: float = _field(0.0, "Maximum relative gamma change (0 disables).", _at_least(0.0, 2.0))
    missing_sequence: float = _field(0.0, "Probability that pre- and (independently) post-contrast are "
                                     "replaced by FLAIR, as for a patient missing them.",
                                     _at_least(0.0, 1.0), hparam=True)
    positive_fraction: float = _field(0.0, "Over-sample lesion-positive slices to this fraction of each "
                                      "epoch (0: natural).", _below_one, hparam=True)
    # Device policy.
    precision: str = _field("auto", f"One of {', '.join(PRECISIONS)}; auto = mixed_float16 on GPU; on "
                            "CPU mixed_bfloat16 with AMX or on AMD Zen 5, else float32 (BUILD.md).",
                            _one_of(PRECISIONS), hparam=True)
    jit_compile: str = _field("auto", f"XLA: one of {', '.join(JIT_CHOICES)}; auto = on with a GPU, off "
                              "on CPU.", _one_of(JIT_CHOICES))
    strategy: str = _field("auto", f"tf.distribute strategy: one of {', '.join(STRATEGIES)}; auto picks "
                           "from the hardware and TF_CONFIG.", _one_of(STRATEGIES))
    threads: int = _field(0, "Intra-op threads (0: TensorFlow's default).", _at_least(0, 1024), local=True)
    cpu_devices: int = _field(0, "Split the CPU into this many logical devices (to exercise "
                              "--strategy=mirrored without GPUs).", _at_least(0, 64))
    collective_timeout: int = _field(600, "Multi-worker: seconds to wait for every worker of TF_CONFIG "
                                     "to come up before failing with a message (a worker that is "
                                     "lost later is noticed by heartbeats within 10 s).",
                                     _at_least(1, 86400))
    tune_malloc: bool = _field(True, "Linux with glibc: malloc's mmap threshold 32 MiB and trim "
                               "threshold 64 MiB, where tf.data leaves both at 128 KiB and every "
                               "tensor's pages are faulted in again at each step (2x the step time "
                               "on 2 cores; same results). --notune_malloc: TensorFlow's setting. "
                               "BUILD.md, \"Host memory\".", local=True)
    deterministic: bool = _field(False, "Turn on TensorFlow op determinism (bitwise-reproducible runs, "
                                 "slower).")
    # Run directory, logging, evaluation.
    model_dir: str = _field("", "Run directory ('' = logs/<run_name>).", _utf8, local=True)
    run_name: str = _field("default", "Name of the run directory under logs/.", _run_name, local=True)
    eval_every: int = _field(1, "Evaluate on the validation split every this many epochs (and "
                             "after the last one).", POSITIVE)
    eval_batch_size: int = _field(0, "Evaluation batch size per replica (0 = --batch_size).",
                                  _at_least(0, 4096))
    log_every: int = _field(50, "Write train/ scalars every this many steps (global batches), not "
                            "epochs.", POSITIVE)
    overlay_every: int = _field(1, "Write validation overlay images every this many epochs (and "
                                "after the last one).", POSITIVE)
    num_overlays: int = _field(8, "Number of fixed validation slices in the overlays (half with "
                               "lesions).", _at_least(0, 64))
    progress: bool = _field(True, "Show a progress bar on a terminal.", local=True)
    # Checkpoints and policies.
    keep_checkpoints: int = _field(3, "Checkpoints kept besides the best one.", _at_least(1, 1000))
    checkpoint_every_steps: int = _field(0, "Also checkpoint every this many steps (0: only at epoch "
                                         "ends and on signals).", NON_NEGATIVE)
    monitor: str = _field("val_loss", "Metric for best checkpoint, plateau and early stopping: "
                          "val_loss, val_dice or val_iou.", _one_of(MONITORS))
    restore_from: str = _field("", "Warm-start the model weights from another run directory or "
                               "checkpoint.", _utf8, local=True)
    overwrite: bool = _field(False, "Start afresh in a run directory that holds another run.")
    plateau_factor: float = _field(0.1, "Learning-rate factor on a plateau.", _open_unit)
    plateau_patience: int = _field(5, "Evaluations without improvement before the learning rate "
                                   "drops (an evaluation: every --eval_every epochs).", NON_NEGATIVE)
    plateau_min_delta: float = _field(1e-4, "Smallest change that counts as an improvement for the "
                                      "plateau policy.", NON_NEGATIVE_FLOAT)
    plateau_cooldown: int = _field(0, "Evaluations (every --eval_every epochs) to wait after a drop "
                                   "before counting again.", NON_NEGATIVE)
    min_lr: float = _field(1e-11, "Lower bound of the learning rate.", NON_NEGATIVE_FLOAT, hparam=True)
    early_stopping_patience: int = _field(15, "Evaluations without improvement before training stops (an "
                                          "evaluation: every --eval_every epochs).",
                                          NON_NEGATIVE)
    early_stopping_min_delta: float = _field(0.0, "Smallest change that counts as an improvement for "
                                             "early stopping.", NON_NEGATIVE_FLOAT)
    restore_best_weights: bool = _field(True, "At the end, restore the best checkpoint's weights as the "
                                        "final model.")
    # Evaluation, prediction, export.
    split: str = _field("test", "What --mode=evaluate scores: the run's train, val or test split, or all: "
                        "every patient of --data_dir (any labelled kaggle_3m folder, or folder of "
                        "<patient>.nii.gz with <patient>_mask.nii.gz; no split.json needed).",
                        _one_of(SPLITS))
    surface_tolerance: float = _field(2.0, "Evaluation: tolerance of the normalised surface Dice, in "
                                      "pixels (mm for NIfTI volumes that give a spatial unit).",
                                      _at_least(0.0, 256.0))
    input: str = _field("", "--mode=predict: a kaggle_3m-style folder or a folder of .tif slices; "
                        "or a .nii/.nii.gz volume or a folder of them.")
    output: str = _field("", "--mode=predict: where the <name>_mask.tif (or <name>_mask.nii.gz) files "
                         "go (may be --input).")
    checkpoint: str = _field("", "Model to use for evaluate/predict/export instead of the run's final "
                             "model.", _utf8)
    tta: bool = _field(False, "Average predictions over flips (test-time augmentation).")
    min_component_size: int = _field(0, "Post-processing: remove predicted 2D components smaller than "
                                     "this (pixels).", _at_least(0, 256 * 256))
    min_component_voxels: int = _field(0, "Post-processing: remove predicted 3D components (connected "
                                       "over neighbouring slices) smaller than this many voxels.",
                                       _at_least(0, 256 * 256 * 256))
    keep_largest_component: bool = _field(False, "Post-processing: keep only the largest 3D component "
                                          "per patient.")
    export_dir: str = _field("", "--mode=export: the export's folder ('' = <run_dir>/saved_model, or "
                             "<run_dir>/onnx with --export_format=onnx).", _utf8)
    export_format: str = _field("saved_model", "--mode=export: saved_model writes a TensorFlow "
                                "SavedModel (signature serving_default); onnx writes model.onnx for "
                                "ONNX Runtime (needs pip install -e \".[onnx]\"). Both take uint8 "
                                "[slices, 256, 256, 3] images and return float32 probabilities, with "
                                "the run's normalisation, TTA and members inside; the threshold and "
                                "post-processing go into brainseg_export.json.", _one_of(EXPORT_FORMATS))
    # Benchmark.
    benchmark_data: str = _field("synthetic", f"One of {', '.join(BENCHMARK_DATA)}: device-resident "
                                 "random batches or the real input pipeline.", _one_of(BENCHMARK_DATA))
    benchmark_warmup: int = _field(5, "Untimed steps (batches) before timing, in whole calls of "
                                   "--steps_per_execution steps.", _at_least(0, 100000))
    benchmark_steps: int = _field(20, "Timed steps (batches), in whole calls of --steps_per_execution "
                                  "steps.", _at_least(1, 100000))
    benchmark_compare_fit: bool = _field(False, "Also time Keras compile()/fit() on the same batches and "
                                         "report the ratio.")
    benchmark_compare_precision: bool = _field(False, "Also time the other precision of this device "
                                               "(float32 against mixed_bfloat16 on a CPU, mixed_float16 on "
                                               "a GPU), calls alternating with the run's own, and report "
                                               "the speed-up.")
    benchmark_profile: bool = _field(False, "Capture a TensorFlow profiler trace of the timed steps into "
                                     "the run directory.")

    @property
    def run_dir(self) -> str:
        """Where this run's files live: --model_dir, else logs/<run_name>."""
        return self.model_dir or os.path.join("logs", self.run_name)

    @property
    def monitor_mode(self) -> str:
        """'min' for loss-like monitors, 'max' for scores (Keras' 'auto' rule)."""
        return "min" if "loss" in self.monitor else "max"

    @property
    def eval_batch(self) -> int:
        """Slices per replica in an evaluation or prediction batch."""
        return self.eval_batch_size or self.batch_size

    @property
    def augmentation(self):
        """The training augmentation (data.pipeline.Augment), or None with --noaugment."""
        from data import pipeline  # Here, so that --help answers without loading TensorFlow.

        if not self.augment:
            return None
        return pipeline.Augment(
            rotation_deg=self.rotation_deg, shift=self.shift, shear=self.shear, zoom=self.zoom,
            hflip=self.hflip, vflip=self.vflip, brightness=self.brightness, contrast=self.contrast,
            gamma=self.gamma, missing_sequence=self.missing_sequence)

    @property
    def loss(self):
        """How the per-example loss is weighted (models.losses.LossSpec)."""
        from models import losses

        return losses.LossSpec(dice_smooth=self.dice_smooth, bce_weight=self.bce_weight,
                               dice_weight=self.dice_weight)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def help_text(name: str) -> str:
    """The --help text of a field."""
    return FIELDS[name].metadata["help"]


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
RUN_IDENTITY_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["identity"])
HPARAM_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["hparam"])
LOCAL_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["local"])


def _require(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(flag, message)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def field_problem(name: str, value) -> str | None:
    """What is wrong with a value of a Config field (its type, finiteness, its range), or None.

    Flags arrive typed by absl; a value read back from a file (a run's config.json or
    inference.json) may be any JSON, so its type is checked here first, as strictly: "false" is
    not false, 2.0 is not an integer.
    """
    kind = type(FIELDS[name].default)
    typed = (isinstance(value, bool) if kind is bool else type(value) is int if kind is int
             else type(value) in (int, float) if kind is float else isinstance(value, kind))
    if not typed:
        return f"must be {_KINDS[kind]}, got {value!r}"
    if kind is float and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    check = FIELDS[name].metadata["check"]
    return check(value) if check else None


def from_record(values: dict, source: str) -> Config:
    """A run's stored flags (the "config" of its config.json) as a Config, checked like flags.

    A field the record lacks (the run predates it) takes its default; a field this version no
    longer has is ignored.

    Args:
      values: the stored field values.
      source: the file they came from, named in the error.

    Raises:
      ConfigError: naming the file and the first bad field (message `<source>: <field> ...`).
    """
    known = {name: value for name, value in values.items() if name in FIELDS}
    for name, value in known.items():
        problem = field_problem(name, value)
        if problem:
            raise ConfigError(name, problem, source=source)
    known = {k: float(v) if type(FIELDS[k].default) is float else v for k, v in known.items()}
    try:
        return validate(Config(**known))
    except ConfigError as e:
        raise ConfigError(e.flag, e.message, source=source) from None


def validate(config: Config) -> Config:
    """Checks every value once, so nothing deeper has to.

    Each field's own range comes from its metadata; every float must be finite; the rules that
    tie fields together follow.

    Args:
      config: the parsed configuration.

    Returns:
      The same config, for chaining.

    Raises:
      ConfigError: naming the first bad flag and what is wrong with it.
    """
    c = config
    for name in FIELDS:
        problem = field_problem(name, getattr(c, name))
        _require(problem is None, name, problem or "")
    # XLA's CPU backend is a single device: a step compiled for one logical CPU cannot touch
    # the variables of another (Keras fit fails the same way). GPUs are separate XLA devices.
    _require(not (c.jit_compile == "true" and c.cpu_devices > 1), "jit_compile",
             f"XLA cannot run over logical CPU devices (--cpu_devices={c.cpu_devices}); "
             "use --jit_compile=false or auto with --cpu_devices")
    _require(c.image_size % (2 ** c.depth) == 0, "image_size",
             f"{c.image_size} is not divisible by 2**depth = {2 ** c.depth} "
             f"(--depth={c.depth}); try {max(2 ** c.depth, c.image_size // 2 ** c.depth * 2 ** c.depth)}")
    _require(c.min_lr <= c.learning_rate, "min_lr",
             f"must be between 0 and --learning_rate={c.learning_rate}, got {c.min_lr}")
    _require(c.val_fraction + c.test_fraction < 1, "test_fraction",
             f"--val_fraction + --test_fraction must leave patients for training, "
             f"got {c.val_fraction} + {c.test_fraction}")
    if c.num_folds:
        _require(0 <= c.fold < c.num_folds, "fold",
                 f"must be in [0, --num_folds={c.num_folds}), got {c.fold}")
    else:
        _require(c.fold == 0, "fold", f"needs --num_folds >= 2, got --fold={c.fold} without folds")
    _require(c.bce_weight + c.dice_weight > 0, "bce_weight",
             "--bce_weight and --dice_weight must not both be 0")
    _require(bool(c.data_dir), "data_dir", "must not be empty")
    if c.mode == "export" and c.export_format == "onnx":
        # ONNX Runtime's CPU kernels are float32: a float16 or bfloat16 graph would not run there.
        _require(c.precision in ("auto", "float32"), "precision",
                 f"--export_format=onnx exports in float32; use --precision=float32 or auto, "
                 f"got {c.precision}")
    if c.mode == "predict":
        _require(bool(c.input), "input", "--mode=predict needs --input=DIR (a folder of .tif slices, or NIfTI volumes)")
        _require(bool(c.output), "output", "--mode=predict needs --output=DIR")
    return c
