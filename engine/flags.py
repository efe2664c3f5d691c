"""The absl flags of `python -m engine.main`, one per Config field, and their parsing into a Config.

Only engine/main.py imports this module: nothing deeper reads FLAGS.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from engine.config import (BENCHMARK_DATA, JIT_CHOICES, MODES, PRECISIONS, SPLITS, STRATEGIES,
                           Config, validate)

HELP = {
    "mode": "What to do: train, evaluate (a split), predict (a folder), export (SavedModel), benchmark.",
    "data_dir": "Folder holding kaggle_3m (or lgg-mri-segmentation/kaggle_3m, or patient folders).",
    "cache_dir": "Decoded-array cache folder ('' = $XDG_CACHE_HOME/brainseg or ~/.cache/brainseg).",
    "skip_bad_slices": "Log and skip bad slices instead of stopping before training.",
    "synthetic_patients": "If --data_dir has no patients, first write this many synthetic ones there (0: never).",
    "val_fraction": "Fraction of patients in the validation split.",
    "test_fraction": "Fraction of patients in the test split (unused with --num_folds).",
    "num_folds": "K-fold over patients: the test split is fold --fold of this many, cut by --seed (0: --test_fraction split).",
    "fold": "With --num_folds: which fold, 0 to num_folds-1, is the test split; one run directory per fold.",
    "seed": "Seed of the split, the data order, augmentation and initialisation.",
    "image_size": "Side of the square model input; divisible by 2**depth.",
    "base_filters": "Filters of the first U-Net block (the seed uses 64, Buda et al. 32).",
    "depth": "Number of 2x2 poolings in the U-Net encoder.",
    "dropout": "Dropout rate after the U-Net bottleneck block (0 disables).",
    "batch_norm": "BatchNorm in each U-Net block.",
    "epochs": "Epochs to train.",
    "batch_size": "Batch size per replica; the global batch is this times the replicas.",
    "learning_rate": "Adam learning rate.",
    "warmup_epochs": "Linear learning-rate warm-up over this many epochs (0 disables).",
    "steps_per_execution": "Training steps run inside one tf.function call (cuts host overhead).",
    "dice_smooth": "Smoothing term of the soft Dice loss.",
    "bce_weight": "Weight of binary cross-entropy in the loss.",
    "dice_weight": "Weight of (1 - soft Dice) in the loss.",
    "augment": "Geometric (and optional intensity) augmentation of training batches.",
    "rotation_deg": "Maximum rotation in degrees.",
    "shift": "Maximum width/height shift as a fraction of the size.",
    "shear": "Maximum shear.",
    "zoom": "Maximum zoom in or out, as a fraction.",
    "hflip": "Random horizontal flips.",
    "vflip": "Random vertical flips.",
    "brightness": "Maximum brightness shift (0 disables).",
    "contrast": "Maximum relative contrast change (0 disables).",
    "gamma": "Maximum relative gamma change (0 disables).",
    "missing_sequence": "Probability that pre- and (independently) post-contrast are replaced by FLAIR, as for a patient missing them.",
    "positive_fraction": "Over-sample lesion-positive slices to this fraction of each epoch (0: natural).",
    "precision": f"One of {', '.join(PRECISIONS)}; auto = mixed_float16 on GPU, float32 on CPU.",
    "jit_compile": f"XLA: one of {', '.join(JIT_CHOICES)}; auto = on with a GPU, off on CPU.",
    "strategy": f"tf.distribute strategy: one of {', '.join(STRATEGIES)}; auto picks from the hardware and TF_CONFIG.",
    "threads": "Intra-op threads (0: TensorFlow's default).",
    "cpu_devices": "Split the CPU into this many logical devices (to exercise --strategy=mirrored without GPUs).",
    "deterministic": "Turn on TensorFlow op determinism (bitwise-reproducible runs, slower).",
    "model_dir": "Run directory ('' = logs/<run_name>).",
    "run_name": "Name of the run directory under logs/.",
    "eval_every": "Evaluate on the validation split every this many epochs.",
    "eval_batch_size": "Evaluation batch size per replica (0 = --batch_size).",
    "log_every": "Write train/ scalars every this many steps.",
    "overlay_every": "Write validation overlay images every this many epochs.",
    "num_overlays": "Number of fixed validation slices in the overlays (half with lesions).",
    "progress": "Show a progress bar on a terminal.",
    "keep_checkpoints": "Checkpoints kept besides the best one.",
    "checkpoint_every_steps": "Also checkpoint every this many steps (0: only at epoch ends and on signals).",
    "monitor": "Metric for best checkpoint, plateau and early stopping: val_loss, val_dice or val_iou.",
    "restore_from": "Warm-start the model weights from another run directory or checkpoint.",
    "overwrite": "Start afresh in a run directory that holds another run.",
    "plateau_factor": "Learning-rate factor on a plateau.",
    "plateau_patience": "Evaluations without improvement before the learning rate drops.",
    "plateau_min_delta": "Smallest change that counts as an improvement for the plateau policy.",
    "plateau_cooldown": "Evaluations to wait after a drop before counting again.",
    "min_lr": "Lower bound of the learning rate.",
    "early_stopping_patience": "Evaluations without improvement before training stops.",
    "early_stopping_min_delta": "Smallest change that counts as an improvement for early stopping.",
    "restore_best_weights": "At the end, restore the best checkpoint's weights as the final model.",
    "split": f"Split for --mode=evaluate: one of {', '.join(SPLITS)}.",
    "input": "--mode=predict: a kaggle_3m-style folder or a folder of .tif slices.",
    "output": "--mode=predict: where the <name>_mask.tif files go (may be --input).",
    "checkpoint": "Model to use for evaluate/predict/export instead of the run's final model.",
    "tta": "Average predictions over flips (test-time augmentation).",
    "min_component_size": "Post-processing: remove predicted 2D components smaller than this (pixels).",
    "keep_largest_component": "Post-processing: keep only the largest 3D component per patient.",
    "export_dir": "--mode=export: SavedModel folder ('' = <run_dir>/saved_model).",
    "benchmark_data": f"One of {', '.join(BENCHMARK_DATA)}: device-resident random batches or the real input pipeline.",
    "benchmark_warmup": "Untimed steps before timing.",
    "benchmark_steps": "Timed steps.",
    "benchmark_compare_fit": "Also time Keras compile()/fit() on the same batches and report the ratio.",
    "benchmark_profile": "Capture a TensorFlow profiler trace of the timed steps into the run directory.",
}


def define_flags() -> None:
    """Defines one flag per Config field, with the Config default."""
    for field in dataclasses.fields(Config):
        name, default, help_text = field.name, field.default, HELP[field.name]
        # Enum values are checked in validate(), so a bad one gets the project's error line.
        if isinstance(default, bool):
            flags.DEFINE_boolean(name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_text)
        else:
            flags.DEFINE_string(name, default, help_text)


def config_from_flags(flag_values: flags.FlagValues) -> Config:
    """Builds and validates the Config. Raises ConfigError naming the flag."""
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(Config)}
    return validate(Config(**values))
