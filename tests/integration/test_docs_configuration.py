"""docs/CONFIGURATION.md documents every field of the shipped defaults."""

from __future__ import annotations

from fixtures import ROOT

from codegraph3d.run.config import default_config

# Mappings whose keys are the user's (contrast names, CoDeGraph's documented group of settings).
_OPEN_MAPPINGS = {
    "threshold.finding_mass_by_contrast", "threshold.token_z_by_contrast", "threshold.voxel_z_by_contrast",
    "threshold.finding_excess_by_contrast",
    "scoring.codegraph",
}


def _fields(config: dict) -> list[str]:
    names = []
    for section, values in config.items():
        for key in values:
            names.append(f"{section}.{key}")
    return names


def test_every_default_field_is_in_the_configuration_reference():
    text = (ROOT / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    missing = []
    for name in _fields(default_config()):
        if name in _OPEN_MAPPINGS and (f"`{name}`" in text or f"`{name}.*`" in text):
            continue
        # A warn/fail pair shares one row: `preprocess.brain_ml_warn`, `_fail`.
        pair = name.endswith("_fail") and f"`{name[:-len('_fail')]}_warn`, `_fail`" in text
        if f"`{name}`" not in text and not pair and f"`{name}`," not in text:
            missing.append(name)
    assert not missing, f"not in docs/CONFIGURATION.md: {missing}"
