"""The flag statistics compared offline (``tools/compare_evidence_rules.py``)."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from codegraph3d.decision.lesion_policy import LesionPolicy
from fixtures import load_tool


def _tool() -> ModuleType:
    return load_tool("compare_evidence_rules")


def _volume(tool: ModuleType, z: list[float], coords: list[tuple[int, int, int]], lesion: bool = False,
            batch: str = "b", token_ml: float = 1.0) -> object:
    return tool.Volume(batch, "T2w", lesion, np.array(z, float), np.array(coords, int), token_ml)


def test_the_group_mass_is_the_products_evidence_and_its_focality_test() -> None:
    tool = _tool()
    # Two touching tokens above 4.5 (one group), one far away.
    volume = _volume(tool, [6.0, 5.0, 6.0, 1.0], [(4, 4, 4), (5, 5, 5), (12, 12, 12), (0, 0, 0)], token_ml=0.5)
    assert tool.group_mass(volume, 4.5, 4.5) == pytest.approx((1.5 + 0.5) * 0.5)
    # Focal: the pair averages 1.0 above the bound, the lone token 1.5.
    assert tool.group_mass(volume, 4.5, 4.5, excess=1.2) == pytest.approx(1.5 * 0.5)
    assert tool.group_mass(volume, 4.5, 4.5, excess=3.0) == 0.0


def test_a_lower_group_bound_gathers_the_tokens_around_a_peak_but_needs_the_peak() -> None:
    tool = _tool()
    volume = _volume(tool, [5.0, 4.0, 4.0], [(4, 4, 4), (4, 4, 5), (4, 4, 6)])
    assert tool.group_mass(volume, 4.5, 4.5) == pytest.approx(0.5)
    assert tool.group_mass(volume, 3.5, 4.5) == pytest.approx(1.5 + 0.5 + 0.5)
    assert tool.group_mass(volume, 3.5, 5.5) == 0.0  # no token peaks above 5.5


def test_tfce_sums_extent_and_height_over_the_heights_below_each_token() -> None:
    tool = _tool()
    lone = _volume(tool, [1.1], [(3, 3, 3)])
    heights = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    assert tool.tfce_peak(lone, 0.5, 2.0, 0.2) == pytest.approx(float(np.sum(heights**2 * 0.2)))
    pair = _volume(tool, [1.1, 1.1], [(3, 3, 3), (3, 3, 4)])
    assert tool.tfce_peak(pair, 0.5, 2.0, 0.2) == pytest.approx(np.sqrt(2) * tool.tfce_peak(lone, 0.5, 2.0, 0.2))


def test_every_statistic_is_held_to_the_products_number_of_tuning_normals() -> None:
    tool = _tool()
    rng = np.random.default_rng(0)
    coords = [(i, j, 8) for i in range(4, 12) for j in range(4, 12)]

    def volume(lesion: bool, batch: str) -> object:
        z = rng.normal(0.0, 1.0, len(coords))
        if lesion:
            z[:3] = [9.0, 8.0, 7.5]
        return _volume(tool, list(z), coords, lesion, batch)

    tune = [volume(i < 4, "t") for i in range(12)]
    held = [volume(i < 4, f"h{i % 2}") for i in range(12)]
    rules = {"product": lambda v: tool.group_mass(v, 4.5, 4.5), "largest z": lambda v: float(np.max(v.z))}
    rows = tool.compare(tune, held, rules, product_bound=1.0)
    product, largest = rows
    assert product["bound"] == 1.0
    assert product["tuning"]["normal"] == largest["tuning"]["normal"]
    assert largest["tuning"]["lesion"] == "4/4" and largest["held_out"]["lesion"] == "4/4"
    assert largest["held_out"]["worst_batch"] <= 4


def test_exceedance_by_depth_counts_normal_tokens_only() -> None:
    tool = _tool()
    inner = [(i, j, k) for i in range(2, 9) for j in range(2, 9) for k in range(2, 9)]
    z = np.zeros(len(inner))
    z[inner.index((5, 5, 5))] = 7.0  # deep inside
    normal = _volume(tool, list(z), inner)
    lesion = _volume(tool, list(np.full(len(inner), 9.0)), inner, lesion=True)
    table = tool.depth_exceedance([normal, lesion])
    assert table[3]["above 6"] == pytest.approx(1 / table[3]["tokens"])
    assert table[1]["above 4.5"] == 0.0  # the lesion volume's tokens are not counted
    assert sum(row["tokens"] for row in table.values()) == len(inner)


def test_the_products_evidence_holds_rim_groups_to_the_rim_bound() -> None:
    tool = _tool()
    policy = LesionPolicy(token_z=4.5, finding_mass=1.0, rim_finding_mass=4.0)
    coords = [(i, j, k) for i in range(8) for j in range(8) for k in range(8)]
    z = np.zeros(len(coords))
    z[coords.index((0, 4, 4))] = 7.0  # at the grid's outer layer: mass 2.5
    (volume,) = tool.with_rim([_volume(tool, list(z), coords)])
    assert volume.rim[coords.index((0, 4, 4))] and not volume.rim[coords.index((4, 4, 4))]
    assert tool.product_evidence(volume, policy) < policy.finding_mass  # its 2.5 does not reach the rim's 4.0
    inner = z.copy()
    inner[coords.index((0, 4, 4))], inner[coords.index((4, 4, 4))] = 0.0, 7.0
    (inside,) = tool.with_rim([_volume(tool, list(inner), coords)])
    assert tool.product_evidence(inside, policy) == pytest.approx(2.5)
    assert tool.flagged_at_rim([volume, inside], LesionPolicy(token_z=4.5, finding_mass=1.0)) == {
        "normal": "1 of 2 at the rim", "lesion": "0 of 0 at the rim"}
