"""Histogram metrics against scikit-learn and exact references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from codegraph3d_research.metrics import (
    StreamingBinaryMetrics,
    patient_auroc,
    patient_average_precision,
    patient_pr_curve,
    patient_roc_curve,
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
    precision, recall, _ = precision_recall_curve(y, s)
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


# --------------------------------------------------------------------------------------------
# hand-computed edge cases


def test_ties_count_half_by_hand():
    # Pairs (pos, neg): (0.5, 0.1) 1, (0.5, 0.5) 1/2, (0.9, 0.1) 1, (0.9, 0.5) 1 -> 3.5 / 4.
    s = np.array([0.1, 0.5, 0.5, 0.9])
    y = np.array([0, 1, 0, 1])
    assert patient_auroc(s, y) == 0.875
    # Operating points: {0.9}: P 1/1, R 1/2; {0.9, 0.5, 0.5}: P 2/3, R 1 -> AP = 1/2 + 1/2 * 2/3.
    assert patient_average_precision(s, y) == pytest.approx(0.5 + 1 / 3, abs=1e-15)
    m = StreamingBinaryMetrics(0.0, 1.0, n_bins=10)
    m.update(s, y)
    assert m.auroc() == 0.875
    assert m.average_precision() == pytest.approx(0.5 + 1 / 3, abs=1e-15)
    # One positive tied with one negative is a coin toss; all tied is 0.5 however many.
    assert patient_auroc(np.array([3.0, 3.0]), np.array([1, 0])) == 0.5
    assert patient_auroc(np.full(5, 2.0), np.array([1, 0, 0, 1, 0])) == 0.5


def test_all_normal_and_all_anomalous_by_hand():
    s = np.array([0.2, 0.4, 0.9])
    assert np.isnan(patient_auroc(s, np.zeros(3, bool)))
    assert np.isnan(patient_average_precision(s, np.zeros(3, bool)))
    # Every volume positive: no negative to rank against, but precision is 1 at every recall.
    assert np.isnan(patient_auroc(s, np.ones(3, bool)))
    assert patient_average_precision(s, np.ones(3, bool)) == 1.0
    m = StreamingBinaryMetrics(0.0, 1.0, n_bins=10)
    m.update(s, np.ones(3, bool))
    assert np.isnan(m.auroc()) and m.average_precision() == 1.0
    # Dice-max: predicting everything (threshold 0) gets all 3 positives with no false positive.
    assert m.dice_max() == (1.0, 0.0, 1.0)


def test_empty_lesion_dice_by_hand():
    # No positive voxel: Dice is undefined when nothing is predicted, 0 as soon as anything is.
    m = StreamingBinaryMetrics(0.0, 1.0, n_bins=4)
    m.update(np.array([0.1, 0.3, 0.6]), np.zeros(3, bool))
    assert np.isnan(m.dice_max()[0])
    assert m.dice_at(0.5) == 0.0  # 0.6 predicted: tp 0, fp 1
    assert np.isnan(StreamingBinaryMetrics(0.0, 1.0).dice_at(0.5))
    thresholds, dice = m.dice_curve()
    assert thresholds.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert dice[:3].tolist() == [0.0, 0.0, 0.0] and np.isnan(dice[3])


def test_dice_by_hand():
    # Bins of 0.25; lesion voxels at 0.9, 0.6, 0.1; normal at 0.7, 0.2, 0.2.
    m = StreamingBinaryMetrics(0.0, 1.0, n_bins=4)
    m.update(np.array([0.9, 0.6, 0.1, 0.7, 0.2, 0.2]), np.array([1, 1, 1, 0, 0, 0]))
    # >= 0.75: tp 1 fp 0 -> 2/4; >= 0.5: tp 2 fp 1 -> 4/6; >= 0.25 same; >= 0: tp 3 fp 3 -> 6/9.
    _, dice = m.dice_curve()
    assert dice == pytest.approx([6 / 9, 4 / 6, 4 / 6, 2 / 4])
    best, threshold, iou = m.dice_max()
    assert best == pytest.approx(2 / 3) and threshold == 0.0 and iou == pytest.approx(3 / 6)
    assert m.dice_at(0.5) == pytest.approx(4 / 6)
    assert m.dice_at(0.75) == pytest.approx(0.5)


def test_curves_by_hand():
    s = np.array([0.1, 0.5, 0.5, 0.9])
    y = np.array([0, 1, 0, 1])
    fpr, tpr, thresholds = patient_roc_curve(s, y)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert thresholds.tolist() == [np.inf, 0.9, 0.5, 0.1]
    assert np.trapezoid(tpr, fpr) == pytest.approx(patient_auroc(s, y))
    recall, precision, _ = patient_pr_curve(s, y)
    assert recall.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert precision == pytest.approx([1.0, 1.0, 2 / 3, 0.5])
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(patient_average_precision(s, y))
    with pytest.raises(ValueError, match="both classes"):
        patient_roc_curve(s, np.zeros(4, bool))
    with pytest.raises(ValueError, match="positive"):
        patient_pr_curve(s, np.zeros(4, bool))


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_curves_match_sklearn(seed):
    s, y = data(seed, n=2000)
    s = np.round(s, 1)  # ties, each inside one bin
    low, high = s.min() - 0.05, s.max() + 0.05
    m = StreamingBinaryMetrics(low, high, n_bins=round(float((high - low) / 0.1)))
    m.update(s, y)
    fpr, tpr, _ = m.roc_curve()
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    recall, precision, _ = m.pr_curve()
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    _, want_r, _ = precision_recall_curve(y, s)
    # scikit-learn lists the same operating points, low threshold first, plus the (1, 0) end.
    assert np.allclose(np.sort(recall[1:]), np.sort(want_r[:-1]))
    with pytest.raises(ValueError, match="both classes"):
        StreamingBinaryMetrics(0.0, 1.0).roc_curve()
