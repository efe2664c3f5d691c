"""The evaluation's human side: the printed table, overlay grids, the Dice plot and eval_<split>.md."""

from __future__ import annotations

import io
import math

import numpy as np

from data.dataset import LggDataset
from engine.segmenter import Segmenter
from engine.summaries import overlay

# Tiles in a patient's overlay grid, and tiles per row.
GRID_TILES = 16
GRID_COLUMNS = 4
GRID_GAP = 4
# The metrics of the summary table: (key, what it is, digits).
METRICS = (
    ("dice", "Dice", 4), ("iou", "IoU", 4), ("hd95", "HD95 (px)", 2), ("assd", "ASSD (px)", 2),
    ("surface_dice", "surface Dice", 4), ("lesion_f1", "lesion-wise F1", 4),
    ("positive_slice_dice", "Dice on lesion slices", 4), ("true_volume", "true volume (px)", 0),
    ("predicted_volume", "predicted volume (px)", 0),
)


_UNITS = {"px": "pixels", "mm": "mm (the NIfTI volumes' voxel spacing)"}


def _unit(name: str, key: str, summary: dict) -> str:
    """A distance metric's name in the evaluation's unit (mm where NIfTI volumes give spacing)."""
    return name.replace("(px)", f"({summary.get('distance_unit', 'px')})") if key in ("hd95", "assd") else name


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def grid_slices(target: np.ndarray, pred: np.ndarray, tiles: int = GRID_TILES) -> np.ndarray:
    """Which of a patient's slices to show: those with lesion or prediction, else a spread of all."""
    interesting = np.flatnonzero(target.reshape(len(target), -1).any(1) | pred.reshape(len(pred), -1).any(1))
    pool = interesting if len(interesting) else np.arange(len(target))
    if len(pool) > tiles:
        pool = pool[np.linspace(0, len(pool) - 1, tiles).round().astype(int)]
    return pool


def tile(images: np.ndarray, columns: int = GRID_COLUMNS, gap: int = GRID_GAP) -> np.ndarray:
    """Lays uint8 [N, H, W, 3] images out in a grid with grey gaps (dark slices stay apart)."""
    n, h, w, c = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, c), 128, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = image
    return grid


def patient_overlay(segmenter: Segmenter, dataset: LggDataset, predictions: np.ndarray,
                    idx: np.ndarray, *, batch_size: int) -> tuple[np.ndarray, list[int]]:
    """A grid of one patient's overlays, and the slice numbers shown.

    The red outline is the final (post-processed) prediction; pixels that post-processing
    removed keep their probability tint but lose the outline.
    """
    pred, target = predictions[idx], dataset.masks[idx] > 0
    picked = grid_slices(target, pred)
    probs = segmenter.probabilities(dataset.images[idx], batch_size=batch_size)[picked]
    shown = idx[picked]
    probs = np.where(predictions[shown], probs, np.minimum(probs, segmenter.spec.threshold))
    tiles = overlay(dataset.images[shown].astype(np.float32) / 255.0, dataset.masks[shown], probs)
    return tile(tiles), [dataset.records[i].slice_number for i in shown]


