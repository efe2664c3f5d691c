"""--export_format=onnx: ONNX Runtime serves what the SavedModel serves, and the export keeps its folder rules."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import sys

import keras
import numpy as np
import pytest

from engine import export, export_onnx
from engine.inference_spec import InferenceSpec
from engine.segmenter import Segmenter
from models import unet
from tests.helpers import config_flags, model_only_config, run_engine

SIZE = 64

needs_onnx = pytest.mark.skipif(
    bool(export_onnx.missing_packages()),
    reason=f"the extra 'onnx' is not installed (missing {', '.join(export_onnx.missing_packages())}): "
           "pip install -e \".[onnx]\"")


def _member(seed: int, channels: int = 3) -> keras.Model:
    """A tiny U-Net with random weights, BatchNorm statistics that are not the identity, and
    probabilities that vary."""
    keras.utils.set_random_seed(seed)
    model = unet.build_unet(image_size=SIZE, base_filters=4, depth=2, in_channels=channels)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, beta, rng.normal(0, 0.1, mean.shape).astype(np.float32),
                               rng.uniform(0.5, 2.0, var.shape).astype(np.float32)])
    # Random logits sit near 0 (probabilities near 0.5 everywhere); scaled up, they spread over
    # (0, 1), so that a difference of 1e-4 between two runtimes means something.
    logits = model.get_layer("logits")
    logits.set_weights([w * 30 for w in logits.get_weights()])
    return model


def _images(n: int = 5, seed: int = 0) -> np.ndarray:
    """A volume of random slices with a bright FLAIR blob, so the probabilities vary."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 120, (n, 256, 256, 3)).astype(np.uint8)
    images[:, 90:170, 60:150, 1] = 230
    return images


