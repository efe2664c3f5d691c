"""--mode=predict: masks for a folder of slices, ground truth left alone, bad files named."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
import tifffile

from engine.rundir import RunDirError

from data.lgg import DataError
from engine import predict, runtime
from engine.config import Config
from engine.inference import Predictor
from tests.helpers import asymmetric_model, config_flags, model_only_config, pointwise_model, run_engine

SIZE = 64  # the model's input size


def _pointwise_model(size: int = SIZE) -> keras.Model:
    return pointwise_model(size)


def _slice(height: int, width: int, *, channels: int | None = 3, dtype=np.uint8, bright=200) -> np.ndarray:
    """A slice whose FLAIR (or only) channel is bright on its left half, dim elsewhere."""
    shape = (height, width) if channels is None else (height, width, channels)
    image = np.full(shape, 30, dtype)
    if channels is None:
        image[:, : width // 2] = bright
    else:
        image[:, : width // 2, min(1, channels - 1)] = bright
    return image


def _expect_left_half(mask: np.ndarray, width: int) -> None:
    """The predicted mask is 255 on the bright left half and 0 on the right, away from the edge."""
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    margin = max(2, width // SIZE + 2)  # the resize to 64 and back blurs the edge by a few pixels
    assert (mask[:, : width // 2 - margin] == 255).all()
    assert (mask[:, width // 2 + margin:] == 0).all()


def _config(tmp, **overrides) -> Config:
    return model_only_config(tmp, image_size=SIZE, mode="predict", batch_size=3, **overrides)


def _predict(config: Config) -> int:
    """--mode=predict as main.run calls it: with the device policy resolved from the flags."""
    return predict.run(config, runtime.resolve(config))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("predict") / "run"
    path.mkdir()
    _pointwise_model().save(str(path / "final_model.keras"))
    return path


# --- what gets predicted, and where ----------------------------------------------------------------


def test_plan_mirrors_the_tree_and_never_targets_ground_truth(tmp_path):
    data = tmp_path / "kaggle_3m"
    (data / "TCGA_CS_0001_20000101").mkdir(parents=True)
    (data / ".hidden").mkdir()
    for name in ("TCGA_CS_0001_20000101/TCGA_CS_0001_20000101_1.tif",
                 "TCGA_CS_0001_20000101/TCGA_CS_0001_20000101_1_mask.tif",
                 "TCGA_CS_0001_20000101/TCGA_CS_0001_20000101_2.tif", "loose.TIFF",
                 ".hidden/secret.tif", "notes.txt"):
        (data / name).write_bytes(b"")
    jobs, protected = predict.plan(data, tmp_path / "out")
    assert [(j.source.relative_to(data).as_posix(), j.target.relative_to(tmp_path / "out").as_posix())
            for j in jobs] == [
        ("TCGA_CS_0001_20000101/TCGA_CS_0001_20000101_1.tif", "TCGA_CS_0001_20000101/TCGA_CS_0001_20000101_1_mask.tif"),
        ("TCGA_CS_0001_20000101/TCGA_CS_0001_20000101_2.tif", "TCGA_CS_0001_20000101/TCGA_CS_0001_20000101_2_mask.tif"),
        ("loose.TIFF", "loose_mask.tif")]
    assert protected == []
    # In place: the slice with ground truth is skipped, the others are predicted next to it.
    jobs, protected = predict.plan(data, data)
    assert [j.source.name for j in protected] == ["TCGA_CS_0001_20000101_1.tif"]
    assert [j.source.name for j in jobs] == ["TCGA_CS_0001_20000101_2.tif", "loose.TIFF"]


def test_an_output_folder_inside_the_input_is_not_read_as_input(tmp_path):
    (tmp_path / "in" / "pred").mkdir(parents=True)
    (tmp_path / "in" / "a.tif").write_bytes(b"")
    (tmp_path / "in" / "pred" / "a_mask.tif").write_bytes(b"")  # an earlier run's result
    (tmp_path / "in" / "pred" / predict.RECORD_FILE).write_text('{"written": ["a_mask.tif"]}')
    (tmp_path / "in" / "pred" / "stray.tif").write_bytes(b"")
    jobs, protected = predict.plan(tmp_path / "in", tmp_path / "in" / "pred")
    assert [j.source.name for j in jobs] == ["a.tif"] and protected == []


def test_plan_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        predict.plan(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "only_masks").mkdir()
    (tmp_path / "only_masks" / "a_mask.tif").write_bytes(b"")
    with pytest.raises(DataError, match="no image .tif files"):
        predict.plan(tmp_path / "only_masks", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        predict.plan(tmp_path / "only_masks", tmp_path / "file")


def test_inputs_are_brought_to_uint8_rgb_or_refused():
    gray, notes = predict.to_rgb_uint8(np.full((5, 7), 9, np.uint8))
    assert gray.shape == (5, 7, 3) and notes == ("grayscale",) and (gray == 9).all()
    single, _ = predict.to_rgb_uint8(np.full((5, 7, 1), 9, np.uint8))
    assert single.shape == (5, 7, 3)
    wide = np.array([[0, 1000], [2000, 4000]], np.uint16)
    scaled, notes = predict.to_rgb_uint8(wide)
    assert scaled.dtype == np.uint8 and notes == ("grayscale", "uint16 rescaled")
    assert scaled[..., 0].tolist() == [[0, 64], [128, 255]]
    narrow, notes = predict.to_rgb_uint8(np.array([[0, 200]], np.uint16))
    assert narrow[..., 0].tolist() == [[0, 200]] and notes == ("grayscale",)
    with pytest.raises(predict.InputImageError, match="dtype float32"):
        predict.to_rgb_uint8(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(predict.InputImageError, match="shape"):
        predict.to_rgb_uint8(np.zeros((4, 4, 4), np.uint8))


# --- the mode, in process ---------------------------------------------------------------------------


def test_predict_writes_masks_of_each_input_size_and_names_bad_files(tmp_path, run_dir, caplog):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    slices = {"a.tif": _slice(64, 64), "sub/b.tif": _slice(100, 80), "c.tif": _slice(256, 256),
              "gray.tif": _slice(90, 90, channels=None), "deep.tif": _slice(70, 60, dtype=np.uint16, bright=3000)}
    for name, image in slices.items():
        tifffile.imwrite(src / name, image)
    (src / "broken.tif").write_bytes(b"II*\x00this is not a tiff")
    tifffile.imwrite(src / "rgba.tif", np.zeros((8, 8, 4), np.uint8))
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    code = _predict(_config(tmp_path, input=str(src), output=str(out), model_dir=str(run_dir)))
    messages = caplog.messages
    assert code == 1
    text = "\n".join(messages)
    for bad, reason in (("broken.tif", "unreadable"), ("rgba.tif", "shape")):
        assert any(str(src / bad) in m and reason in m for m in messages), text
    for name, image in slices.items():
        mask = tifffile.imread(out / name.replace(".tif", "_mask.tif"))
        assert mask.shape == image.shape[:2], name
        _expect_left_half(mask, image.shape[1])
    assert not (out / "broken_mask.tif").exists() and not (out / "rgba_mask.tif").exists()
    assert "grayscale" in text and "16-bit" in text


def test_tta_writes_the_masks_of_the_flip_averaged_probabilities(tmp_path):
    # A model that is not flip-symmetric, so that ignoring --tta would show.
    model = asymmetric_model(SIZE)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 80, 72, 3)).astype(np.uint8)
    # Centre its logits on these slices, so that about half of every mask is lesion.
    kernel, bias = model.layers[-1].get_weights()
    logits = model(tf.image.resize(images / 255.0, (SIZE, SIZE)), training=False).numpy()
    model.layers[-1].set_weights([kernel, bias - np.median(logits)])
    model_dir = tmp_path / "asymmetric"
    model_dir.mkdir()
    model.save(str(model_dir / "final_model.keras"))
    src = tmp_path / "in"
    src.mkdir()
    for i, image in enumerate(images):
        tifffile.imwrite(src / f"s{i}.tif", image)
    outputs = {}
    for tta in (False, True):
        out = tmp_path / f"out_tta{tta}"
        assert _predict(_config(tmp_path, input=str(src), output=str(out), model_dir=str(model_dir),
                                   tta=tta)) == 0
        outputs[tta] = np.stack([tifffile.imread(out / f"s{i}_mask.tif") for i in range(4)]) > 0
        want = Predictor(model, image_size=SIZE, tta=tta)(images, batch_size=4) > 0.5
        np.testing.assert_array_equal(outputs[tta], want)
    assert 0 < outputs[False].mean() < 1
    assert (outputs[False] != outputs[True]).mean() > 0.01


def test_predicting_in_place_never_touches_ground_truth(tmp_path, run_dir, caplog):
    folder = tmp_path / "kaggle_3m" / "TCGA_CS_0001_20000101"
    folder.mkdir(parents=True)
    truth = np.zeros((256, 256), np.uint8)
    truth[10:20, 10:20] = 255
    for n in (1, 2, 3):
        tifffile.imwrite(folder / f"TCGA_CS_0001_20000101_{n}.tif", _slice(256, 256))
    for n in (1, 2):
        tifffile.imwrite(folder / f"TCGA_CS_0001_20000101_{n}_mask.tif", truth)
    before = {n: (folder / f"TCGA_CS_0001_20000101_{n}_mask.tif").read_bytes() for n in (1, 2)}
    caplog.set_level(logging.INFO)
    root = str(tmp_path / "kaggle_3m")
    assert _predict(_config(tmp_path, input=root, output=root, model_dir=str(run_dir))) == 0
    messages = caplog.messages
    for n in (1, 2):
        assert (folder / f"TCGA_CS_0001_20000101_{n}_mask.tif").read_bytes() == before[n]
    _expect_left_half(tifffile.imread(folder / "TCGA_CS_0001_20000101_3_mask.tif"), 256)
    assert any("Skipping 2 image(s)" in m and "ground truth" in m for m in messages), messages
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]


# --- the user path: python -m engine.main --mode=predict -------------------------------------------


def test_predict_mode_subprocess_writes_good_files_and_fails_on_the_corrupt_one(tmp_path, run_dir):
    src = tmp_path / "slices"
    src.mkdir()
    for name in ("one.tif", "two.tif"):
        tifffile.imwrite(src / name, _slice(128, 128))
    good = (src / "one.tif").read_bytes()
    (src / "three.tif").write_bytes(good[: len(good) // 3])  # truncated
    out = tmp_path / "masks"
    config = _config(tmp_path, input=str(src), output=str(out), model_dir=str(run_dir))
    proc = run_engine(config_flags(config), timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert f"{src / 'three.tif'}:" in proc.stdout + proc.stderr
    assert "1 of 3 image(s) failed" in proc.stderr
    for name in ("one", "two"):
        _expect_left_half(tifffile.imread(out / f"{name}_mask.tif"), 128)
    assert not (out / "three_mask.tif").exists()


def test_predict_with_no_model_fails_cleanly(tmp_path):
    src = tmp_path / "slices"
    src.mkdir()
    tifffile.imwrite(src / "one.tif", _slice(64, 64))
    with pytest.raises(RunDirError, match="is not a brainseg run"):
        _predict(_config(tmp_path, input=str(src), output=str(tmp_path / "o"),
                            model_dir=str(tmp_path / "nothing")))
    assert not (tmp_path / "o").exists()
