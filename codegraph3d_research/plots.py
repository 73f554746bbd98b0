"""Pictures of an evaluation: ROC and PR curves, Dice versus threshold, lesion montages.

All drawing uses :class:`matplotlib.figure.Figure` directly (the Agg renderer, no pyplot, no
display, no global state), so it runs headless and in threads. Everything is drawn from data an
evaluation already holds (:class:`codegraph3d_research.evaluate.Evaluation`): score lists, voxel
histograms, and three orthogonal slices per lesion series cut while the volumes were loaded
(:func:`case_slices`), so no volume is read again.

Files written by :func:`write_plots` (beside ``metrics.json``):

``roc_pr_patient.png``
    ROC and precision-recall curves of the per-series scores, one line per contrast batch.
``roc_pr_voxel.png``
    The same for brain voxels (from the histograms; needs voxel scores).
``dice_vs_threshold.png``
    Voxel Dice against the score threshold per batch, with the product's threshold (dotted)
    and Dice-max (dot).
``montage_<contrast>.png``
    Best, median and worst lesion series of the batch (ranked by Dice at the product's
    threshold, ties broken by Dice-max): axial, coronal and sagittal slices through the truth
    lesion's centroid with the truth contour (green) over the predicted BINARY mask (red) and,
    when available, the score as a heat overlay (transparent below half the batch's Dice-max
    threshold, so the anatomy stays visible).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from codegraph3d.core.files import atomic_path
from .metrics import patient_pr_curve, patient_roc_curve
from codegraph3d.core.volume import Volume

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .evaluate import Evaluation

__all__ = ["PLANES", "CaseSlices", "case_slices", "lps_view", "rank_cases", "write_plots"]

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


@dataclass
class CaseSlices:
    """Three orthogonal slices through one series' lesion centroid, ready to draw.

    Attributes
    ----------
    series_instance_uid, patient_id : str
        Which series.
    dice, dice_max : float or None
        Its Dice at the product's threshold and its Dice-max (ranking keys).
    planes : dict
        ``plane -> {"image", "lesion", "binary", "score"}`` 2-D arrays in display orientation
        (rows top to bottom, columns left to right); ``binary`` / ``score`` may be ``None``.
    aspects : dict
        ``plane -> row spacing / column spacing`` (for ``imshow(aspect=...)``).
    centre_zyx : tuple of int
        The centroid in the LPS-ordered view ``(S, P, L)`` indices.
    """

    series_instance_uid: str
    patient_id: str
    dice: float | None
    dice_max: float | None
    planes: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict)
    aspects: dict[str, float] = field(default_factory=dict)
    centre_zyx: tuple[int, int, int] = (0, 0, 0)


def lps_view(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], tuple[int, int, int]]:
    """How to reorder a ``[z, y, x]`` array so its axes run along LPS ``S``, ``P``, ``L``.

    The source axis nearest to each patient axis is used (the best of the six assignments), so an
    oblique series is shown in its nearest standard planes, not resampled.

    Parameters
    ----------
    direction : numpy.ndarray
        3x3 direction cosines, columns = the index axes ``x, y, z`` in LPS.

    Returns
    -------
    tuple
        ``(perm, flips, index_axes)``: ``np.transpose(array, perm)`` then flipping every view
        axis ``b`` with ``flips[b]`` gives an array whose axes increase towards superior,
        posterior and left; ``index_axes[b]`` is the source ``(x, y, z)`` index axis of view
        axis ``b`` (for spacings).
    """
    d = np.asarray(direction, dtype=float)
    best: tuple[float, tuple[int, ...]] = (-1.0, (0, 1, 2))
    for perm in itertools.permutations(range(3)):
        # view axis b is LPS axis 2 - b; array axis a is index axis 2 - a.
        weight = sum(abs(d[2 - b, 2 - perm[b]]) for b in range(3))
        if weight > best[0]:
            best = (weight, perm)
    perm = best[1]
    flips = tuple(bool(d[2 - b, 2 - perm[b]] < 0) for b in range(3))
    index_axes = tuple(2 - perm[b] for b in range(3))
    return tuple(perm), flips, index_axes  # type: ignore[return-value]


def _view(array: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    view = np.transpose(array, perm)
    for axis, flip in enumerate(flips):
        if flip:
            view = np.flip(view, axis=axis)
    return view


def case_slices(
    volume: Volume,
    lesion: np.ndarray,
    *,
    score: np.ndarray | None,
    binary: np.ndarray | None,
    uid: str,
    patient_id: str,
    dice: float | None,
    dice_max: float | None,
) -> CaseSlices:
    """Cut axial, coronal and sagittal slices through the centroid of ``lesion``.

    Parameters
    ----------
    volume : Volume
        The source series (image and geometry).
    lesion : numpy.ndarray
        Boolean truth lesion on the source grid (non-empty).
    score, binary : numpy.ndarray or None
        The score map and predicted mask on the source grid, when available.
    uid, patient_id : str
        Identity of the series, for titles.
    dice, dice_max : float or None
        Ranking keys (see :func:`rank_cases`).

    Returns
    -------
    CaseSlices
        Copies of the nine (or fewer) 2-D slices: a few hundred kB.
    """
    if lesion.shape != volume.array.shape:
        raise ValueError(f"series {uid}: lesion shape {lesion.shape} differs from the image {volume.array.shape}")
    if not lesion.any():
        raise ValueError(f"series {uid}: the lesion mask is empty, so it has no centre to show")
    perm, flips, index_axes = lps_view(volume.direction)
    spacing = [float(volume.spacing[k]) for k in index_axes]  # along S, P, L view axes
    arrays = {"image": volume.array, "lesion": lesion, "binary": binary, "score": score}
    views = {name: (_view(a, perm, flips) if a is not None else None) for name, a in arrays.items()}
    centre = tuple(round(float(v)) for v in np.argwhere(views["lesion"]).mean(axis=0))
    s, p, left = centre
    cut = {
        # rows posterior-down, columns towards the patient's left (radiological: right on the left)
        "axial": (lambda v: v[s, :, :], spacing[1] / spacing[2]),
        # rows superior-up
        "coronal": (lambda v: v[:, p, :][::-1], spacing[0] / spacing[2]),
        # rows superior-up, columns anterior to posterior
        "sagittal": (lambda v: v[:, :, left][::-1], spacing[0] / spacing[1]),
    }
    case = CaseSlices(uid, patient_id, dice, dice_max, centre_zyx=centre)  # type: ignore[arg-type]
    for plane, (take, aspect) in cut.items():
        case.planes[plane] = {
            name: (np.array(take(v)) if v is not None else None) for name, v in views.items()
        }
        case.aspects[plane] = aspect
    return case


def rank_cases(cases: list[CaseSlices]) -> list[tuple[str, CaseSlices]]:
    """Best, median and worst cases: by Dice at the product's threshold, ties by Dice-max.

    Undefined values rank lowest. Fewer than three cases give each once.
    """
    if not cases:
        return []

    def key(case: CaseSlices) -> tuple[float, float]:
        return (case.dice if case.dice is not None else -1.0,
                case.dice_max if case.dice_max is not None else -1.0)

    ordered = sorted(cases, key=key, reverse=True)
    if len(ordered) == 1:
        return [("only", ordered[0])]
    if len(ordered) == 2:
        return [("best", ordered[0]), ("worst", ordered[1])]
    return [("best", ordered[0]), ("median", ordered[len(ordered) // 2]), ("worst", ordered[-1])]


# ---------------------------------------------------------------------------------------------
# drawing


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _diagonal(ax: Axes) -> None:
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")


def _finish_roc_pr(roc: Axes, pr: Axes, level: str) -> None:
    roc.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
            title=f"{level} ROC")
    pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title=f"{level} precision-recall")
    for ax in (roc, pr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if ax is roc else "lower left", fontsize=8)


def _patient_curves(evaluation: Evaluation, title: str) -> Figure:
    figure = _figure(10, 4.6)
    roc, pr = figure.subplots(1, 2)
    _diagonal(roc)
    for colour, (contrast, acc) in zip(_COLOURS, evaluation.batches.items()):
        item = evaluation.metrics["batches"][contrast]
        s, y = np.array(acc.scores), np.array(acc.labels, dtype=bool)
        if y.size and y.any() and not y.all():
            fpr, tpr, _ = patient_roc_curve(s, y)
            roc.plot(fpr, tpr, color=colour, marker="o", ms=3,
                     label=f"{contrast}: AUROC {_fmt(item['patient_auroc'])} ({y.sum()}/{y.size} lesion)")
        else:
            roc.plot([], [], color=colour, label=f"{contrast}: undefined ({int(y.sum())}/{y.size} lesion)")
        if y.size and y.any():
            recall, precision, _ = patient_pr_curve(s, y)
            pr.step(recall, precision, where="post", color=colour, marker="o", ms=3,
                    label=f"{contrast}: AP {_fmt(item['patient_ap'])}")
            pr.axhline(y.mean(), color=colour, lw=0.8, ls=":")
    _finish_roc_pr(roc, pr, "patient-level")
    figure.suptitle(title, fontsize=10)
    return figure


def _voxel_curves(evaluation: Evaluation, title: str) -> Figure:
    figure = _figure(10, 4.6)
    roc, pr = figure.subplots(1, 2)
    # Brain voxels outnumber lesion voxels ~500:1, so the useful part of the ROC is at a false
    # positive rate of 1e-4..1e-2: a log axis shows it, a linear one hugs the corner.
    smallest = min((1.0 / acc.voxel.n_negative for acc in evaluation.batches.values()
                    if acc.voxel is not None and acc.voxel.n_negative), default=1e-6)
    grid = np.logspace(np.log10(smallest), 0, 50)
    roc.plot(grid, grid, color="0.7", lw=0.8, ls="--")
    for colour, (contrast, acc) in zip(_COLOURS, evaluation.batches.items()):
        voxel = acc.voxel
        if voxel is None or voxel.n_positive == 0 or voxel.n_negative == 0:
            continue
        item = evaluation.metrics["batches"][contrast]
        fpr, tpr, _ = voxel.roc_curve()
        roc.plot(fpr, tpr, color=colour, label=f"{contrast}: AUROC {_fmt(item['voxel_auroc'])}")
        recall, precision, _ = voxel.pr_curve()
        pr.step(recall, precision, where="post", color=colour, label=f"{contrast}: AP {_fmt(item['voxel_ap'])}")
    _finish_roc_pr(roc, pr, "voxel-level (brain voxels)")
    roc.set_xscale("log")
    roc.set_xlim(smallest, 1.0)
    roc.set_xlabel("false positive rate (log)")
    figure.suptitle(title, fontsize=10)
    return figure


def _dice_curve(evaluation: Evaluation, title: str, score_name: str) -> Figure:
    figure = _figure(7, 4.6)
    ax = figure.subplots()
    for colour, (contrast, acc) in zip(_COLOURS, evaluation.batches.items()):
        voxel = acc.voxel
        if voxel is None or voxel.n_positive == 0:
            continue
        thresholds, dice = voxel.dice_curve()
        best, at, _ = voxel.dice_max()
        ax.plot(thresholds, dice, color=colour, label=f"{contrast}: Dice-max {best:.3f} at {at:.3g}")
        ax.plot([at], [best], "o", color=colour)
        if acc.product_threshold_unit is not None:
            product = evaluation.metrics["batches"][contrast]["dice_at_product_threshold"]
            ax.axvline(acc.product_threshold_unit, color=colour, ls=":",
                       label=f"{contrast}: product threshold (BINARY Dice {_fmt(product)})")
    ax.set(xlabel=f"threshold ({score_name})", ylabel="Dice (pooled over the batch)", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return figure


def _montage(contrast: str, acc: Any, score_name: str, title: str) -> Figure | None:
    from matplotlib.colors import ListedColormap

    ranked = rank_cases(acc.cases)
    if not ranked:
        return None
    layers = [name for name in ("binary", "score") if ranked[0][1].planes["axial"][name] is not None]
    layers = layers or ["binary"]
    columns = [(plane, layer) for plane in PLANES for layer in layers]
    figure = _figure(2.4 * len(columns), 2.6 * len(ranked) + 0.6)
    axes = np.atleast_2d(figure.subplots(len(ranked), len(columns)))
    red = ListedColormap(["red"])
    # Every brain voxel has some score: heat below half the Dice-max threshold would only veil
    # the anatomy, so it is left transparent.
    floor = acc.low
    if acc.voxel is not None and acc.voxel.n_positive:
        floor = max(acc.low, 0.5 * acc.voxel.dice_max()[1])
    for row, (label, case) in enumerate(ranked):
        for col, (plane, layer) in enumerate(columns):
            ax = axes[row, col]
            arrays, aspect = case.planes[plane], case.aspects[plane]
            image = arrays["image"]
            positive = image[image > 0]
            top = float(np.percentile(positive, 99.5)) if positive.size else 1.0
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=top, aspect=aspect, interpolation="nearest")
            overlay = arrays[layer]
            if layer == "binary" and overlay is not None:
                ax.imshow(np.ma.masked_where(~overlay, overlay), cmap=red, alpha=0.45, aspect=aspect,
                          interpolation="nearest")
            elif layer == "score" and overlay is not None:
                ax.imshow(np.ma.masked_where(overlay < floor, overlay), cmap="hot", vmin=floor, vmax=acc.high,
                          alpha=0.6, aspect=aspect, interpolation="nearest")
            if arrays["lesion"].any():
                ax.contour(arrays["lesion"].astype(np.float32), levels=[0.5], colors=["lime"], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{plane}, {'BINARY mask' if layer == 'binary' else score_name}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{label}: {case.patient_id}\nDice {_fmt(case.dice)}, Dice-max {_fmt(case.dice_max)}",
                              fontsize=8)
    by = ("Dice at the product's threshold, ties by Dice-max" if any(case.dice is not None for _, case in ranked)
          else "Dice-max")
    legend = "green: truth lesion contour" + ("; red: predicted BINARY mask" if "binary" in layers else "")
    legend += f"; heat: {score_name}" if "score" in layers else ""
    figure.suptitle(f"{title}: {contrast} lesion series (best / median / worst by {by})\n{legend}", fontsize=9)
    return figure


def write_plots(evaluation: Evaluation, out_dir: str | Path) -> list[Path]:
    """Draw every picture the evaluation has data for into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluation.metrics
    score_name = metrics.get("score_name", "unit score")
    encoder = (metrics.get("encoder") or {}).get("name", "")
    title = f"{metrics.get('what', 'product')}" + (f" ({encoder} encoder)" if encoder else "")
    written = [_save(_patient_curves(evaluation, title), out / "roc_pr_patient.png")]
    if any(acc.voxel is not None and acc.voxel.n_positive and acc.voxel.n_negative
           for acc in evaluation.batches.values()):
        written.append(_save(_voxel_curves(evaluation, title), out / "roc_pr_voxel.png"))
        written.append(_save(_dice_curve(evaluation, f"{title}: voxel Dice versus threshold", score_name),
                             out / "dice_vs_threshold.png"))
    for contrast, acc in evaluation.batches.items():
        figure = _montage(contrast, acc, score_name, title)
        if figure is not None:
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in contrast)
            written.append(_save(figure, out / f"montage_{safe}.png"))
    return written
