"""Finds a Kaggle LGG (kaggle_3m) tree on disk and pairs each slice image with its mask."""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import re

# A patient folder, e.g. TCGA_CS_4941_19960909: institution, patient id, acquisition date. In any
# case: a tree copied through a case-folding tool or file system reads tcga_cs_4941_19960909.
PATIENT_DIR_RE = re.compile(r"^TCGA_([A-Za-z0-9]+)_([A-Za-z0-9]+)_(\d{8})$", re.IGNORECASE)
# Folders that may hold the patient folders, relative to --data_dir, in the order we look.
LAYOUTS = ("kaggle_3m", "lgg-mri-segmentation/kaggle_3m", ".")
EXPECTED_LAYOUT = (
    "expected patient folders like TCGA_CS_4941_19960909/ holding TCGA_CS_4941_19960909_<n>.tif "
    "and TCGA_CS_4941_19960909_<n>_mask.tif, either in DIR/kaggle_3m, "
    "DIR/lgg-mri-segmentation/kaggle_3m, or directly in DIR"
)
TIFF_SUFFIXES = (".tif", ".tiff")


class DataError(Exception):
    """A user-facing data problem. Its message names the file(s) and what is wrong."""


@dataclasses.dataclass(frozen=True)
class SliceRecord:
    """One axial slice: an image file and its mask file."""

    patient: str  # folder name, e.g. "TCGA_CS_4941_19960909"
    institution: str  # "CS"
    slice_number: int
    image_path: str
    mask_path: str


