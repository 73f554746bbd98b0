"""Histogram metrics against scikit-learn and exact references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from codegraph3d.metrics import (
    StreamingBinaryMetrics,
    patient_auroc,
    patient_average_precision,
)


def data(seed, n=3000, prevalence=0.1):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    s = rng.normal(size=n) + 1.2 * y
    return s, y


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_matches_sklearn(seed):
    s, y = data(seed)
    m = StreamingBinaryMetrics(s.min(), s.max())
    for part in np.array_split(np.arange(len(s)), 4):  # streamed in pieces
        m.update(s[part], y[part])
    assert m.n_positive == y.sum() and m.n_negative == (~y).sum()
    assert m.auroc() == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert m.average_precision() == pytest.approx(average_precision_score(y, s), abs=1e-3)
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    dice, threshold, iou = m.dice_max()
    assert dice == pytest.approx(f1.max(), abs=1e-3)
    pred = s >= threshold
    tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
    assert dice == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-3)
    assert iou == pytest.approx(tp / (tp + fp + fn), abs=1e-3)
    assert m.dice_at(threshold) == pytest.approx(dice, abs=1e-12)


def test_ties_clipping_and_mask():
    # Discrete scores: every tie is inside one bin, where sklearn also counts ties as half.
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, size=500).astype(float)
    y = rng.random(500) < 0.3
    m = StreamingBinaryMetrics(0.0, 5.0, n_bins=5)
    m.update(s, y)
    assert m.auroc() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m.average_precision() == pytest.approx(average_precision_score(y, s), abs=1e-12)
    # Out-of-range values land in the end bins; the mask drops samples.
    m2 = StreamingBinaryMetrics(0.0, 1.0, n_bins=10)
    m2.update(np.array([-5.0, 0.5, 7.0, 0.2]), np.array([0, 0, 1, 1]),
              mask=np.array([True, True, True, False]))
    assert m2.neg[0] == 1 and m2.pos[-1] == 1 and m2.n_positive == 1
    assert m2.auroc() == 1.0


def test_degenerate_and_errors():
    m = StreamingBinaryMetrics(0.0, 1.0)
    m.update(np.array([0.1, 0.2]), np.array([False, False]))
    assert np.isnan(m.auroc()) and np.isnan(m.average_precision()) and np.isnan(m.dice_max()[0])
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="non-finite"):
        m.update(np.array([np.inf]), np.array([1]))
    with pytest.raises(ValueError, match="0/1"):
        m.update(np.array([0.5]), np.array([2]))
    with pytest.raises(ValueError, match="low < high"):
        StreamingBinaryMetrics(1.0, 1.0)


def test_patient_metrics_exact():
    s, y = data(3, n=40, prevalence=0.4)
    s = np.round(s, 1)  # create ties
    assert patient_auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    want_ap = average_precision_score(y, s)
    assert patient_average_precision(s, y) == pytest.approx(want_ap, abs=1e-12)
    assert np.isnan(patient_auroc(np.array([1.0, 2.0]), np.array([1, 1])))
