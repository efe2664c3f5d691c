"""Synthetic LGG phantoms written in the exact Kaggle kaggle_3m layout."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import multiprocessing
import os
import pathlib
import shutil
import sys
import time

import numpy as np

# The one atomic write (data/atomic.py imports nothing of the project).
from data import atomic
import threadpoolctl
import tifffile

SIZE = 256

log = logging.getLogger(__name__)

# The header of the real kaggle_3m/data.csv, copied verbatim so readers of the
# real table read ours.
CSV_HEADER = (
    "Patient,RNASeqCluster,MethylationCluster,miRNACluster,CNCluster,RPPACluster,"
    "OncosignCluster,COCCluster,histological_type,neoplasm_histologic_grade,"
    "tumor_tissue_site,laterality,tumor_location,gender,age_at_initial_pathologic,"
    "race,ethnicity,death01"
)

# Institution codes of the real data with rough shares of its 110 patients and
# the slice counts their scanners produce (the real counts range from 20 to 88).
_INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")
_INSTITUTION_SHARE = (0.15, 0.33, 0.04, 0.16, 0.32)
_SLICE_CHOICES = {
    "CS": (20, 20, 22, 23, 24),
    "DU": (31, 36, 36, 37, 38, 38, 42, 56, 57),
    "EZ": (20, 24, 28),
    "FG": (36, 40, 48, 51, 56, 60),
    "HT": (20, 21, 22, 24, 28, 30, 32, 88),
}

# Tissue intensities per channel (pre-contrast T1, FLAIR, post-contrast T1),
# read off the real slices: FLAIR suppresses CSF and shows grey matter brighter
# than white matter; T1 shows fat bright and white matter brighter than grey.
_TISSUE = {
    "scalp": (165.0, 105.0, 170.0),
    "skull": (22.0, 18.0, 28.0),
    "csf": (38.0, 14.0, 45.0),
    "face": (95.0, 70.0, 105.0),
    "grey": (86.0, 104.0, 92.0),
    "white": (124.0, 78.0, 120.0),
    "eye": (35.0, 22.0, 40.0),
    "lesion": (78.0, 185.0, 84.0),
}


@dataclasses.dataclass(frozen=True)
class _Patient:
    folder: str  # e.g. "TCGA_CS_4941_19960909"
    num_slices: int
    seed: tuple[int, int]


# Std of a field built from unit-normal weights on the Gaussian bumps below
# (per axis the squared bumps sum to sqrt(pi) * 0.7).
_FIELD_STD = (np.sqrt(np.pi) * 0.7) ** 1.5
# Slices rendered at once. One keeps every temporary at 256 KB, in cache and
# below malloc's mmap threshold; bigger chunks page-fault and run slower.
_CHUNK = 1


def _bumps(coords, centres, step):
    d = (coords[:, None] - centres[None, :]) / (0.7 * step)
    return np.exp(-0.5 * d * d).astype(np.float32)


class _Field:
    """A smooth random 3-D field with unit-ish std, evaluated a few slices at a time.

    A sum of Gaussian bumps on a grid with the given spacing (px), evaluated as
    a separable tensor product so each evaluation is three small matrix products.
    """

    def __init__(self, rng, z_range, spacing, z_spacing=None):
        self._z_step = z_spacing or spacing
        self._z_centres = np.arange(z_range[0] - self._z_step, z_range[1] + 2 * self._z_step, self._z_step)
        pix = np.arange(SIZE, dtype=np.float32)
        self._by = _bumps(pix, np.arange(-spacing, SIZE + 2 * spacing, spacing), spacing)
        self._bx_t = np.ascontiguousarray(self._by.T)
        shape = (len(self._z_centres), self._by.shape[1], self._by.shape[1])
        self._w = rng.standard_normal(shape, dtype=np.float32) / np.float32(_FIELD_STD)

    def at(self, zs):
        """Returns the field on slices at heights zs: [len(zs), SIZE, SIZE]."""
        f = np.tensordot(_bumps(zs, self._z_centres, self._z_step), self._w, axes=(1, 0))
        return self._by @ f @ self._bx_t


def _ramp(x, width=1.5):
    """Soft step 0->1 as x goes from -width/2 to +width/2 (partial volume)."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _ellipse_depth(x, y, ax, ay, lump):
    """Depth (px) inside an in-plane ellipse along the ray from its centre."""
    rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2) * lump
    return np.sqrt(x * x + y * y) * (1.0 / np.maximum(rho, 1e-3) - 1.0)


