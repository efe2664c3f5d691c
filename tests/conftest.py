"""Shared pytest fixtures: hand-made Kaggle-layout trees and the real LGG subset."""

import os
import pathlib

import numpy as np
import pytest
import tifffile


def write_fake_lgg_slice(folder: pathlib.Path, patient: str, number: int, *, lesion: bool,
                         marker: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes one Kaggle-style image/mask pair. Pixel [0, 0] of the image is (number, marker, 7) so a
    test can check which file a decoded slice came from; a lesion is a 20x20 square of 255s."""
    image = np.full((256, 256, 3), 40, np.uint8)
    image[0, 0] = (number % 256, marker % 256, 7)
    mask = np.zeros((256, 256), np.uint8)
    if lesion:
        mask[100:120, 100:120] = 255
        image[100:120, 100:120, 1] = 200
    image_path = folder / f"{patient}_{number}.tif"
    mask_path = folder / f"{patient}_{number}_mask.tif"
    tifffile.imwrite(image_path, image)
    tifffile.imwrite(mask_path, mask)
    return image_path, mask_path


@pytest.fixture
def fake_lgg_tree(tmp_path):
    """Factory: make(patients={name: num_slices}, lesion_slices={name: {n, ...}}, layout="kaggle_3m")
    writes a tree under tmp_path and returns the folder holding the patient folders. Each patient gets
    marker = its index in sorted order, and by default slices 2..3 carry a lesion."""

    def make(patients=None, *, lesion_slices=None, layout="kaggle_3m", data_csv=True):
        patients = patients or {"TCGA_CS_0001_20000101": 3, "TCGA_DU_0002_20010101": 4,
                                "TCGA_HT_0003_20020101": 2}
        lesion_slices = lesion_slices if lesion_slices is not None else {p: {2, 3} for p in patients}
        root = tmp_path / layout if layout != "." else tmp_path
        for marker, (patient, count) in enumerate(sorted(patients.items())):
            folder = root / patient
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(1, count + 1):
                write_fake_lgg_slice(folder, patient, number, lesion=number in lesion_slices.get(patient, ()),
                                     marker=marker)
        if data_csv:
            rows = [p.rsplit("_", 1)[0] + ",1,2" for p in sorted(patients)]
            (root / "data.csv").write_text("Patient,RNASeqCluster,MethylationCluster\n" + "\n".join(rows) + "\n")
        return root

    return make


@pytest.fixture
def lgg_real_data_dir():
    """The real LGG subset's kaggle_3m folder from $LGG_DATA_DIR; skips the test when it is unset."""
    path = os.environ.get("LGG_DATA_DIR")
    if not path:
        pytest.skip("real LGG data not configured: set LGG_DATA_DIR=$(../shared/lgg-dev) to run this test")
    if not os.path.isdir(path):
        pytest.fail(f"LGG_DATA_DIR={path} is not a directory")
    return pathlib.Path(path)


# The files that take longest, longest first (by their time in a full run on 2 cores): with two xdist
# workers taking whole files in this order (--dist loadfile --no-loadscope-reorder), the short
# files fill in around the long ones, instead of one long file running alone at the end. The rest
# keep their order.
LONGEST_FIRST = ("test_multi_worker.py", "test_safety.py", "test_training_loop.py", "test_benchmark.py",
                 "test_resume.py", "test_precision.py", "test_real_quality.py", "test_run_folder_safety.py",
                 "test_refusals.py", "test_owned_files.py", "test_user_files.py", "test_nifti.py",
                 "test_checkpoint.py", "test_export.py", "test_recipe.py", "test_records.py",
                 "test_malloc.py", "test_policies.py", "test_onnx.py", "test_tensorboard.py",
                 "test_distribute.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
