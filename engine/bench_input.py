"""`python -m engine.bench_input --data_dir=DIR`: images/s of the training input pipeline alone."""

from __future__ import annotations

import json

from absl import app

from engine import flags as engine_flags
from engine import main as engine_main  # defines the flags: the same as `python -m engine.main`


def run(argv: list[str]) -> None:
    """Times data.bench.measure_throughput on --data_dir's slices as a run reads them.

    The pipeline gets the run's own settings: --image_size, --batch_size, the augmentation flags,
    --positive_fraction, --normalize, --neighbours and --seed; --benchmark_steps batches are timed
    after --benchmark_warmup (at least one). Nothing consumes the batches: this is the pipeline's
    ceiling, to compare with a training step's images/s (--mode=benchmark). Prints one JSON line.
    """
    del argv
    from data import bench
    from data.lgg import DataError
    from engine import inputs
    from engine.config import ConfigError

    engine_main.setup_logging()
    try:
        config = engine_flags.config_from_flags(engine_main.FLAGS)
        data = inputs.model_data(inputs.load_dataset(config), config)
    except (ConfigError, DataError) as e:
        engine_main.fail(str(e), 2)
    try:
        result = bench.measure_throughput(
            data.images, data.masks, batch_size=config.batch_size, image_size=config.image_size,
            augment=config.augmentation, positive_fraction=config.positive_fraction,
            batches=config.benchmark_steps, warmup=max(1, config.benchmark_warmup), seed=config.seed)
    except ValueError as e:  # the pipeline's: fewer slices than one batch
        engine_main.fail(f"--data_dir={config.data_dir}: {e}; lower --batch_size or add patients", 2)
    result.update(data_dir=config.data_dir, slices=len(data.records), batch_size=config.batch_size,
                  image_size=config.image_size, augment=repr(config.augmentation))
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(run, flags_parser=engine_main.parse_flags)
