"""The lesion bounds' calibration rules (``tools/calibrate_lesion_bounds.py``)."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from codegraph3d.run.config import load_config
from fixtures import load_tool


def _tool() -> ModuleType:
    return load_tool("calibrate_lesion_bounds")


def test_the_pooled_bound_allows_that_many_normals_in_all_batches_together() -> None:
    tool = _tool()
    evidence = np.array([0.0, 8.4, 2.6, 0.0, 12.2, 1.5])
    assert tool.evidence_bound(evidence, 1) == 8.4  # only 12.2 exceeds it
    assert tool.evidence_bound(evidence, 0) == 12.2
    assert tool.evidence_bound(evidence[:1], 1) == 0.0  # fewer normals than allowed: any evidence


def test_the_per_batch_bound_allows_that_many_normals_in_every_batch() -> None:
    tool = _tool()
    batches = [np.array([0.0, 2.2, 1.1]), np.array([8.4, 2.6, 0.7]), np.array([6.0, 5.1, 3.3, 2.1])]
    bound = tool.per_batch_bound(batches, 1)
    assert bound == 5.1
    assert all(int(np.sum(values > bound)) <= 1 for values in batches)
    # Pooled, one normal of all three batches: a far higher bound.
    assert tool.evidence_bound(np.concatenate(batches), 1) == 6.0
    assert tool.per_batch_bound([], 1) == 0.0


def test_the_batch_mean_dice_weighs_a_small_lesion_batch_as_much_as_a_large_one() -> None:
    tool = _tool()
    # A batch of large gliomas segmented well and one of small metastases segmented poorly.
    gliomas = (900, 100, 100, 12.0, 12.0)  # Dice 0.9
    metastases = (10, 10, 30, 0.2, 0.4)  # Dice 1/3
    row = tool.dice_row([gliomas, metastases], ["gliomas", "metastases"])
    assert row["per_batch"] == {"gliomas": 0.9, "metastases": 0.333}
    assert row["mean_batch_dice"] == round((0.9 + 1 / 3) / 2, 3)
    # Pooled over voxels the gliomas outvote the metastases.
    assert row["dice"] == round(2 * 910 / (2 * 910 + 110 + 130), 3)
    assert row["mask_ml_per_lesion_ml"] == round(12.2 / 12.4, 2)


def test_the_calibrated_bound_holds_everywhere_with_no_rim_or_small_batch_bound_left() -> None:
    tool = _tool()
    config = load_config(override={"threshold": {"rim_finding_mass_by_contrast": {"T2w": 4.1},
                                                 "small_batch_volumes": 16, "small_batch_finding_mass": 40.0}})
    policy = tool.with_bounds(config, "T2w", 4.5, 1.9, 3.0).threshold.lesion_policy("T2w")
    assert policy.finding_mass == 1.9 and policy.rim_bound == 1.9 and policy.for_batch(12).finding_mass == 1.9
