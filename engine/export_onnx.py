"""`--export_format=onnx`: the SavedModel's serving graph as model.onnx, checked under ONNX Runtime."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np

from engine import export, rundir
from engine import segmenter as segmenter_lib
from engine.config import Config, ConfigError
from engine.runtime import Runtime
from engine.segmenter import Segmenter
from engine.rundir import RunDirError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# The ONNX operator set: 17 is served by every ONNX Runtime since 1.14 (2023) and covers the
# graph (Resize, CumSum, Unique, ScatterND); a newer opset would only narrow who can serve it.
OPSET = 17
PACKAGES = ("tf2onnx", "onnx", "onnxruntime")  # pyproject's extra "onnx"
# Largest difference between ONNX Runtime and the engine tolerated by the self-check.
TOLERANCE = 1e-4
# The batch dimension's name in the model's signature.
SLICES = "slices"

# Runs in a fresh interpreter, as a client would serve the model: numpy and ONNX Runtime only.
SERVE = """
import json, sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
np.save(sys.argv[3], session.run(None, {session.get_inputs()[0].name: np.load(sys.argv[2])})[0])
print(json.dumps({"onnxruntime": ort.__version__,
                  "inputs": [[a.name, a.type, a.shape] for a in session.get_inputs()],
                  "outputs": [[a.name, a.type, a.shape] for a in session.get_outputs()]}))
"""


def missing_packages() -> list[str]:
    """The packages of the extra "onnx" that this Python cannot import."""
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def contract() -> dict:
    """The signature ONNX Runtime must report for model.onnx: the SavedModel's, names and types."""
    size = export.SERVING_SIZE
    return {"inputs": [[export.INPUT_NAME, "tensor(uint8)", [SLICES, size, size, 3]]],
            "outputs": [[export.OUTPUT_NAME, "tensor(float)", [SLICES, size, size, 1]]]}