def _longest_run(flags):
    """Boolean array keeping only the longest run of True in a 1-D array."""
    best, run_start = (0, 0), None
    for i, flag in enumerate(np.append(flags, False)):
        if flag and run_start is None:
            run_start = i
        if not flag and run_start is not None:
            if i - run_start > best[1] - best[0]:
                best = (run_start, i)
            run_start = None
    keep = np.zeros(len(flags), bool)
    keep[best[0] : best[1]] = True
    return keep


class _Phantom:
    """One patient's head: anatomy drawn once from its seed, rendered by slices.

    Coordinates are pixels: x left-right, y front-back (rows grow downwards, so
    the face is at the top as in the real data), z from the skull base
    (slice 1) to near the vertex.
    """

    def __init__(self, p: _Patient):
        rng = self.rng = np.random.default_rng(p.seed)

        def u(lo, hi):
            # A Python float: NumPy scalars would promote float32 arrays to float64.
            return float(rng.uniform(lo, hi))

        self.n = p.num_slices
        az = self.az = 95.0
        self.ax, self.ay = u(78, 88), u(96, 106)
        cx, cy = SIZE / 2 + u(-8, 8), SIZE / 2 + u(-4, 10)
        tilt = math.radians(u(-6, 6))
        # The real stacks run from below the skull base to at or above the vertex.
        z_lo, z_hi = u(-0.68, -0.58), u(0.86, 1.0)
        self.zs = np.linspace(z_lo * az, z_hi * az, self.n).astype(np.float32)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
        self.x = (xx - cx) * math.cos(tilt) + (yy - cy) * math.sin(tilt)
        self.y = -(xx - cx) * math.sin(tilt) + (yy - cy) * math.cos(tilt)
        # The midline, slightly wavy: the interhemispheric fissure.
        self.midline = _ramp(1.4 - np.abs(self.x + 1.5 * np.sin(self.y / 30.0)), width=1.2)

        zr = (float(self.zs[0]), float(self.zs[-1]))
        self.lump = _Field(rng, zr, 48.0)
        self.scalp = _Field(rng, zr, 30.0)
        self.gyri = _Field(rng, zr, 9.0, 12.0)
        self.sulci = _Field(rng, zr, 10.0, 12.0)
        self.texture = _Field(rng, zr, 5.0, 6.0)
        self.bias = _Field(rng, zr, 90.0, 120.0)

        self.vent_z = u(0.1, 0.2) * az
        self.vent_size = u(0.8, 1.3)

        # Lesion: an irregular ellipsoid in one hemisphere, somewhere inside
        # the brain's widest part.
        side = float(rng.choice((-1.0, 1.0)))
        self.lz = u(-0.1, 0.45) * az
        shrink = math.sqrt(1 - (self.lz / az) ** 2) if self.lz > 0 else 1.0
        self.lx = side * u(14, 40) * shrink
        self.ly = u(-50, 40) * shrink
        self.la, self.lb, self.lc = u(18, 38), u(18, 38), u(14, 30)
        self.phi = u(0, math.pi)
        self.lesion_shape = _Field(rng, zr, 10.0)
        self.lesion_halo = _Field(rng, zr, 6.0)
        strength = u(0.65, 1.0)
        white, lesion = np.asarray(_TISSUE["white"]), np.asarray(_TISSUE["lesion"])
        self.lesion_values = white + strength * (lesion - white)

        self.gain = rng.uniform(0.5, 1.15, size=3).astype(np.float32)
        self.gain[1] *= rng.uniform(0.5, 1.1)
        self.sigma = u(1.5, 4.0)
        # Some real patients lack pre- or post-contrast; FLAIR stands in for it.
        missing = rng.uniform()
        self.flair_copy_to = 2 if missing < 0.08 else 0 if missing < 0.14 else None

    def _head(self, zs):
        """Skin depth, layer thicknesses and brain depth (px) on slices zs."""
        zn = (zs / self.az)[:, None, None]
        # A dome above the centre; the face and jaw keep the head wide below.
        # Layers look thicker where the skull is oblique to the slice.
        s_head = np.where(zn >= 0, np.sqrt(np.clip(1 - zn * zn, 1e-4, 1)), np.sqrt(1 - 0.3 * zn * zn))
        k = 1.0 / np.maximum(s_head, 0.4) ** 0.8
        hx, hy = self.ax * s_head, self.ay * s_head
        lump = 1.0 + 0.02 * self.lump.at(zs)
        depth = _ellipse_depth(self.x, self.y, hx, hy, lump)
        scalp_t = 7.0 * k * (1.0 + 0.15 * self.scalp.at(zs))
        skull_t = scalp_t + 2.5 * k
        inner_t = skull_t + 1.0 * k
        # Brain: inside the skull; below the orbits only the temporal lobes and
        # the posterior fossa remain, behind a curved cut (the skull base).
        bx, by = np.maximum(hx - inner_t, 0.5), np.maximum(hy - inner_t, 0.5)
        bdepth = _ellipse_depth(self.x, self.y - 2.0, bx, by, lump)
        low = np.clip((-zn - 0.12) / 0.45, 0.0, 1.0)
        base_depth = None
        if low.any():
            cut = -by * (1.0 - 1.15 * low) + 0.45 * by * low * (1.0 - (self.x / bx) ** 2)
            base_depth = self.y - cut
            bdepth = np.minimum(bdepth, np.where(low > 0, base_depth - 5.0, np.inf))
        return dict(depth=depth, scalp_t=scalp_t, skull_t=skull_t, bdepth=bdepth, by=by, low=low, base_depth=base_depth)

    def _lesion_rho(self, zs):
        """The lesion's lumpy implicit function: the lesion is where it is < 1."""
        c, s = math.cos(self.phi), math.sin(self.phi)
        dx, dy = self.x - self.lx, self.y - self.ly
        u, v = dx * c + dy * s, dx * s - dy * c
        dz = (zs[:, None, None] - self.lz) / self.lc
        rho = np.sqrt((u / self.la) ** 2 + (v / self.lb) ** 2 + dz * dz)
        return rho + 0.22 * self.lesion_shape.at(zs)

    def lesion_slices(self):
        """Which slices keep lesion pixels: the longest contiguous run, as in the real data."""
        pos = np.zeros(self.n, bool)
        reach = 2.2 * self.lc  # the shape noise cannot push the lesion further
        idx = np.nonzero(np.abs(self.zs - self.lz) < reach)[0]
        for start in range(0, len(idx), _CHUNK):
            sel = idx[start : start + _CHUNK]
            zs = self.zs[sel]
            mask = (self._lesion_rho(zs) < 1.0) & (self._head(zs)["bdepth"] > 2.0)
            pos[sel] = mask.any(axis=(1, 2))
        return _longest_run(pos)

    def render(self, sel, keep):
        """Renders slices sel: uint8 images [k,SIZE,SIZE,3] and bool masks [k,SIZE,SIZE]."""
        zs = self.zs[sel]
        zc = zs[:, None, None]
        x, y, az = self.x, self.y, self.az
        g = self._head(zs)
        depth, bdepth = g["depth"], g["bdepth"]
        head = _ramp(depth)
        skull = _ramp(depth - g["scalp_t"])
        inner = _ramp(depth - g["skull_t"])
        brain = _ramp(bdepth)
        shape = brain.shape

        # Cortex: a grey ribbon over white matter, folded by the zero set of one
        # random field (sulci) and an undulating grey/white boundary (gyri).
        g2 = np.abs(self.sulci.at(zs))
        near_surface = _ramp(16.0 - bdepth, width=6.0)
        white = _ramp(bdepth - 6.0 - 2.5 * self.gyri.at(zs), width=3.0)
        white *= 1.0 - near_surface * (1.0 - _ramp(g2 - 0.4, width=0.4))
        csf = np.clip(1.0 - g2 / 0.16, 0.0, 1.0) * _ramp(13.0 - bdepth, width=4.0)
        # Interhemispheric fissure in front of and behind the ventricles.
        np.maximum(csf, self.midline * _ramp(np.abs(y) - 0.4 * g["by"], width=6.0), out=csf)
        if np.any(np.abs(zs - self.vent_z) < 20.0):
            # Lateral ventricles: two ellipsoids diverging towards the front.
            vs = self.vent_size
            for side in (-1.0, 1.0):
                a = math.radians(side * 12.0)
                vx, vy = x - side * 6.0 * vs, y + 2.0
                u = vx * math.cos(a) - vy * math.sin(a)
                v = vx * math.sin(a) + vy * math.cos(a)
                r = (u / (3.5 * vs)) ** 2 + (v / (18.0 * vs)) ** 2 + ((zc - self.vent_z) / 14.0) ** 2
                np.maximum(csf, _ramp(1.0 - r, width=0.4), out=csf)

        face = inner * g["low"]
        layers = [
            (head, "scalp", 0.1),
            (skull, "skull", 0.0),
            (face, "face", 0.15),
            (inner - face, "csf", 0.0),
        ]
        if g["base_depth"] is not None:
            # Air, bone and fat planes of the face: dark lines along a zero set.
            layers.append((face * np.clip(1.0 - g2 / 0.3, 0.0, 1.0), "skull", 0.0))
        eye_z = -0.42 * az
        if np.any(np.abs(zs - eye_z) < 20.0):
            # Eyes in orbital fat, and the nasal sinus, in the lowest slices.
            eyes, fat = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            for side in (-1.0, 1.0):
                r = np.sqrt((x - side * 0.36 * self.ax) ** 2 + (y + 0.8 * self.ay) ** 2 + (zc - eye_z) ** 2)
                np.maximum(eyes, _ramp(9.0 - r), out=eyes)
                np.maximum(fat, _ramp(13.0 - r, width=4.0), out=fat)
            sinus = (x / 10.0) ** 2 + ((y + 0.55 * self.ay) / 18.0) ** 2 + ((zc + 0.45 * az) / 16.0) ** 2
            layers += [(fat, "scalp", 0.1), (eyes, "eye", 0.0), (_ramp(1.0 - sinus, width=0.5) * inner, "skull", 0.0)]
        if g["base_depth"] is not None:
            bd = g["base_depth"]
            bone = _ramp(bd + 1.0, width=2.0) * _ramp(4.0 - bd, width=2.0) * (g["low"] > 0)
            layers.append((0.7 * bone * inner, "skull", 0.0))
            # Brainstem in a ring of CSF, in front of the cerebellum.
            r = np.sqrt(x * x + (y - 0.12 * g["by"]) ** 2)
            ring = (_ramp(15.0 - r) - _ramp(11.0 - r)) * (g["low"] > 0.35)
            np.maximum(csf, ring, out=csf)
        layers += [(brain, "grey", 0.08), (brain * white, "white", 0.04), (brain * csf, "csf", 0.0)]

        # The FLAIR hyperintensity fades out around the mask edge with its own
        # jitter, so the boundary is not an iso-contour of any channel.
        mask = np.zeros(shape, bool)
        values = [_TISSUE[name] for _, name, _ in layers]
        if keep.any():
            rho = self._lesion_rho(zs)
            mask = (rho < 1.0) & (bdepth > 2.0) & keep[:, None, None]
            halo = rho + 0.07 * self.lesion_halo.at(zs)
            core = np.clip(1.0 - rho, 0.0, 1.0)
            weight = _ramp(1.0 - halo, width=0.2) * brain * (0.68 + 0.34 * core) * keep[:, None, None]
            layers.append((weight, "lesion", 0.15))
            values.append(self.lesion_values)

        # Compose outside-in: each layer covers what is under it by its weight.
        tex = self.texture.at(zs)
        eff = np.empty((len(layers),) + shape, np.float32)
        rest = np.ones(shape, np.float32)
        for i in range(len(layers) - 1, -1, -1):
            w, _, jitter = layers[i]
            np.multiply(w, rest, out=eff[i])
            rest -= eff[i]
            if jitter:
                eff[i] *= 1.0 + jitter * tex
        img = np.asarray(values, np.float32).T @ eff.reshape(len(layers), -1)  # [3, k*S*S]

        # Smooth bias field (coil sensitivity), per-channel gain, Rician noise.
        img *= (1.0 + 0.18 * self.bias.at(zs)).reshape(1, -1)
        img *= self.gain[:, None]
        img += self._noise(img.shape)
        np.square(img, out=img)
        img += np.square(self._noise(img.shape))
        np.sqrt(img, out=img)
        if self.flair_copy_to is not None:
            img[self.flair_copy_to] = img[1]
        img += 0.5
        np.clip(img, 0, 255, out=img)
        images = img.astype(np.uint8).reshape((3,) + shape).transpose(1, 2, 3, 0)
        return np.ascontiguousarray(images), mask

    def _noise(self, shape):
        """Zero-mean noise with std sigma, cheaply: the sum of two uniform bytes."""
        b = self.rng.integers(0, 256, size=(2,) + shape, dtype=np.uint8)
        s = b[0].astype(np.int16)
        s += b[1]
        s -= 255
        return s * np.float32(self.sigma / 104.5)  # std of the sum is 104.5


