"""A run's data from its config: the checked dataset, its patient split, and the slices as the model reads them."""

from __future__ import annotations

import dataclasses
import logging

from data import dataset as lgg_dataset
from data import lgg, synthetic, volume
from data import split as split_lib
from engine.config import Config
from engine.rundir import SPLIT_FILE, RunDir

log = logging.getLogger(__name__)


def load_dataset(config: Config) -> lgg_dataset.LggDataset:
    """Loads and validates the data, first generating the synthetic set if asked and missing.

    Raises:
      lgg.DataError: naming every bad file, or where it looked for patients.
    """
    if config.synthetic_patients:
        try:
            lgg.find_patient_dirs(config.data_dir)
        except lgg.DataError:
            synthetic.write_into_empty(config.data_dir, patients=config.synthetic_patients,
                                       seed=config.seed)
    cache_dir = (config.cache_dir or lgg_dataset.default_cache_dir()) if config.decode_cache else None
    return lgg_dataset.load(config.data_dir, skip_bad_slices=config.skip_bad_slices,
                            cache_dir=cache_dir)


@dataclasses.dataclass(frozen=True)
class SplitData:
    """The loaded dataset and its patient split; `part(name)` is one split's slices."""

    dataset: lgg_dataset.LggDataset
    split: dict[str, list[str]]

    def part(self, name: str) -> lgg_dataset.LggDataset:
        return self.dataset.subset(self.split[name])


def load_split(config: Config, run: RunDir, *, create: bool, fresh: bool = False) -> SplitData:
    """The one way any mode gets its data: the dataset, and the run's split of it.

    A run keeps the split of its split.json, so a resumed run trains on the same patients; a
    split made for another fold would score other held-out patients, and is refused.

    Args:
      config: data flags, and the split flags used when the run has no split.json yet.
      run: the run directory holding (or about to hold) split.json.
      create: True for training, which makes the split when the run has none (`write_split`
        records it); False for readers (evaluate), which need a trained run's split.json.
      fresh: make a new split whatever split.json holds (--overwrite, which removes it).

    Raises:
      lgg.DataError: bad data, a split.json that does not fit it, or none where one is needed.
      RunDirError: split.json is unreadable.
    """
    dataset = load_dataset(config)
    return SplitData(dataset, run_split(dataset, run, config, create=create, fresh=fresh))


def run_split(dataset: lgg_dataset.LggDataset, run: RunDir, config: Config, *, create: bool,
              fresh: bool = False) -> dict:
    """The run's split of the dataset: its split.json, checked, or (create=True) a new one."""
    path, stored = run.file(SPLIT_FILE), (None if fresh else run.read_split())
    if stored is None and not create:
        raise lgg.DataError(f"{path} does not exist: {run.path} holds no trained run (train it "
                            "first, or point --model_dir at a run directory)")
    if stored is None:
        return split_lib.make_split(dataset, val_fraction=config.val_fraction,
                                    test_fraction=config.test_fraction, seed=config.seed,
                                    num_folds=config.num_folds, fold=config.fold)
    split = split_lib.check_split(stored, dataset, path)
    # Files written before folds existed have no such keys and were fraction splits (0/0).
    made = {"num_folds": stored.get("num_folds", 0), "fold": stored.get("fold", 0)}
    if made != {"num_folds": config.num_folds, "fold": config.fold}:
        raise lgg.DataError(f"{path} was made with --num_folds={made['num_folds']} --fold={made['fold']}, "
                            f"not --num_folds={config.num_folds} --fold={config.fold}; use a run "
                            "directory per fold")
    requested = {"seed": config.seed, "val_fraction": config.val_fraction,
                 "test_fraction": config.test_fraction}
    if any(k in stored and stored[k] != v for k, v in requested.items()):
        log.warning(f"{path} was made with {({k: stored.get(k) for k in requested})}; reusing it "
                    f"although {requested} was requested")
    return split


def write_split(run: RunDir, config: Config, split: dict, **extra) -> None:
    """Records a run's split in its split.json, with what it was made from."""
    run.write_json(SPLIT_FILE, {"seed": config.seed, "val_fraction": config.val_fraction,
                                "test_fraction": config.test_fraction, "num_folds": config.num_folds,
                                "fold": config.fold, **extra, **split})


def model_data(dataset: lgg_dataset.LggDataset, config: Config) -> lgg_dataset.LggDataset:
    """The same slices with their images as the model reads them (data.volume.model_inputs)."""
    images = volume.prepare(dataset, normalize=config.normalize, neighbours=config.neighbours)
    return lgg_dataset.LggDataset(dataset.records, images, dataset.masks)
