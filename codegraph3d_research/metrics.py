"""Detection and segmentation metrics: exact for per-volume scores, histogram-based for voxels.

Voxel metrics pool every brain voxel of a cohort (10^9 values for a few hundred 224^3 volumes), so
they are accumulated in fixed score histograms, one for positive and one for negative voxels,
instead of being sorted. With ``n_bins`` bins over ``[low, high]`` all metrics are exact for
scores that fall in distinct bins; scores sharing a bin are treated as tied (as scikit-learn
treats equal scores): half a concordant pair for AUROC, one operating point for AP and Dice.
Choose ``[low, high]`` to cover the scores (e.g. the batch's ``score_to_unit`` mapping applied
first, then ``[0, 1]``); values outside are clipped into the end bins.

Per-volume (patient-level) metrics use :func:`patient_auroc` and
:func:`patient_average_precision`, which are exact; :func:`patient_roc_curve` and
:func:`patient_pr_curve` give the curves behind them, and the ``*_curve`` methods of
:class:`StreamingBinaryMetrics` the voxel-level ones (for plots).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "StreamingBinaryMetrics",
    "patient_auroc",
    "patient_average_precision",
    "patient_pr_curve",
    "patient_roc_curve",
]


def _as_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores shape {s.shape} differs from labels shape {y.shape}")
    s = s.astype(np.float64, copy=False).ravel()
    if not np.isfinite(s).all():
        bad = int(np.count_nonzero(~np.isfinite(s)))
        raise ValueError(f"scores contain {bad} non-finite value(s)")
    y = y.ravel()
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be boolean or 0/1")
        y = y.astype(bool)
    return s, y


class StreamingBinaryMetrics:
    """Accumulate voxel scores and binary labels into fixed histograms; compute pooled metrics.

    Parameters
    ----------
    low, high : float
        Score range covered by the bins (``low < high``); values outside are clipped into the
        first or last bin.
    n_bins : int, default 10000
        Number of equal-width bins. Memory: two int64 arrays of this length.

    Examples
    --------
    >>> m = StreamingBinaryMetrics(0.0, 1.0)
    >>> m.update(np.array([0.1, 0.9, 0.8]), np.array([0, 1, 0]))
    >>> round(m.auroc(), 3)
    1.0
    """

    def __init__(self, low: float, high: float, n_bins: int = 10000) -> None:
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise ValueError(f"need finite low < high; got low={low}, high={high}")
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
        self.low = float(low)
        self.high = float(high)
        self.n_bins = int(n_bins)
        self.pos = np.zeros(self.n_bins, dtype=np.int64)
        self.neg = np.zeros(self.n_bins, dtype=np.int64)

    @property
    def edges(self) -> np.ndarray:
        """Bin edges, ``(n_bins + 1,)``; bin ``b`` is ``[edges[b], edges[b + 1])``."""
        return np.linspace(self.low, self.high, self.n_bins + 1)

    @property
    def n_positive(self) -> int:
        """Positive samples seen so far."""
        return int(self.pos.sum())

    @property
    def n_negative(self) -> int:
        """Negative samples seen so far."""
        return int(self.neg.sum())

    def _bin(self, s: np.ndarray) -> np.ndarray:
        idx = np.floor((s - self.low) * (self.n_bins / (self.high - self.low)))
        return np.clip(idx, 0, self.n_bins - 1).astype(np.int64)

    def update(
        self, scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None
    ) -> None:
        """Add samples.

        Parameters
        ----------
        scores : numpy.ndarray
            Finite scores, any shape.
        labels : numpy.ndarray
            Same shape, bool or 0/1 (1 = anomalous).
        mask : numpy.ndarray, optional
            Same shape, bool: only these samples are added (e.g. the brain mask).
        """
        if mask is not None:
            m = np.asarray(mask)
            if m.shape != np.shape(scores):
                raise ValueError(
                    f"mask shape {m.shape} differs from scores shape {np.shape(scores)}"
                )
            if m.dtype != bool:
                raise ValueError(f"mask must be boolean; got dtype {m.dtype}")
            scores = np.asarray(scores)[m]
            labels = np.asarray(labels)[m]
        s, y = _as_scores_labels(scores, labels)
        b = self._bin(s)
        self.pos += np.bincount(b[y], minlength=self.n_bins)
        self.neg += np.bincount(b[~y], minlength=self.n_bins)

    def merge(self, other: StreamingBinaryMetrics) -> None:
        """Add another accumulator's counts (same ``low``, ``high``, ``n_bins``)."""
        if (other.low, other.high, other.n_bins) != (self.low, self.high, self.n_bins):
            raise ValueError("cannot merge accumulators with different bins")
        self.pos += other.pos
        self.neg += other.neg

    def auroc(self) -> float:
        """Area under the ROC curve; ``nan`` when either class is absent."""
        p, n = self.n_positive, self.n_negative
        if p == 0 or n == 0:
            return float("nan")
        # Fractions, not counts: P * N overflows int64 at 10^9 voxels.
        neg_below = np.concatenate([[0], np.cumsum(self.neg)[:-1]]) / n
        return float(np.sum(self.pos / p * (neg_below + 0.5 * self.neg / n)))

    def _top_down(self) -> tuple[np.ndarray, np.ndarray]:
        """TP and FP when predicting bins ``>= b`` positive, for every ``b`` (ascending ``b``)."""
        tp = np.cumsum(self.pos[::-1])[::-1].astype(np.float64)
        fp = np.cumsum(self.neg[::-1])[::-1].astype(np.float64)
        return tp, fp

    def average_precision(self) -> float:
        """Average precision (scikit-learn's step definition); ``nan`` without positives."""
        p = self.n_positive
        if p == 0:
            return float("nan")
        tp, fp = self._top_down()
        has_pos = self.pos > 0
        precision = tp[has_pos] / (tp[has_pos] + fp[has_pos])
        return float(np.sum(self.pos[has_pos] / p * precision))

    def dice_max(self) -> tuple[float, float, float]:
        """Best Dice over bin-edge thresholds (predict ``score >= threshold``).

        Returns
        -------
        tuple of float
            ``(dice, threshold, iou)``: the maximum Dice (= F1), the lower edge of the first bin
            predicted positive, and the IoU at that threshold; ``(nan, nan, nan)`` without
            positives.
        """
        p = self.n_positive
        if p == 0:
            return float("nan"), float("nan"), float("nan")
        tp, fp = self._top_down()
        dice = 2 * tp / (tp + fp + p)
        b = int(np.argmax(dice))
        iou = tp[b] / (fp[b] + p)
        return float(dice[b]), float(self.edges[b]), float(iou)

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ROC operating points at the bin-edge thresholds, from "nothing positive" down.

        Returns
        -------
        tuple of numpy.ndarray
            ``(fpr, tpr, thresholds)``, each ``(n_bins + 1,)``: point ``i`` predicts ``score >=
            thresholds[i]`` positive; the first point (threshold ``high``, past the last bin's
            lower edge) predicts nothing, the last (``low``) predicts everything.

        Raises
        ------
        ValueError
            When either class is absent (the curve is undefined).
        """
        p, n = self.n_positive, self.n_negative
        if p == 0 or n == 0:
            raise ValueError(f"the ROC curve needs both classes; have {p} positive and {n} negative samples")
        tp, fp = self._top_down()
        tpr = np.concatenate([[0.0], tp[::-1] / p])
        fpr = np.concatenate([[0.0], fp[::-1] / n])
        thresholds = np.concatenate([[self.high], self.edges[:-1][::-1]])
        return fpr, tpr, thresholds

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Precision-recall operating points at the bin-edge thresholds, high to low.

        Only thresholds that predict at least one sample are kept, and the curve starts at
        ``(recall 0, precision 1)`` as scikit-learn's does, so a step plot of it encloses
        :meth:`average_precision`.

        Returns
        -------
        tuple of numpy.ndarray
            ``(recall, precision, thresholds)``; ``thresholds[0]`` is ``high`` for the start point.

        Raises
        ------
        ValueError
            Without positive samples (recall is undefined).
        """
        p = self.n_positive
        if p == 0:
            raise ValueError("the precision-recall curve needs positive samples; have none")
        tp, fp = self._top_down()
        tp, fp, lower = tp[::-1], fp[::-1], self.edges[:-1][::-1]
        predicted = (tp + fp) > 0
        # A threshold inside a run of empty bins repeats the previous point: keep each point once.
        changed = np.concatenate([[True], (tp[1:] != tp[:-1]) | (fp[1:] != fp[:-1])])
        keep = predicted & changed
        recall = np.concatenate([[0.0], tp[keep] / p])
        precision = np.concatenate([[1.0], tp[keep] / (tp[keep] + fp[keep])])
        return recall, precision, np.concatenate([[self.high], lower[keep]])

    def dice_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Dice when predicting ``score >= threshold``, at every bin's lower edge.

        Returns
        -------
        tuple of numpy.ndarray
            ``(thresholds, dice)``, each ``(n_bins,)``, thresholds ascending; Dice is ``nan``
            where there are neither positives nor predicted positives.
        """
        p = self.n_positive
        tp, fp = self._top_down()
        denom = tp + fp + p
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(denom > 0, 2 * tp / denom, np.nan)
        return self.edges[:-1].copy(), dice

    def dice_at(self, threshold: float) -> float:
        """Dice when predicting ``score >= threshold``, resolved to the bin grid.

        Bins whose lower edge is ``>= threshold`` (up to float rounding) count as positive, so the
        result is exact when ``threshold`` is a bin edge and otherwise within one bin of it.
        ``nan`` when there are neither positives nor predicted positives.
        """
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite; got {threshold}")
        p = self.n_positive
        edges = self.edges[:-1]
        tol = 1e-9 * (self.high - self.low)
        first = int(np.searchsorted(edges, threshold - tol, side="left"))
        if threshold <= self.low:
            first = 0
        tp = float(self.pos[first:].sum())
        fp = float(self.neg[first:].sum())
        denom = tp + fp + p
        return float("nan") if denom == 0 else float(2 * tp / denom)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start of each run of equal values.
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
    ends = np.concatenate([starts[1:], [len(xs)]])
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def patient_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact AUROC (Mann-Whitney U, ties count half); ``nan`` when a class is absent.

    Parameters
    ----------
    scores : numpy.ndarray
        One finite score per volume or patient.
    labels : numpy.ndarray
        Same shape, bool or 0/1.
    """
    s, y = _as_scores_labels(scores, labels)
    p, n = int(y.sum()), int((~y).sum())
    if p == 0 or n == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - p * (p + 1) / 2.0) / (p * n))