def _phantom(p: _Patient) -> tuple[np.ndarray, np.ndarray]:
    """Renders one patient: uint8 images [n,256,256,3] and masks [n,256,256] {0,255}."""
    ph = _Phantom(p)
    keep = ph.lesion_slices()
    images = np.empty((p.num_slices, SIZE, SIZE, 3), np.uint8)
    masks = np.empty((p.num_slices, SIZE, SIZE), np.uint8)
    for start in range(0, p.num_slices, _CHUNK):
        sel = slice(start, start + _CHUNK)
        images[sel], m = ph.render(sel, keep[sel])
        masks[sel] = m * np.uint8(255)
    return images, masks


def _write_patient(p: _Patient, root: str) -> np.ndarray:
    """Renders and writes one patient folder; returns its lesion area fraction per slice."""
    # One BLAS thread: the parallelism is across patients, and spinning BLAS
    # threads on a shared 2-core machine cost more than they give.
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        images, masks = _phantom(p)
    folder = os.path.join(root, p.folder)
    os.makedirs(folder)
    for i in range(p.num_slices):
        stem = os.path.join(folder, f"{p.folder}_{i + 1}")
        tifffile.imwrite(stem + ".tif", images[i], photometric="rgb")
        tifffile.imwrite(stem + "_mask.tif", masks[i], photometric="minisblack")
    return (masks > 0).mean(axis=(1, 2))