@dataclasses.dataclass(frozen=True)
class Problem:
    """A bad file (or folder) and what is wrong with it."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def format_problems(problems) -> str:
    """Formats problems one per line, indented, for error messages and summaries."""
    return "\n".join(f"  {p}" for p in problems)


def _patient_dirs_in(folder: pathlib.Path) -> list[pathlib.Path]:
    try:
        children = list(folder.iterdir())
    except OSError:
        return []
    return sorted(p for p in children if PATIENT_DIR_RE.match(p.name) and p.is_dir())


def find_dataset_root(data_dir) -> pathlib.Path:
    """Returns the folder that directly holds the patient folders.

    Looks in DIR/kaggle_3m, then DIR/lgg-mri-segmentation/kaggle_3m, then DIR itself (so DIR may be
    kaggle_3m). The first that holds patient folders wins: the Kaggle zip ships both of the first two
    copies, and merging them would count every patient twice.

    Args:
      data_dir: the --data_dir folder.

    Returns:
      The folder holding TCGA_* patient folders (and usually data.csv).

    Raises:
      DataError: data_dir does not exist or no patient folders were found; the message says where it
        looked and which layout it expects.
    """
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data directory does not exist or is not a directory; {EXPECTED_LAYOUT}")
    looked = []
    for layout in LAYOUTS:
        candidate = (root / layout) if layout != "." else root
        looked.append(str(candidate))
        if _patient_dirs_in(candidate):
            return candidate
    raise DataError(
        f"{root}: no patients found; looked in {', '.join(looked)}; {EXPECTED_LAYOUT}"
    )


def find_patient_dirs(data_dir) -> list[pathlib.Path]:
    """Returns the patient folders under data_dir, sorted by name.

    Args:
      data_dir: the --data_dir folder, in any of the three supported layouts.

    Returns:
      Sorted paths of the TCGA_<inst>_<pid>_<date> folders.

    Raises:
      DataError: no patient folders were found (the message says where it looked and what it expects).
    """
    return _patient_dirs_in(find_dataset_root(data_dir))


def _scan_patient(pdir: pathlib.Path) -> tuple[list[SliceRecord], list[Problem]]:
    institution = PATIENT_DIR_RE.match(pdir.name).group(1).upper()
    # The slices may keep the upper-case names when only the folder was renamed, or not.
    slice_re = re.compile(r"^" + re.escape(pdir.name) + r"_(\d+)(_mask)?$", re.IGNORECASE)
    images: dict[int, pathlib.Path] = {}
    masks: dict[int, pathlib.Path] = {}
    problems: list[Problem] = []
    try:
        files = sorted(pdir.iterdir())
    except OSError as e:
        return [], [Problem(str(pdir), f"cannot list folder ({e.strerror or e})")]
    for f in files:
        if f.suffix.lower() not in TIFF_SUFFIXES or f.name.startswith("."):
            continue  # notes, Thumbs.db, macOS "._*" resource forks from unzipping: not slices
        m = slice_re.match(f.stem)
        if not m:
            problems.append(Problem(str(f), f"unexpected file name; expected {pdir.name}_<n>.tif or "
                                            f"{pdir.name}_<n>_mask.tif"))
            continue
        number, table = int(m.group(1)), (masks if m.group(2) else images)
        if number in table:
            problems.append(Problem(str(f), f"duplicate slice number {number} (also {table[number].name})"))
            continue
        table[number] = f
    records = []
    for number in sorted(images.keys() | masks.keys()):
        image, mask = images.get(number), masks.get(number)
        if mask is None:
            problems.append(Problem(str(image), f"image has no mask (expected {pdir.name}_{number}_mask.tif)"))
        elif image is None:
            problems.append(Problem(str(mask), f"mask has no image (expected {pdir.name}_{number}.tif)"))
        else:
            records.append(SliceRecord(pdir.name, institution, number, str(image), str(mask)))
    if not images and not masks and not problems:
        problems.append(Problem(str(pdir), "patient folder holds no slices"))
    return records, problems


def scan(data_dir) -> tuple[list[SliceRecord], list[Problem]]:
    """Pairs every slice image with its mask, without reading the files.

    Args:
      data_dir: the --data_dir folder, in any of the three supported layouts.

    Returns:
      (records, problems): records sorted by patient then numerically by slice number (10 after 9);
      problems for images without a mask, masks without an image, badly named .tif files, duplicate
      slice numbers and empty patient folders.

    Raises:
      DataError: no patient folders were found.
    """
    records, problems, seen = [], [], {}
    for pdir in find_patient_dirs(data_dir):
        first = seen.setdefault(pdir.name.upper(), pdir)
        if first is not pdir:  # one patient in two folders would sit in two splits at once
            problems.append(Problem(str(pdir), f"the same patient as {first.name} (the folder names "
                                               "differ only in case); keep one of them"))
            continue
        r, p = _scan_patient(pdir)
        records += r
        problems += p
    return records, problems


def read_clinical_table(dataset_root) -> dict[str, dict[str, str]] | None:
    """Reads data.csv's rows by patient id (e.g. "TCGA_CS_4941"), leniently.

    data.csv is optional and only reported on, so this never raises: the separator is sniffed (files
    re-saved by spreadsheet software often use ';'), and a missing or unreadable file gives None.

    Args:
      dataset_root: the folder holding the patient folders (see find_dataset_root).

    Returns:
      {patient id: {column: value}} for the rows whose first column is a TCGA id, or None if
      data.csv is missing or unreadable.
    """
    path = pathlib.Path(dataset_root) / "data.csv"
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError:
        return None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = list(csv.reader(text.splitlines(), dialect))
    except csv.Error:
        return None
    if not rows:
        return {}
    header = [h.strip() for h in rows[0]]
    return {row[0].strip(): {h: v.strip() for h, v in zip(header[1:], row[1:])}
            for row in rows[1:] if row and row[0].strip().startswith("TCGA_")}


def read_clinical_patients(dataset_root) -> set[str] | None:
    """The patient ids of data.csv's rows (see read_clinical_table), or None without a data.csv."""
    table = read_clinical_table(dataset_root)
    return None if table is None else set(table)


def clinical_id(patient: str) -> str:
    """Maps a folder name (TCGA_CS_4941_19960909) to its data.csv id (TCGA_CS_4941)."""
    return patient.rsplit("_", 1)[0].upper()