def convert(segmenter: Segmenter, path: str) -> None:
    """Writes the SavedModel's serving function (engine.export.ServingModule) as ONNX to `path`.

    Raises:
      RunDirError: tf2onnx could not convert the graph (the message names what it said).
    """
    import onnx
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its per-pass INFO lines say nothing to a user
    module = export.ServingModule(segmenter)
    try:
        proto, _ = tf2onnx.convert.from_function(module.serve, input_signature=module.serve.input_signature,
                                                 opset=OPSET)
    except Exception as e:  # noqa: BLE001 - any converter failure is one line, not its internals
        raise RunDirError(f"tf2onnx could not convert the serving graph to ONNX ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else ''}); the SavedModel export "
                          "(--export_format=saved_model) still works") from None
    # tf2onnx leaves the batch unnamed and the output's height and width unknown (the graph
    # resizes to the input's own shape), and ONNX Runtime once read [1, 256, 256, 1, 1] for it in a
    # loaded test run;
    # the SavedModel's signature says [slices, 256, 256, 1]. `check` then serves it and
    # compares the shape and values that come out.
    signature = contract()
    for value, (_, _, shape) in ((proto.graph.input[0], signature["inputs"][0]),
                                 (proto.graph.output[0], signature["outputs"][0])):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            if isinstance(size, str):
                dims.add().dim_param = size
            else:
                dims.add().dim_value = size
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def check(path: str, segmenter: Segmenter, *, seed: int = 0) -> tuple[float, str]:
    """Serves model.onnx with ONNX Runtime in a fresh process and compares it with the engine.

    Returns:
      (the largest difference from the engine on a random 3-slice volume, ONNX Runtime's version).

    Raises:
      RunDirError: ONNX Runtime failed to load or run the model, or its signature is not the
        SavedModel's.
    """
    size = export.SERVING_SIZE
    images = np.random.default_rng(seed).integers(0, 256, (3, size, size, 3), np.uint8)
    with tempfile.TemporaryDirectory(prefix="brainseg-onnx-check-") as tmp:
        np.save(os.path.join(tmp, "images.npy"), images)
        proc = subprocess.run([sys.executable, "-c", SERVE, os.path.abspath(path), "images.npy", "out.npy"],
                              cwd=tmp, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise RunDirError(f"{path}: ONNX Runtime could not serve the exported model ({last[:300]})")
        served = np.load(os.path.join(tmp, "out.npy"))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if {k: info[k] for k in ("inputs", "outputs")} != contract():
        raise RunDirError(f"{path}: ONNX Runtime reads the signature {info['inputs']} -> {info['outputs']}, "
                          f"not {contract()}")
    if served.shape != (len(images), size, size, 1):
        raise RunDirError(f"{path}: ONNX Runtime returned probabilities of shape {list(served.shape)} for "
                          f"{len(images)} slices, not {[len(images), size, size, 1]}")
    engine = segmenter.probabilities(images, batch_size=len(images))
    return float(np.abs(served[..., 0] - engine).max()), info["onnxruntime"]


def export_onnx(segmenter: Segmenter, export_dir: str, *, metadata: dict | None = None) -> tuple[str, float]:
    """Writes model.onnx and brainseg_export.json to export_dir, replacing a previous export of
    brainseg's in one rename once ONNX Runtime, in a fresh process, agrees with the engine.

    Args:
      segmenter: the run's inference (its members, model inputs and TTA go into the graph; the
        threshold and post-processing into brainseg_export.json).
      export_dir: destination folder.
      metadata: extra facts written to brainseg_export.json.

    Returns:
      (export_dir, the self-check's largest difference from the engine).

    Raises:
      RunDirError: export_dir is a file, under one, or holds something that is not brainseg's
        export; the graph did not convert; or ONNX Runtime disagrees with the engine by more
        than TOLERANCE. Nothing is changed.
    """
    checked = {}

    def fill(tmp: str) -> None:
        path = os.path.join(tmp, MODEL_FILE)
        convert(segmenter, path)
        difference, runtime = check(path, segmenter)
        if not difference <= TOLERANCE:
            raise RunDirError(f"{export_dir}: ONNX Runtime differs from the engine by {difference:.3g} "
                              f"(> {TOLERANCE}); the export is not trustworthy and was not written")
        checked["difference"] = difference
        versions = {name: importlib.metadata.version(name) for name in PACKAGES}
        with open(os.path.join(tmp, export.METADATA_FILE), "w") as f:
            json.dump({"format": "onnx", "file": MODEL_FILE, "opset": OPSET, **export.marker(segmenter),
                       "packages": versions, "check": {"max_difference": difference, "onnxruntime": runtime},
                       **(metadata or {})}, f, indent=2, sort_keys=True)

    export.write_export(export_dir, fill)
    return os.path.abspath(export_dir), checked["difference"]


def run(config: Config, runtime: Runtime) -> str:
    """Exports the run's model (or --checkpoint) as ONNX to --export_dir, default <run_dir>/onnx.

    A client needs only ONNX Runtime:

        session = onnxruntime.InferenceSession("logs/demo/onnx/model.onnx")
        probs = session.run(["probabilities"], {"images": uint8_volume})[0]  # float32 [N,256,256,1]
        masks = probs[..., 0] > threshold  # brainseg_export.json's threshold, then its post-processing

    Returns:
      The export directory.

    Raises:
      ConfigError: the extra "onnx" is not installed.
      CheckpointError: no model where the flags point.
      RunDirError: as export_onnx; nothing is changed.
    """
    missing = missing_packages()
    if missing:
        raise ConfigError("export_format", f"onnx needs the Python packages {', '.join(missing)}, which are "
                          "not installed: pip install -e \".[onnx]\"")
    export_dir = os.path.abspath(config.export_dir or os.path.join(config.run_dir, rundir.ONNX_EXPORT))
    export.check_target(export_dir)  # before the model loads: a refusal does no work
    segmenter = segmenter_lib.segmenter(config, precision=runtime.precision)
    _, difference = export_onnx(segmenter, export_dir,
                                metadata={"source": segmenter.sources, "brainseg": rundir.PROJECT_VERSION})
    size = export.SERVING_SIZE
    log.info(f"Exported {', '.join(segmenter.sources)} to {os.path.join(export_dir, MODEL_FILE)} (ONNX "
             f"opset {OPSET}): it takes {export.INPUT_NAME}: uint8 [{SLICES}, {size}, {size}, 3] and returns "
             f"{export.OUTPUT_NAME}: float32 [{SLICES}, {size}, {size}, 1] ({segmenter.describe()}); "
             f"threshold and post-processing are in {export.METADATA_FILE}; ONNX Runtime check in a "
             f"fresh process: max difference {difference:.2g}")
    return export_dir