def render_arrays(*, patients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Renders the patients `write_dataset` would write, in memory, in one process.

    Args:
      patients: number of patients, at least 1.
      seed: as for `write_dataset`.

    Returns:
      (images uint8 [N, 256, 256, 3], masks uint8 [N, 256, 256] in {0, 1}), the
      slices of all patients in folder-name order, each patient's in slice order.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    plan = sorted(_patients(patients, seed), key=lambda q: q.folder)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        rendered = [_phantom(p) for p in plan]
    images = np.concatenate([r[0] for r in rendered])
    masks = np.concatenate([r[1] for r in rendered]) // 255
    return images, masks


def _patients(count: int, seed: int) -> list[_Patient]:
    """Draws patient names, institutions and slice counts for a seed."""
    rng = np.random.default_rng([seed, 0])
    used: set[str] = set()
    out = []
    for i in range(count):
        inst = str(rng.choice(_INSTITUTIONS, p=_INSTITUTION_SHARE))
        while True:
            if rng.uniform() < 0.12:
                chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                pid = "A" + "".join(rng.choice(list(chars), size=3))
            else:
                pid = str(rng.integers(4000, 9000))
            if pid not in used:
                used.add(pid)
                break
        day = np.datetime64("1983-01-01") + int(rng.integers(0, 21 * 365))
        date = str(day).replace("-", "")
        slices = int(rng.choice(_SLICE_CHOICES[inst]))
        out.append(_Patient(f"TCGA_{inst}_{pid}_{date}", slices, (seed, i + 1)))
    return out


def _csv_rows(patients: list[_Patient], seed: int) -> list[str]:
    """Plausible clinical/genomic rows (small integer codes, some blank)."""
    rng = np.random.default_rng([seed, 1])
    highs = (4, 5, 3, 3, 4, 3, 3, 3, 2, 1, 3, 6, 2)  # code ranges per column
    rows = []
    for p in sorted(patients, key=lambda q: q.folder):
        cells = ["_".join(p.folder.split("_")[:3])]
        for high in highs:
            cells.append("" if rng.uniform() < 0.06 else str(rng.integers(1, high + 1)))
        cells.append(str(rng.integers(20, 76)))  # age_at_initial_pathologic
        cells.append("" if rng.uniform() < 0.05 else str(rng.integers(1, 4)))  # race
        cells.append("" if rng.uniform() < 0.1 else "2")  # ethnicity
        cells.append(str(int(rng.uniform() < 0.35)))  # death01
        rows.append(",".join(cells))
    return rows


def write_dataset(
    out_dir: str,
    *,
    patients: int,
    seed: int,
    workers: int | None = None,
) -> str:
    """Writes a synthetic dataset in the Kaggle layout.

    The output is `out_dir/kaggle_3m/TCGA_<inst>_<pid>_<date>/..._<n>.tif` plus
    `..._<n>_mask.tif` for every slice and `kaggle_3m/data.csv`. It is written
    into a temporary folder first and renamed into place, so a crash never
    leaves a half-written kaggle_3m behind. The content depends only on
    `patients` and `seed`, not on `workers`.

    Args:
      out_dir: folder to create kaggle_3m in (created if missing).
      patients: number of patients, at least 1.
      seed: seed for names, anatomy, lesions and noise.
      workers: worker processes; None uses every CPU, 1 renders in-process.

    Returns:
      The path of the kaggle_3m folder.

    Raises:
      ValueError: patients < 1.
      FileExistsError: out_dir is a file, or out_dir/kaggle_3m already exists.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    root = pathlib.Path(out_dir) / "kaggle_3m"
    if pathlib.Path(out_dir).exists() and not pathlib.Path(out_dir).is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder; choose another --out")
    if root.exists():
        raise FileExistsError(f"{root} already exists; remove it or choose another --out")
    root.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plan = _patients(patients, seed)
    # A sibling folder (same file system, so the rename is atomic) with the
    # default permissions, unlike tempfile.mkdtemp's 0700.
    tmp = pathlib.Path(atomic.temporary_dir(str(root)))
    try:
        workers = min(workers or os.cpu_count() or 1, patients)
        if workers == 1:
            areas = [_write_patient(p, tmp) for p in plan]
        else:
            # spawn: the caller may have TensorFlow's threads running, which
            # fork() does not copy safely.
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                # Largest patients first so the workers finish together.
                order = sorted(plan, key=lambda q: -q.num_slices)
                areas = list(pool.map(_write_patient, order, [tmp] * len(order)))
        lines = [CSV_HEADER] + _csv_rows(plan, seed)
        pathlib.Path(tmp, "data.csv").write_text("\n".join(lines) + "\n")
        atomic.swap_in_dir(str(tmp), str(root))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    area = np.concatenate(areas)
    positive = area[area > 0]
    log.info(
        f"wrote {patients} patients, {area.size} slices, {positive.size} lesion-positive "
        f"({positive.size / area.size:.1%}), median lesion area "
        f"{np.median(positive) if positive.size else 0.0:.2%} of a slice, "
        f"to {root} in {time.perf_counter() - start:.1f} s"
    )
    return str(root)


def write_into_empty(data_dir: str, *, patients: int, seed: int) -> str:
    """write_dataset for --synthetic_patients, into a missing or empty folder only: a folder with
    anything in it may be the user's data in a layout the loader missed.

    Raises:
      DataError: the folder is not empty, or cannot be written.
    """
    from data.lgg import DataError

    if os.path.isdir(data_dir) and os.listdir(data_dir):
        raise DataError(
            f"--synthetic_patients: {data_dir} holds no patient folders brainseg can read, but is "
            f"not empty ({', '.join(sorted(os.listdir(data_dir))[:3])}, ...); synthetic data is only "
            "written into a missing or empty folder. Point --data_dir at the kaggle_3m folder, or "
            "at a new folder for the synthetic set")
    log.info(f"No patients under {data_dir}: writing {patients} synthetic patients there "
             f"(--synthetic_patients).")
    try:
        return write_dataset(data_dir, patients=patients, seed=seed)
    except OSError as e:
        raise DataError(f"--synthetic_patients: cannot write the synthetic dataset into {data_dir} "
                        f"({e.strerror or e}); point --data_dir at an empty or new folder") from None


if __name__ == "__main__":
    from absl import app, flags

    # Imported by name so the spawned workers find the functions they run.
    from data import synthetic

    flags.DEFINE_string("out", None, "Folder to write kaggle_3m into.", required=True)
    flags.DEFINE_integer("patients", 110, "Number of patients.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("workers", None, "Worker processes (default: all CPUs).", lower_bound=1)
    FLAGS = flags.FLAGS

    def main(argv):
        del argv
        # Plain lines on stdout (absl's handler on the root logger would prefix them, on stderr).
        out = logging.getLogger("data")
        out.addHandler(logging.StreamHandler(sys.stdout))
        out.setLevel(logging.INFO)
        out.propagate = False
        try:
            synthetic.write_dataset(FLAGS.out, patients=FLAGS.patients, seed=FLAGS.seed,
                                    workers=FLAGS.workers)
        except OSError as e:  # FileExistsError from the checks above, or the disk's own error
            reason = f"{e.strerror} ({e.filename})" if e.strerror else str(e)
            print(f"error: --out={FLAGS.out}: {reason}", file=sys.stderr)
            sys.exit(2)

    app.run(main)