def dice_plot(rows: list[dict], title: str) -> bytes:
    """A PNG of the per-patient Dice: one dot per patient by institution, over a box plot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    institutions = sorted({r["institution"] for r in rows})
    groups = [("all", [r["dice"] for r in rows])] + [
        (i, [r["dice"] for r in rows if r["institution"] == i]) for i in institutions]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(groups), 3.6), dpi=110)
    ax.boxplot([g for _, g in groups], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for k, (_, values) in enumerate(groups, start=1):
        ax.scatter(k + rng.uniform(-0.15, 0.15, len(values)), values, s=12, alpha=0.7, zorder=3)
    ax.set_xticks(range(1, len(groups) + 1), [f"{n}\n(n={len(v)})" for n, v in groups])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("per-patient Dice")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def evaluation_table(summary: dict, rows: list[dict]) -> str:
    """The printed report: the figures with their intervals, then one line per patient (best first)."""
    s = summary
    lines = [f"{'metric (per patient)':<30}{'mean':>9}{'95% CI':>19}{'median':>9}"]
    for key, name, digits in METRICS:
        m, name = s["metrics"][key], _unit(name, key, s)
        lines.append(f"{name:<30}{fmt(m['mean'], digits):>9}  [{fmt(m['ci_low'], digits)}, "
                     f"{fmt(m['ci_high'], digits)}]".ljust(58) + f"{fmt(m['median'], digits):>9}")
    lines += [
        "",
        f"{'Dice, all pixels of the split':<44}{fmt(s['dice']):>10}",
        f"{'False-positive rate on empty slices':<44}{fmt(s['empty_slice_fp_rate']):>10}"
        f"   ({s['false_positive_slices']} of {s['empty_slices']} slices)",
        f"{'Per-patient (volume) Dice, mean':<44}{fmt(s['patient_dice_mean']):>10}"
        f"   ({s['patients']} patients)",
        f"{'Per-patient (volume) Dice, median':<44}{fmt(s['patient_dice_median']):>10}",
        "",
        f"{'patient':<28}{'slices':>7}{'lesion':>7}{'dice':>9}{'hd95':>8}{'lesions tp/fp/fn':>18}"
        f"{'FP empty':>10}",
    ]
    for r in sorted(rows, key=lambda r: (-r["dice"], r["patient"])):
        lines.append(f"{r['patient']:<28}{r['slices']:>7}{r['positive_slices']:>7}{fmt(r['dice']):>9}"
                     f"{fmt(r['hd95'], 1):>8}{r['lesions_tp']:>8}/{r['lesions_fp']}/{r['lesions_fn']:<6}"
                     f"{r['false_positive_slices']:>5}/{r['empty_slices']:<4}")
    return "\n".join(lines)


def _group_table(groups: dict, unit: str = "px") -> list[str]:
    lines = []
    for grouping, members in groups.items():
        lines += ["", f"### By {grouping}", "",
                  f"| group | patients | Dice mean [95% CI] | Dice median | HD95 median ({unit}) | lesion F1 |",
                  "|---|---|---|---|---|---|"]
        for name, m in members.items():
            d = m["dice"]
            lines.append(f"| {name} | {d['n']} | {fmt(d['mean'])} [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}] "
                         f"| {fmt(d['median'])} | {fmt(m['hd95']['median'], 1)} | {fmt(m['lesion_f1']['mean'])} |")
    return lines


def markdown(summary: dict, groups: dict, *, plot: str, command: str) -> str:
    """eval_<split>.md: readable without TensorBoard, every figure from eval_<split>.json."""
    s = summary
    lines = [f"# Evaluation: {s['split']} ({s['patients']} patients, {s['slices']} slices)", "",
             f"- data: `{s['data_dir']}`",
             f"- model: {', '.join(f'`{m}`' for m in s['model'])}",
             f"- inference: {s['inference']}",
             f"- command: `{command}`",
             f"- scored at {s['original_size'][0]}x{s['original_size'][1]} per patient (3D volume); "
             f"surface metrics in {_UNITS[s.get('distance_unit', 'px')]}, surface Dice at "
             f"{s['surface_tolerance']:g} {s.get('distance_unit', 'px')}; "
             "intervals: 95% bootstrap over patients", "",
             "## Summary", "",
             "| metric (per patient) | mean | 95% CI | median |", "|---|---|---|---|"]
    for key, name, digits in METRICS:
        m, name = s["metrics"][key], _unit(name, key, s)
        lines.append(f"| {name} | {fmt(m['mean'], digits)} | [{fmt(m['ci_low'], digits)}, "
                     f"{fmt(m['ci_high'], digits)}] | {fmt(m['median'], digits)} |")
    lines += ["", f"False positives on lesion-free slices: {s['false_positive_slices']} of "
                  f"{s['empty_slices']} ({fmt(s['empty_slice_fp_rate'])}). Dice over all pixels of the "
                  f"split: {fmt(s['dice'])}. Lesions found: {s['lesions_tp']} true, {s['lesions_fp']} "
                  f"false, {s['lesions_fn']} missed.", "", "## Groups"]
    lines += _group_table(groups, s.get("distance_unit", "px"))
    lines += ["", "## Per-patient Dice", "", f"![per-patient Dice]({plot})", "",
              "## Best and worst patient", ""]
    for which in ("best", "worst"):
        f = s["figures"][which]
        lines += [f"**{which}: {f['patient']}**, Dice {fmt(f['dice'])} (slices {', '.join(map(str, f['slices_shown']))};"
                  " green: truth, red: prediction)", "", f"![{which}]({f['png']})", ""]
    return "\n".join(lines) + "\n"
