"""TensorBoard: a tiny real run's event files read back, then served by a real `tensorboard`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from engine import runtime, train
from engine.summaries import GREEN, RED
from tests.helpers import read_history, tiny_config

SCALARS = ("train/loss", "train/dice", "train/iou", "train/learning_rate", "train/loss_scale",
           "train/steps_per_sec", "train/images_per_sec", "val/loss", "val/dice", "val/iou",
           "hparams/val_dice")
EPOCHS, LOG_EVERY, OVERLAYS = 2, 2, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny training run shared by every test here."""
    config = tiny_config(tmp_path_factory.mktemp("tensorboard") / "run", epochs=EPOCHS,
                         log_every=LOG_EVERY, num_overlays=OVERLAYS)
    rt = runtime.resolve(config)
    train.run(config, rt)
    return config


@pytest.fixture(scope="module")
def events(run):
    # 0 keeps every event: the default reservoir keeps only a sample of images and tensors.
    acc = event_accumulator.EventAccumulator(run.run_dir, size_guidance={
        event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def _plugin(acc, tag: str) -> str:
    return acc.SummaryMetadata(tag).plugin_data.plugin_name


def test_scalar_tags_are_present_and_finite(run, events):
    tags = set(events.Tags()["tensors"])
    missing = set(SCALARS) - tags
    assert not missing, f"missing tags {missing}; have {sorted(tags)}"
    for tag in SCALARS:
        assert _plugin(events, tag) == "scalars", tag
        values = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
        assert values and np.isfinite(values).all(), (tag, values)
    history = read_history(run.run_dir)
    steps_per_epoch = history[0]["step"]
    train_steps = [e.step for e in events.Tensors("train/loss")]
    assert train_steps == list(range(LOG_EVERY, EPOCHS * steps_per_epoch + 1, LOG_EVERY))
    # val/ scalars once per epoch, at the epoch's last step, equal to history.jsonl.
    val = events.Tensors("val/dice")
    assert [e.step for e in val] == [h["step"] for h in history]
    assert [float(tf.make_ndarray(e.tensor_proto)) for e in val] == pytest.approx(
        [h["val_dice"] for h in history], abs=1e-6)
    assert float(tf.make_ndarray(events.Tensors("train/loss_scale")[-1].tensor_proto)) == 1.0


def test_config_text_and_hparams_are_recorded(run, events):
    tags = set(events.Tags()["tensors"])
    assert _plugin(events, "config") == "text"
    text = tf.make_ndarray(events.Tensors("config")[0].tensor_proto).item().decode()
    assert json.loads(text.strip().strip("`").strip())["image_size"] == run.image_size
    assert "_hparams_/session_start_info" in tags
    assert _plugin(events, "_hparams_/session_start_info") == "hparams"


def _overlays(acc) -> list[np.ndarray]:
    """Each overlay event's images, decoded: the tensor holds width, height, then the PNGs."""
    out = []
    for e in acc.Tensors("val/overlay"):
        strings = e.tensor_proto.string_val
        width, height = int(strings[0]), int(strings[1])
        images = np.stack([tf.io.decode_png(s).numpy() for s in strings[2:]])
        assert images.shape[1:3] == (height, width)
        out.append(images)
    return out


def test_overlay_images_have_the_right_shape_and_the_same_slices_each_epoch(run, events):
    assert _plugin(events, "val/overlay") == "images"
    overlays = _overlays(events)
    assert len(overlays) == EPOCHS
    for images in overlays:
        assert images.shape == (OVERLAYS, run.image_size, run.image_size, 3)
    first, last = overlays[0], overlays[-1]
    green = (first == GREEN).all(-1)
    assert green.any(), "no ground-truth outline: the overlays hold no lesion-positive slice"
    assert (~green.reshape(OVERLAYS, -1).any(1)).any(), "no empty slice among the overlays"
    # Same slices: every ground-truth pixel of the first epoch is outlined again in the last,
    # in green, or in red where the prediction's outline is drawn over it.
    again = (last == GREEN).all(-1) | (last == RED).all(-1)
    assert again[green].all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(opener, url: str) -> bytes:
    with opener.open(url, timeout=10) as response:
        return response.read()


@pytest.mark.slow
def test_tensorboard_serves_the_scalars_and_an_overlay_image(run, tmp_path):
    port = _free_port()
    binary = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    log = open(tmp_path / "tensorboard.log", "w+")  # a file, not a pipe: a full pipe would stall it
    server = subprocess.Popen(
        [binary, "--logdir", run.run_dir, "--host", "127.0.0.1", "--port", str(port),
         "--samples_per_plugin", "images=100"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            assert server.poll() is None, f"tensorboard exited: {(tmp_path / 'tensorboard.log').read_text()}"
            try:
                tags = json.loads(_get(opener, f"{base}/data/plugin/scalars/tags"))
                if "train/loss" in tags.get(".", {}):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        assert {"train/loss", "train/dice", "val/dice", "val/loss"} <= set(tags.get(".", {})), tags
        image_tags = json.loads(_get(opener, f"{base}/data/plugin/images/tags"))
        assert image_tags["."]["val/overlay"]["samples"] == OVERLAYS
        listing = json.loads(_get(opener, f"{base}/data/plugin/images/images?"
                                  + urllib.parse.urlencode({"run": ".", "tag": "val/overlay",
                                                            "sample": OVERLAYS - 1})))
        assert len(listing) == EPOCHS
        png = _get(opener, f"{base}/data/plugin/images/individualImage?{listing[-1]['query']}")
        image = tf.io.decode_png(png).numpy()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and image.shape == (run.image_size, run.image_size, 3)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
