"""The decision policy's operating point: a measured false-flag rate, or 'not measured' and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codegraph3d.decision import operating_point as op
from codegraph3d.run.config import load_config
from codegraph3d.decision.lesion_policy import LESION_POLICY_NAME
from fixtures import ROOT


@pytest.fixture
def table(tmp_path: Path) -> Path:
    # A fresh file name per test: entries() reads each file once per process.
    return tmp_path / "operating_points.json"


def _write(path: Path, config: dict, **entry) -> None:
    settings = json.loads(json.dumps(config.decision_settings().record(entry.get("contrast", "T2w"))))
    base = {"policy": LESION_POLICY_NAME, "encoder": "intensity", "contrast": "T2w", "settings": settings,
            "flagged": 1, "normal_series": 40, "measured_on": "all-normal batches x, y"}
    path.write_text(json.dumps({"entries": [{**base, **entry}]}))


def test_a_matching_entry_gives_its_rate(table: Path):
    config = load_config(override={"encoder": {"name": "intensity"}})
    _write(table, config)
    point = op.operating_point(LESION_POLICY_NAME, "intensity", "T2w", config.decision_settings(), table)
    assert point["false_flag_rate_per_normal_series"] == pytest.approx(1 / 40)
    assert point["normal_series"] == 40 and point["flagged"] == 1 and "x, y" in point["measured_on"]


def test_other_settings_encoder_or_contrast_are_not_measured(table: Path):
    config = load_config(override={"encoder": {"name": "intensity"}})
    _write(table, config)
    other = load_config(override={"encoder": {"name": "intensity"}, "threshold": {"finding_mass": 50.0}})
    point = op.operating_point(LESION_POLICY_NAME, "intensity", "T2w", other.decision_settings(), table)
    assert point == {"false_flag_rate_per_normal_series": op.NOT_MEASURED,
                     "why_not": "measured for this policy, encoder and contrast with other settings"}
    for encoder, contrast in (("dinov2", "T2w"), ("intensity", "T1w")):
        point = op.operating_point(LESION_POLICY_NAME, encoder, contrast, config.decision_settings(), table)
        assert point["false_flag_rate_per_normal_series"] == op.NOT_MEASURED
        assert encoder in point["why_not"] and contrast in point["why_not"]


def test_a_rate_measured_without_resolution_harmonisation_does_not_hold_with_it(table: Path):
    # Smoothing every series changes the spread of normal scores, so the rate is another one.
    config = load_config(override={"encoder": {"name": "intensity"}})
    _write(table, config)
    smoothed = load_config(override={"encoder": {"name": "intensity"}, "preprocess": {"resolution_fwhm_mm": 3.0}})
    point = op.operating_point(LESION_POLICY_NAME, "intensity", "T2w", smoothed.decision_settings(), table)
    assert point["false_flag_rate_per_normal_series"] == op.NOT_MEASURED


def test_a_rate_measured_without_the_volume_level_does_not_hold_with_it(table: Path):
    # Measuring each volume from its own level flags fewer normals: the rate is another one.
    config = load_config(override={"encoder": {"name": "intensity"}})
    _write(table, config)
    levelled = load_config(override={"encoder": {"name": "intensity"}, "threshold": {"subtract_volume_level": True}})
    point = op.operating_point(LESION_POLICY_NAME, "intensity", "T2w", levelled.decision_settings(), table)
    assert point["false_flag_rate_per_normal_series"] == op.NOT_MEASURED
    measured_with_it = table.with_name("levelled.json")  # entries() caches each file it has read
    _write(measured_with_it, levelled)
    point = op.operating_point(LESION_POLICY_NAME, "intensity", "T2w", levelled.decision_settings(), measured_with_it)
    assert point["false_flag_rate_per_normal_series"] == pytest.approx(1 / 40)


def test_the_shipped_table_reads_and_names_its_measurements():
    keys = set()
    for entry in op.entries():
        assert 0 <= entry["flagged"] <= entry["normal_series"] and entry["measured_on"]
        assert set(entry["settings"]) == {"threshold", "scoring", "min_brain_fraction", "registration", "resolution_fwhm_mm"}
        # Mask-only bounds are not recorded, and no two measurements claim the same settings.
        assert not {"voxel_z", "min_finding_ml", "mask_peak_fraction"} & set(entry["settings"]["threshold"])
        key = json.dumps([entry["policy"], entry["encoder"], entry["contrast"], entry["settings"]], sort_keys=True)
        assert key not in keys, entry["measured_on"]
        keys.add(key)


def test_the_bound_of_another_contrast_does_not_matter(table: Path):
    # An entry records the bound in effect for its contrast: changing T1w's leaves T2w measured,
    # and the same bound given globally or per contrast is the same setting.
    config = load_config(override={"encoder": {"name": "intensity"},
                                   "threshold": {"finding_mass_by_contrast": {"T1w": 45.0, "T2w": 25.0}}})
    _write(table, config)
    for threshold in ({"finding_mass_by_contrast": {"T1w": 60.0, "T2w": 25.0}}, {"finding_mass": 25.0}):
        other = load_config(override={"encoder": {"name": "intensity"}, "threshold": threshold})
        point = op.operating_point(LESION_POLICY_NAME, "intensity", "T2w", other.decision_settings(), table)
        assert point["false_flag_rate_per_normal_series"] == pytest.approx(1 / 40)
    changed = load_config(override={"encoder": {"name": "intensity"},
                                    "threshold": {"finding_mass_by_contrast": {"T2w": 30.0}}})
    assert op.operating_point(LESION_POLICY_NAME, "intensity", "T2w", changed.decision_settings(), table)["false_flag_rate_per_normal_series"] \
        == op.NOT_MEASURED


def test_per_contrast_token_bounds_are_part_of_the_measured_setting_and_mask_bounds_are_not(table: Path):
    # A token bound set for T1w only leaves T2w's measurement standing; set for T2w, not. The
    # bounds that shape only the binary mask never change a flag, so they leave the rate measured.
    config = load_config(override={"encoder": {"name": "intensity"}})
    _write(table, config)
    for threshold, measured in (({"token_z_by_contrast": {"T1w": 3.0}}, True), ({"voxel_z_by_contrast": {"T1w": 4.0}}, True),
                                ({"token_z_by_contrast": {"T2w": 3.0}}, False), ({"voxel_z_by_contrast": {"T2w": 4.0}}, True),
                                ({"token_z_by_contrast": {"T2w": 4.5}}, True), ({"min_finding_ml": 0.5}, True),
                                ({"mask_peak_fraction": 0.3}, True), ({"finding_excess_by_contrast": {"T2w": 1.0}}, False)):
        other = load_config(override={"encoder": {"name": "intensity"}, "threshold": threshold})
        rate = op.operating_point(LESION_POLICY_NAME, "intensity", "T2w", other.decision_settings(), table)[
            "false_flag_rate_per_normal_series"]
        assert (rate != op.NOT_MEASURED) is measured, threshold


@pytest.mark.parametrize("name", ["demo_config.yaml", "efficientnet_config.yaml", "efficientnet_intensity_config.yaml",
                                  "efficientnet_harmonised_config.yaml", "efficientnet_levels_config.yaml"])
def test_the_shipped_configurations_have_a_measured_operating_point(name: str, monkeypatch: pytest.MonkeyPatch):
    # The shipped table must match the shipped configurations, or their runs report "not measured".
    monkeypatch.setenv("CODEGRAPH3D_CONFIG", str(ROOT / "tools" / name))
    config = load_config()
    for contrast in ("T1w", "T2w"):
        point = op.operating_point(LESION_POLICY_NAME, config.encoder.name, contrast, config.decision_settings())
        assert isinstance(point["false_flag_rate_per_normal_series"], float), point


def test_the_levels_configuration_decides_against_a_bank_as_the_intensity_configuration_does():
    # threshold.with_bank must keep tools/efficientnet_levels_config.yaml's bank decisions those measured
    # with tools/efficientnet_intensity_config.yaml: the same policy once bank mode's own settings are in place.
    import dataclasses

    levels, intensity = (load_config(override=ROOT / "tools" / f"efficientnet_{name}_config.yaml")
                         for name in ("levels", "intensity"))
    assert (levels.scoring, levels.encoder) == (intensity.scoring, intensity.encoder)
    for contrast in ("T1w", "T2w"):
        # Bank mode neither subtracts nor fits volume levels (lesion_policy's bank policy).
        banked = [dataclasses.replace(config.threshold.lesion_policy(contrast, with_bank=True),
                                      subtract_volume_level=False, fit_volume_levels=False)
                  for config in (levels, intensity)]
        assert banked[0] == banked[1], contrast
        assert levels.threshold.lesion_policy(contrast) != intensity.threshold.lesion_policy(contrast)