def patient_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact average precision (scikit-learn's definition, tied scores one operating point).

    ``nan`` without positives.
    """
    s, y = _as_scores_labels(scores, labels)
    p = int(y.sum())
    if p == 0:
        return float("nan")
    tp, fp, _ = _tied_operating_points(s, y)
    recall_step = np.diff(np.concatenate([[0.0], tp])) / p
    return float(np.sum(recall_step * tp / (tp + fp)))



def _tied_operating_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP and FP counts when predicting ``score >= t``, one point per distinct score, high to low."""
    order = np.argsort(-scores, kind="mergesort")
    ss, ys = scores[order], labels[order]
    last = np.flatnonzero(np.concatenate([ss[1:] != ss[:-1], [True]]))
    tp = np.cumsum(ys)[last].astype(np.float64)
    fp = (last + 1) - tp
    return tp, fp, ss[last]


def patient_roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve of per-volume scores; tied scores form one operating point.

    Returns
    -------
    tuple of numpy.ndarray
        ``(fpr, tpr, thresholds)`` from ``(0, 0)`` (threshold ``+inf``: nothing predicted) to
        ``(1, 1)``; the trapezoidal area under it equals :func:`patient_auroc`.

    Raises
    ------
    ValueError
        When either class is absent (the curve is undefined).
    """
    s, y = _as_scores_labels(scores, labels)
    p, n = int(y.sum()), int((~y).sum())
    if p == 0 or n == 0:
        raise ValueError(f"the ROC curve needs both classes; have {p} positive and {n} negative volumes")
    tp, fp, thresholds = _tied_operating_points(s, y)
    return (
        np.concatenate([[0.0], fp / n]),
        np.concatenate([[0.0], tp / p]),
        np.concatenate([[np.inf], thresholds]),
    )


def patient_pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact precision-recall curve of per-volume scores; tied scores form one operating point.

    Returns
    -------
    tuple of numpy.ndarray
        ``(recall, precision, thresholds)``, starting at ``(0, 1)`` (threshold ``+inf``); the
        step area (precision times recall increment) equals :func:`patient_average_precision`.

    Raises
    ------
    ValueError
        Without positive volumes (recall is undefined).
    """
    s, y = _as_scores_labels(scores, labels)
    p = int(y.sum())
    if p == 0:
        raise ValueError("the precision-recall curve needs positive volumes; have none")
    tp, fp, thresholds = _tied_operating_points(s, y)
    return (
        np.concatenate([[0.0], tp / p]),
        np.concatenate([[1.0], tp / (tp + fp)]),
        np.concatenate([[np.inf], thresholds]),
    )
