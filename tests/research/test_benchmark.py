"""The benchmark on tiny sizes: its FLOP counts, its tables, and every mode's code path in seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fixtures import STRIPPED_PREPROCESS_YAML
import torch
from torch.utils.flop_counter import FlopCounterMode

from codegraph3d_research.benchmark import (
    benchmark_scorer,
    benchmark_tokeniser,
    intensity_flops_per_slice,
    main,
    musc_flops,
    plain_vit,
    random_brain_volume,
    vit_flops_per_slice,
)
from codegraph3d.features.encoders import IntensityEncoder, untrained_vit

TINY_GRID_CONFIG = STRIPPED_PREPROCESS_YAML + """\
encoder:
  patch_size: 4
tokens:
  grid_size: 8
"""


def _positive_finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("build", [
    lambda: untrained_vit("tiny", layers=(1, 2), device="cpu"),
    lambda: plain_vit("tiny", layers=(1, 2), device="cpu"),
])
def test_vit_flop_formula_matches_torch_flop_counter(build):
    encoder = build()
    slices = 3
    with FlopCounterMode(display=False) as counter:
        encoder.encode(torch.rand(slices, 1, 32, 32))
    # the counter sees the linear layers and the patch convolution; CPU attention is not
    # registered with it, so add the textbook QK^T and AV terms: 4 n^2 d per block
    n, d, blocks = (32 // 4) ** 2 + 1, 128, 2
    counted = counter.get_total_flops() + slices * blocks * 4 * n * n * d
    assert counted == slices * vit_flops_per_slice(32, 32, patch_size=4, dim=d, blocks=blocks, mlp_ratio=2)


def test_vit_l14_costs_162_gflop_per_slice():
    flops = vit_flops_per_slice(224, 224, patch_size=14, dim=1024, blocks=24, mlp_ratio=4)
    assert flops == pytest.approx(162.02e9, rel=1e-4)


def test_intensity_and_musc_counts_by_hand():
    # 224 px -> 64 bins of 3.5 px: each bin reads 4 px per axis
    assert intensity_flops_per_slice(IntensityEncoder(), 224, 224) == 256 * 256
    assert musc_flops([2, 3, 4], [5]) == 2 * 5 * (2 * 3 + 2 * 4 + 3 * 4)
    # volumes 0 and 1 share a group: their pair is never computed
    assert musc_flops([2, 3, 4], [5, 7], groups=["a", "a", "b"]) == 2 * 12 * (2 * 4 + 3 * 4)
    with pytest.raises(ValueError, match="at least 2 volumes"):
        musc_flops([5], [3])


def test_random_brain_volume_is_a_preprocessed_volume():
    image, mask = random_brain_volume(32, 4, np.random.default_rng(0))
    assert image.shape == mask.shape == (32, 32, 32) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and not image[~mask].any()
    assert 0.3 < mask.mean() < 0.5
    with pytest.raises(ValueError, match="multiple of the patch size"):
        random_brain_volume(30, 4, np.random.default_rng(0))


def test_scorer_alone_tiny():
    rows = benchmark_scorer([3, 4], tokens_per_volume=[40, 50], dim=12, layers=2, device="cpu")
    assert [r.batch_size for r in rows] == [3, 4]
    first = rows[0]
    # sizes cycle 40, 50, 40: pairs 40*50 + 40*40 + 50*40, two layers of width 12
    assert first.flops == 2 * 12 * 2 * (2000 + 1600 + 2000)
    assert first.k == 1 and first.peak_gpu_mb is None
    assert all(_positive_finite(r.seconds) for r in rows)
    with pytest.raises(ValueError, match="at least 2"):
        benchmark_scorer([1], tokens_per_volume=10, dim=4, device="cpu")


def test_tokeniser_plain_implementation_tiny():
    result = benchmark_tokeniser(encoder="untrained-tiny", implementation="plain", layers=(1, 2), volumes=1,
                                 grid_size=8, device="cpu")
    assert result.implementation == "plain-torch" and result.encoder == "plain-tiny"
    assert len(result.volume_seconds) == 1 and all(_positive_finite(s) for s in result.volume_seconds)
    assert all(0 < s <= 3 * 32 for s in result.slices_per_volume)
    assert result.token_dim == 3 * 128 and result.n_layers == 2


def test_cohort_benchmark_cli_tiny(tmp_path: Path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_GRID_CONFIG, encoding="utf-8")
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    report = main([
        "--n", "3", "--matrix-scale", "0.3", "--config", str(config), "--device", "cpu",
        "--scorer-sizes", "3", "--scorer-tokens", "30", "--scorer-dim", "12", "--matmul-size", "128",
        "--out", str(md), "--out", str(js),
    ])
    cohort = report.cohort
    assert cohort is not None and cohort.n_scored == 3 and cohort.encoder == "intensity"
    for name in ("scan_headers", "load_pixels", "preprocess", "tokenise", "score", "write"):
        assert _positive_finite(cohort.stages[name]), name
    assert cohort.extraction_s == pytest.approx(
        sum(cohort.stages[k] for k in ("scan_headers", "load_pixels", "preprocess", "tokenise")))
    assert cohort.total_s == pytest.approx(cohort.extraction_s + cohort.scoring_s)
    assert cohort.per_volume_s == pytest.approx(cohort.total_s / 3)
    for value in (cohort.peak_rss_mb, cohort.slices_encoded, cohort.tokeniser_flops, cohort.scorer_flops):
        assert _positive_finite(value)
    assert cohort.peak_gpu_mb is None and cohort.slice_size == 32 and cohort.token_dims == [48]
    assert set(cohort.preprocess_steps) >= {"skull_strip", "registration", "resample", "standardise"}
    assert sum(cohort.preprocess_steps.values()) <= cohort.stages["preprocess"] + 1e-6
    text = md.read_text(encoding="utf-8")
    assert "Preprocessing steps (bias correction none, skull stripping none" in text
    for column in ("extraction (s)", "scoring (s)", "total (s)", "s / volume", "peak RSS (MB)", "peak GPU (MB)",
                   "slices/s", "GFLOP/s", "Scorer alone", "Load average"):
        assert column in text, column
    data = json.loads(js.read_text(encoding="utf-8"))
    assert data["cohort"]["n_scored"] == 3 and data["scorer"][0]["batch_size"] == 3
    assert data["matmul"][0]["flops_per_s"] > 0


def test_gpu_table_path_on_cpu_tiny(tmp_path: Path):
    out = tmp_path / "gpu.md"
    report = main([
        "--gpu-table", "--device", "cpu", "--encoder", "untrained-tiny", "--patch-size", "4",
        "--grid-size", "8", "--layers", "1", "2", "--tokenise-volumes", "2", "--scorer-sizes", "3", "4",
        "--matmul-size", "128", "--out", str(out),
    ])
    assert report.tokeniser is not None and report.tokeniser.implementation == "transformers"
    assert [r.batch_size for r in report.gpu_rows] == [3, 4]
    row = report.gpu_rows[1]
    assert row.extraction_s == pytest.approx(4 * report.tokeniser.seconds_per_volume)
    assert row.total_s == pytest.approx(row.extraction_s + report.scorer[1].seconds)
    assert report.scorer[0].layers == 2 and report.scorer[0].dim == 3 * 128
    text = out.read_text(encoding="utf-8")
    assert "extrapolated" in text and "Table 6" in text and "TFLOP/s" in text


def test_encoder_only_cli_tiny():
    report = main(["--encoder-only", "--encoder", "untrained-tiny", "--slices", "4", "--size", "16",
                   "--batch-size", "2", "--device", "cpu", "--matmul-size", "128"])
    assert report.encoder is not None and report.encoder.n_slices == 4
    assert _positive_finite(report.encoder.seconds) and _positive_finite(report.encoder.flops_per_slice)


def test_cli_rejects_an_unknown_output_format(tmp_path: Path):
    with pytest.raises(SystemExit):
        main(["--skip-cohort", "--out", str(tmp_path / "table.txt")])
