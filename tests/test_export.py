"""--mode=export: the SavedModel loads in a fresh process and predicts what the engine predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from engine import export
from engine.config import Config
from engine.inference import Predictor
from engine.inference_spec import InferenceSpec
from engine.segmenter import Segmenter
from engine.rundir import RunDirError
from models import unet
from tests.helpers import config_flags, model_only_config, run_engine

SIZE = 64

# Runs in a fresh interpreter, outside the repository: only TensorFlow and the SavedModel.
LOAD_AND_PREDICT = """
import json, sys
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
spec = serve.structured_input_signature[1]["images"]
out = serve(images=tf.constant(np.load(sys.argv[2])))
np.save(sys.argv[3], out["probabilities"].numpy())
print(json.dumps({"input": [spec.shape.as_list(), spec.dtype.name],
                  "outputs": {k: [v.shape.as_list(), v.dtype.name]
                              for k, v in serve.structured_outputs.items()},
                  "has_engine": "engine" in sys.modules}))
"""


def _model() -> keras.Model:
    """A tiny U-Net with random weights and non-trivial BatchNorm statistics."""
    keras.utils.set_random_seed(7)
    model = unet.build_unet(image_size=SIZE, base_filters=4, depth=2)
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, beta, rng.normal(0, 0.1, mean.shape).astype(np.float32),
                               rng.uniform(0.5, 2.0, var.shape).astype(np.float32)])
    return model


def _segmenter(models, **spec) -> Segmenter:
    return Segmenter(models, InferenceSpec(**spec), image_size=SIZE, sources=["test"])


def _config(tmp, **overrides) -> Config:
    return model_only_config(tmp, image_size=SIZE, mode="export", batch_size=4, **overrides)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    config = _config(tmp)
    os.makedirs(config.run_dir)
    model = _model()
    model.save(os.path.join(config.run_dir, "final_model.keras"))
    return tmp, config, model


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    """Random slices with a bright blob, so the probabilities are not all alike."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 120, (n, 256, 256, 3)).astype(np.uint8)
    images[:, 90:170, 60:150, 1] = 230
    return images


@pytest.mark.slow
def test_saved_model_in_a_fresh_process_matches_the_engine(trained_run):
    tmp, config, model = trained_run
    proc = run_engine(config_flags(config), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    export_dir = os.path.join(config.run_dir, "saved_model")
    assert os.path.exists(os.path.join(export_dir, "saved_model.pb"))
    assert "reload check: max difference" in proc.stdout
    with open(os.path.join(export_dir, export.METADATA_FILE)) as f:
        assert json.load(f)["model_image_size"] == SIZE

    images = _images()
    np.save(tmp / "images.npy", images)
    fresh = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, export_dir, str(tmp / "images.npy"), str(tmp / "probs.npy")],
        cwd=str(tmp), capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert fresh.returncode == 0, fresh.stderr
    info = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert info["input"] == [[None, 256, 256, 3], "uint8"]
    assert info["outputs"] == {"probabilities": [[None, 256, 256, 1], "float32"]}
    assert not info["has_engine"]

    served = np.load(tmp / "probs.npy")[..., 0]
    engine = Predictor(model, image_size=SIZE)(images, batch_size=2)
    assert served.shape == engine.shape == (3, 256, 256)
    assert engine.std() > 1e-3  # a model that says something
    np.testing.assert_allclose(served, engine, atol=1e-5)


def test_tta_is_baked_into_the_export(trained_run, tmp_path):
    _, _, model = trained_run
    path = export.export_saved_model(_segmenter([model], tta=True), str(tmp_path / "tta"))
    assert export.check_export(path, _segmenter([model], tta=True)) < 1e-5
    assert export.check_export(path, _segmenter([model])) > 1e-4


def test_an_ensemble_with_standardised_2_5d_inputs_exports_as_one_graph(tmp_path):
    # Two members, each reading 5 channels (the slice and its neighbours' FLAIR), standardised
    # per volume: the graph must do what the engine does to the same volume.
    members = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        members.append(unet.build_unet(image_size=SIZE, base_filters=4, depth=2, in_channels=5))
    segmenter = _segmenter(members, normalize="volume", neighbours=1)
    path = export.export_saved_model(segmenter, str(tmp_path / "ensemble"))
    assert export.check_export(path, segmenter) < 1e-5
    # Each part counts: one member alone, or the raw slices, give other probabilities.
    assert export.check_export(path, _segmenter(members[:1], normalize="volume", neighbours=1)) > 1e-4
    with open(os.path.join(path, export.METADATA_FILE)) as f:
        meta = json.load(f)
    assert meta["members"] == 2 and "one volume" in meta["input"]["images"]


def test_export_replaces_a_saved_model_but_never_another_folder(trained_run, tmp_path):
    _, _, model = trained_run
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a SavedModel"):
        export.export_saved_model(_segmenter([model]), str(target))
    assert (target / "notes.txt").read_text() == "mine"
    path = tmp_path / "again"
    for _ in range(2):
        export.export_saved_model(_segmenter([model]), str(path))
    assert (path / "saved_model.pb").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "busy"]  # no temporaries left