def _onnx_probabilities(export_dir, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(os.path.join(str(export_dir), export_onnx.MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": images})[0]


def _saved_model_probabilities(export_dir, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    serve = tf.saved_model.load(str(export_dir)).signatures[export.SIGNATURE]
    return serve(images=tf.constant(images))["probabilities"].numpy()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding a final model and a recorded inference: TTA, threshold 0.37."""
    tmp = tmp_path_factory.mktemp("onnx")
    config = model_only_config(tmp, image_size=SIZE, mode="export", batch_size=4, export_format="onnx")
    os.makedirs(config.run_dir)
    _member(7).save(os.path.join(config.run_dir, "final_model.keras"))
    spec = InferenceSpec(tta=True, threshold=0.37, min_component_voxels=20, chosen_on="a test")
    with open(os.path.join(config.run_dir, "inference.json"), "w") as f:
        json.dump(spec.to_json(), f)
    return tmp, config


@needs_onnx
@pytest.mark.slow
def test_onnx_export_serves_what_the_saved_model_serves(run):
    tmp, config = run
    proc = run_engine(config_flags(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    onnx_dir = os.path.join(config.run_dir, "onnx")
    assert sorted(os.listdir(onnx_dir)) == ["brainseg_export.json", "model.onnx"]
    assert "ONNX Runtime check in a fresh process: max difference" in proc.stdout
    with open(os.path.join(onnx_dir, export.METADATA_FILE)) as f:
        meta = json.load(f)
    # What ONNX leaves to the client travels beside it, as for the SavedModel.
    assert meta["format"] == "onnx" and meta["threshold"] == 0.37
    assert meta["inference"]["min_component_voxels"] == 20 and meta["inference"]["tta"] is True
    assert meta["check"]["max_difference"] <= export_onnx.TOLERANCE

    saved = run_engine(config_flags(config) + ["--export_format=saved_model"])
    assert saved.returncode == 0, saved.stdout + saved.stderr
    images = _images()
    served = _onnx_probabilities(onnx_dir, images)
    reference = _saved_model_probabilities(os.path.join(config.run_dir, "saved_model"), images)
    assert served.shape == reference.shape == (5, 256, 256, 1) and served.dtype == np.float32
    assert reference.std() > 0.01  # a model that says something
    np.testing.assert_allclose(served, reference, atol=1e-4)


@needs_onnx
def test_an_ensemble_with_tta_and_standardised_2_5d_inputs_is_one_onnx_graph(tmp_path):
    # Two members reading 5 channels (the slice and its neighbours' FLAIR), each volume
    # standardised, four flips averaged: ONNX Runtime must do all of it as the engine does.
    members = [_member(seed, channels=5) for seed in (1, 2)]
    spec = InferenceSpec(normalize="volume", neighbours=1, tta=True)
    segmenter = Segmenter(members, spec, image_size=SIZE, sources=["test"])
    path, difference = export_onnx.export_onnx(segmenter, str(tmp_path / "ensemble"))
    assert difference <= export_onnx.TOLERANCE
    images = _images(seed=1)
    images[:, :, :, 1] //= 3  # a dark FLAIR: standardisation scales it up
    served = _onnx_probabilities(path, images)[..., 0]
    engine = segmenter.probabilities(images, batch_size=len(images))
    np.testing.assert_allclose(served, engine, atol=1e-4)
    # Each part counts: one member alone, or no TTA, gives other probabilities.
    alone = Segmenter(members[:1], spec, image_size=SIZE, sources=["test"])
    assert np.abs(served - alone.probabilities(images, batch_size=len(images))).max() > 1e-3
    plain = Segmenter(members, InferenceSpec(normalize="volume", neighbours=1), image_size=SIZE, sources=["t"])
    assert np.abs(served - plain.probabilities(images, batch_size=len(images))).max() > 1e-4
    with open(os.path.join(path, export.METADATA_FILE)) as f:
        assert json.load(f)["members"] == 2


def _snapshot(folder) -> dict:
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


@needs_onnx
def test_a_folder_brainseg_did_not_export_is_refused_and_left_alone(run, tmp_path):
    _, config = run
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.onnx").write_bytes(b"someone else's model")
    before = _snapshot(theirs)
    proc = run_engine(config_flags(config) + [f"--export_dir={theirs}"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "brainseg_export.json" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(theirs) == before
    assert sorted(os.listdir(tmp_path)) == ["theirs"]  # no temporaries beside it


@needs_onnx
def test_an_export_that_fails_its_check_leaves_the_previous_one(run, tmp_path, monkeypatch):
    _, config = run
    target = tmp_path / "export"
    flags = config_flags(config) + [f"--export_dir={target}"]
    assert run_engine(flags).returncode == 0
    before = _snapshot(target)
    monkeypatch.setattr(export_onnx, "TOLERANCE", -1.0)  # no difference passes
    proc = run_engine(flags)
    assert proc.returncode == 2
    assert "not trustworthy and was not written" in proc.stderr
    assert _snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["export"]


@needs_onnx
def test_a_full_disk_is_one_line_and_keeps_the_previous_export(run, tmp_path, monkeypatch):
    import onnx

    _, config = run
    target = tmp_path / "export"
    flags = config_flags(config) + [f"--export_dir={target}"]
    assert run_engine(flags).returncode == 0
    before = _snapshot(target)

    def full(proto, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(onnx, "save", full)
    proc = run_engine(flags)
    assert proc.returncode == 1
    assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_without_the_onnx_packages_the_export_says_what_to_install(run, tmp_path, monkeypatch):
    _, config = run
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if it were not installed
    assert importlib.util.find_spec("tf2onnx") is None
    proc = run_engine(config_flags(config) + [f"--export_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2
    assert "--export_format: onnx needs the Python packages tf2onnx" in proc.stderr
    assert 'pip install -e ".[onnx]"' in proc.stderr
    assert not (tmp_path / "out").exists()


def test_onnx_is_exported_in_float32_only(tmp_path):
    proc = run_engine(["--mode=export", "--export_format=onnx", "--precision=mixed_bfloat16",
                       f"--model_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2
    assert "--precision: --export_format=onnx exports in float32" in proc.stderr
    assert not (tmp_path / "out").exists()
