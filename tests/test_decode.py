"""Tests for data.decode: validation of bad TIFFs (through dataset.load) and the disk cache."""

import os
import pathlib

import numpy as np
import pytest
import tifffile

from data import dataset as dataset_lib
from data import decode as decode_lib
from data import lgg
from data.lgg import DataError

CS = "TCGA_CS_0001_20000101"


def _image(root, n=1, patient=CS) -> pathlib.Path:
    return root / patient / f"{patient}_{n}.tif"


def _mask(root, n=1, patient=CS) -> pathlib.Path:
    return root / patient / f"{patient}_{n}_mask.tif"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _load_error(root) -> str:
    """Loads root expecting a DataError (and nothing else, e.g. no tifffile exception); returns its text."""
    with pytest.raises(Exception) as e:
        dataset_lib.load(root)
    assert type(e.value) is DataError, f"{type(e.value).__name__} escaped: {e.value}"
    assert e.value.__cause__ is None and e.value.__context__ is None
    return str(e.value)


BAD_FILES = {
    # name: (which file, how to break it, words the reason must contain)
    "truncated image": ("image", _truncate, "unreadable or truncated TIFF"),
    "not a tiff": ("image", lambda p: p.write_bytes(b"hello, not a TIFF"), "unreadable or truncated TIFF"),
    "empty mask": ("mask", lambda p: p.write_bytes(b""), "unreadable or truncated TIFF"),
    "truncated mask": ("mask", _truncate, "unreadable or truncated TIFF"),
    "small image": ("image", lambda p: tifffile.imwrite(p, np.zeros((128, 128, 3), np.uint8)),
                    "wrong image shape (128, 128, 3), expected (256, 256, 3)"),
    "uint16 image": ("image", lambda p: tifffile.imwrite(p, np.zeros((256, 256, 3), np.uint16)),
                     "wrong image dtype uint16, expected uint8"),
    "grey image": ("image", lambda p: tifffile.imwrite(p, np.zeros((256, 256), np.uint8)),
                   "image is not 3-channel: shape (256, 256)"),
    "rgba image": ("image", lambda p: tifffile.imwrite(p, np.zeros((256, 256, 4), np.uint8)),
                   "image is not 3-channel: shape (256, 256, 4)"),
    "rgb mask": ("mask", lambda p: tifffile.imwrite(p, np.zeros((256, 256, 3), np.uint8)),
                 "wrong mask shape (256, 256, 3), expected (256, 256)"),
    "float mask": ("mask", lambda p: tifffile.imwrite(p, np.zeros((256, 256), np.float32)),
                   "wrong mask dtype float32, expected uint8"),
    "grey mask": ("mask", lambda p: tifffile.imwrite(p, np.arange(65536, dtype=np.uint8).reshape(256, 256)),
                  "mask values {0, 1, 2, 3, 4, 5, ...} are outside {0, 255} (or {0, 1})"),
    "mixed mask": ("mask", lambda p: tifffile.imwrite(p, np.array([0, 1, 255] * 21846)[:65536]
                                                      .astype(np.uint8).reshape(256, 256)),
                   "mask values {0, 1, 255} are outside {0, 255} (or {0, 1})"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_named_with_its_reason(fake_lgg_tree, case):
    which, damage, reason = BAD_FILES[case]
    root = fake_lgg_tree()
    path = _image(root, 2) if which == "image" else _mask(root, 2)
    damage(path)
    msg = _load_error(root)
    assert f"{path}: " in msg
    assert reason in msg
    assert "1 problem(s)" in msg


def test_all_bad_files_are_listed_not_only_the_first(fake_lgg_tree):
    root = fake_lgg_tree()
    bad = [_image(root, 1), _mask(root, 3), _image(root, 2, "TCGA_HT_0003_20020101")]
    for path in bad:
        _truncate(path)
    _mask(root, 4, "TCGA_DU_0002_20010101").unlink()
    msg = _load_error(root)
    assert "4 problem(s)" in msg
    for path in bad + [_image(root, 4, "TCGA_DU_0002_20010101")]:
        assert str(path) in msg


def test_masks_in_0_1_are_accepted_and_0_255_become_0_1(fake_lgg_tree):
    root = fake_lgg_tree({CS: 2}, lesion_slices={CS: {1}})
    ones = np.zeros((256, 256), np.uint8)
    ones[:5, :7] = 1
    tifffile.imwrite(_mask(root, 2), ones)
    ds = dataset_lib.load(root)
    assert ds.masks[0].sum() == 400  # 20x20 square of 255s
    assert ds.masks[1].sum() == 35
    assert ds.masks.max() == 1


def test_decode_keeps_good_slices_in_order_and_reports_bad_ones(fake_lgg_tree):
    root = fake_lgg_tree()
    records, _ = lgg.scan(root)
    _truncate(_image(root, 2))
    _truncate(_mask(root, 2))
    decoded = decode_lib.decode(records, cache_dir=None, workers=3)
    assert [str(p.path) for p in decoded.problems] == [str(_image(root, 2)), str(_mask(root, 2))]
    assert list(decoded.records) == [r for r in records if r.image_path != str(_image(root, 2))]
    assert decoded.images.shape == (8, 256, 256, 3)
    assert decoded.images[:, 0, 0, 0].tolist() == [r.slice_number for r in decoded.records]
    assert decoded.from_cache is False


def test_decode_is_the_same_with_one_or_many_workers(fake_lgg_tree):
    records, _ = lgg.scan(fake_lgg_tree())
    one = decode_lib.decode(records, cache_dir=None, workers=1)
    many = decode_lib.decode(records, cache_dir=None, workers=8)
    np.testing.assert_array_equal(one.images, many.images)
    np.testing.assert_array_equal(one.masks, many.masks)


def _cache_files(cache_dir):
    return sorted(pathlib.Path(cache_dir).iterdir())


def test_cache_is_reused_on_second_load(fake_lgg_tree, tmp_path):
    records, _ = lgg.scan(fake_lgg_tree())
    cache = tmp_path / "cache"
    first = decode_lib.decode(records, cache_dir=str(cache))
    second = decode_lib.decode(records, cache_dir=str(cache))
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.records == first.records
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.masks, first.masks)
    files = _cache_files(cache)
    assert len(files) == 1 and files[0].suffix == ".bin"  # written atomically: no temp file left


def test_cache_keeps_problems_of_bad_slices(fake_lgg_tree, tmp_path):
    root = fake_lgg_tree()
    _truncate(_mask(root, 3))
    records, _ = lgg.scan(root)
    first = decode_lib.decode(records, cache_dir=str(tmp_path / "cache"))
    second = decode_lib.decode(records, cache_dir=str(tmp_path / "cache"))
    assert second.from_cache
    assert second.problems == first.problems and len(first.problems) == 1
    assert second.records == first.records and len(second.records) == 8


def test_cache_is_rebuilt_when_a_file_changes(fake_lgg_tree, tmp_path):
    root = fake_lgg_tree()
    records, _ = lgg.scan(root)
    cache = str(tmp_path / "cache")
    decode_lib.decode(records, cache_dir=cache)
    image = tifffile.imread(_image(root, 2))
    image[0, 0, 2] = 99
    tifffile.imwrite(_image(root, 2), image)
    stat = os.stat(_image(root, 2))
    os.utime(_image(root, 2), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    rebuilt = decode_lib.decode(records, cache_dir=cache)
    assert rebuilt.from_cache is False
    assert rebuilt.images[1, 0, 0, 2] == 99
    assert decode_lib.decode(records, cache_dir=cache).from_cache  # the rebuilt cache is used next time
    assert len(_cache_files(cache)) == 1  # the stale cache was replaced, not left beside the new one


def _damage_data(path):
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0xFF  # one flipped byte in the masks
    path.write_bytes(bytes(data))


def _damage_header(path):
    data = bytearray(path.read_bytes())
    data[30] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    pytest.param(_truncate, id="truncated"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:10]), id="truncated-preamble"),
    pytest.param(_damage_data, id="flipped-data-byte"),
    pytest.param(_damage_header, id="flipped-header-byte"),
    pytest.param(lambda p: p.write_bytes(b"\0" * 4096), id="garbage"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes() + b"extra"), id="too-long"),
])
def test_damaged_cache_is_rebuilt_never_used(fake_lgg_tree, tmp_path, damage, caplog):
    records, _ = lgg.scan(fake_lgg_tree())
    cache = str(tmp_path / "cache")
    fresh = decode_lib.decode(records, cache_dir=cache)
    (path,) = _cache_files(cache)
    damage(path)
    with caplog.at_level("WARNING", logger="data.decode"):
        rebuilt = decode_lib.decode(records, cache_dir=cache)
    assert rebuilt.from_cache is False
    assert f"decode cache {path} is unusable" in caplog.text
    np.testing.assert_array_equal(rebuilt.images, fresh.images)
    np.testing.assert_array_equal(rebuilt.masks, fresh.masks)
    again = decode_lib.decode(records, cache_dir=cache)
    assert again.from_cache is True
    np.testing.assert_array_equal(again.masks, fresh.masks)


def test_unwritable_cache_dir_falls_back_to_no_cache(fake_lgg_tree, tmp_path):
    records, _ = lgg.scan(fake_lgg_tree())
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    decoded = decode_lib.decode(records, cache_dir=str(blocker / "cache"))
    assert len(decoded.records) == 9 and decoded.from_cache is False


def test_load_reports_from_cache_through_dataset(fake_lgg_tree, tmp_path):
    root = fake_lgg_tree()
    cache = str(tmp_path / "cache")
    first = dataset_lib.load_with_problems(root, cache_dir=cache)
    second = dataset_lib.load_with_problems(root, cache_dir=cache)
    assert (first.from_cache, second.from_cache) == (False, True)
    np.testing.assert_array_equal(first.dataset.images, second.dataset.images)
