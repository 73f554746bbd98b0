"""Speed and memory of the pipeline's stages, and of the encoder and scorer alone, on this machine.

Three modes (``python -m codegraph3d_research.benchmark --help``):

* **cohort** (default): N synthetic volumes as a DICOM cohort (:func:`codegraph3d_research.synthetic.make_cohort`,
  one contrast, generated in a child process so that its memory does not count), then the real
  stage functions: header scan and selection (:mod:`codegraph3d.run.pipeline`), per series pixel
  loading, preprocessing and tokenisation (each timed on its own), MuSc scoring
  (:func:`~codegraph3d.run.pipeline.score_batches`) and the SEG/report writer
  (:func:`~codegraph3d.run.report.write_results`). It prints the paper's Table 6 columns for this
  machine (extraction = load + preprocess + tokenise, scoring, total, seconds per volume, peak RSS,
  peak GPU memory), per-stage times, encoder slices per second and the achieved FLOP rates.
  Followed by the **scorer alone** on random token sets of the real sizes.
* ``--gpu-table``: no DICOM; random volumes generated already on the ``S^3`` working grid (224^3)
  with an ellipsoid brain of about 1500 kept tokens; the tokeniser runs on a few volumes (ViT-L/14
  by default, bf16 autocast on CUDA) and its per-volume time is extrapolated to B = 30 and 180;
  the scorer runs for real on random token sets of those volumes' sizes. This is the script of
  ``tools/gpu_benchmark.sh``.
* ``--encoder-only``: the encoder on random slices (slices per second), e.g. the untrained ViT-L/14
  on CPU, where a whole volume would take half an hour.

FLOP counts (multiply-adds count 2)
-----------------------------------
ViT (:func:`vit_flops_per_slice`), per slice with ``n = (H/p)(W/p) + 1`` tokens (CLS), width
``d``, MLP ratio ``r``, ``L`` blocks run (blocks after the deepest used one are removed)::

    patch embedding   2 (H/p)(W/p) (3 p^2) d
    per block         qkv 6 n d^2 + attention scores 2 n^2 d + attention x values 2 n^2 d
                      + output projection 2 n d^2 + MLP 4 r n d^2
                      = (8 + 4 r) n d^2 + 4 n^2 d      (~ 2 x parameters x tokens + 4 n^2 d)

LayerNorm, GELU, softmax, position-embedding interpolation and the tokeniser's pooling and
projection are elementwise or small and not counted. ViT-L/14 on a 224^2 slice: 162 GFLOP.

Intensity encoder (:func:`intensity_flops_per_slice`): one add per pixel read by the adaptive
average pooling (plus the context layer's, when enabled). It is memory-bound (about 0.25 FLOP per
byte read), so its FLOP rate is given for completeness, not as a fraction of the matmul rate.

MuSc global scoring (:func:`musc_flops`): the distance block of each unordered pair of eligible
volumes is computed once (``addmm``), ``2 N_i N_j D`` per pair and per layer; the row and column
minima, the exact recomputation of the chosen neighbours (``3 D`` per token and reference)
and the top-K are not counted. Windowed scoring is not counted (its cost is gathers, not matmul).

Machine rate (:func:`measure_matmul_rate`): a square float32 ``torch.matmul`` on the device (and
bf16 on CUDA), timed after warm-up; the tokeniser on CUDA (bf16 autocast) is compared with the
bf16 rate, everything else with float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codegraph3d.features.encoders import (
    inference_autocast,
    vit_pixels,
    UNTRAINED_WARNING,
    VIT_VARIANTS,
    Dinov2Encoder,
    IntensityEncoder,
    SliceEncoder,
    _validate_layers,
    load_encoder,
    resolve_device,
)
from codegraph3d.core.progress import peak_rss_mb
from codegraph3d.scoring.batch import score_batch
from codegraph3d.scoring.musc import k_for_references, reference_sets, scoring_memory
from codegraph3d.features.tokens import TokenSet, encode_volume, project, tokenise

if TYPE_CHECKING:
    # For annotations only: the cohort stages import their modules where they run, so that
    # --gpu-table runs without pydicom, SimpleITK and highdicom.
    from codegraph3d.io.selection import SeriesDecision
    from codegraph3d.preprocess.chain import PreprocessConfig
    from codegraph3d.preprocess.workers import PreprocessModels
    from codegraph3d.run.config import RunConfig
    from codegraph3d.run.pipeline import Scoring, Selection, StageTimer, TokenisedSeries

__all__ = [
    "BenchmarkReport",
    "CohortBenchmark",
    "EncoderBenchmark",
    "GpuTableRow",
    "MatmulRate",
    "PlainViTEncoder",
    "ScorerBenchmark",
    "TokeniserBenchmark",
    "benchmark_cohort",
    "benchmark_encoder",
    "benchmark_scorer",
    "benchmark_tokeniser",
    "encoded_slices",
    "encoder_flops_per_slice",
    "gpu_table_rows",
    "intensity_flops_per_slice",
    "machine_description",
    "main",
    "measure_matmul_rate",
    "musc_flops",
    "plain_vit",
    "plain_vit_l14",
    "random_brain_volume",
    "render_markdown",
    "vit_flops_per_slice",
]

logger = logging.getLogger(__name__)

#: Slices of one 224^3 volume: 3 axes x 224 (before skipping slabs without kept tokens).
_AXES = 3
#: Semi-axes of the random volumes' ellipsoid brain, as fractions of the grid edge: about 1500
#: kept tokens of 16^3 (measured: 1536 at these values; the paper's brains keep ~40 % of 4096).
_BRAIN_SEMI_AXES = (0.47, 0.49, 0.46)


# --------------------------------------------------------------------------------------------
# small helpers


def _check_positive_int(label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{label} must be a positive integer; got {value!r}")
    return int(value)


def _synchronise(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: host, CPU, torch, threads, GPU."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    return info


# --------------------------------------------------------------------------------------------
# FLOP counts


def vit_flops_per_slice(
    height: int,
    width: int,
    *,
    patch_size: int,
    dim: int,
    blocks: int,
    mlp_ratio: float = 4.0,
    channels: int = 3,
    prefix_tokens: int = 1,
) -> float:
    """Matmul FLOPs of one ViT forward pass on one ``height x width`` slice (see module docstring).

    Parameters
    ----------
    height, width : int
        Slice size in pixels, multiples of ``patch_size``.
    patch_size : int
        Patch side ``p``.
    dim : int
        Token width ``d``.
    blocks : int
        Transformer blocks actually run.
    mlp_ratio : float
        MLP hidden width over ``d``.
    channels : int
        Input channels of the patch embedding (3: grey slices are replicated to RGB).
    prefix_tokens : int
        CLS (and register) tokens added to the patch tokens.

    Returns
    -------
    float
        ``2 (H/p)(W/p) 3 p^2 d + blocks ((8 + 4 r) n d^2 + 4 n^2 d)``, ``n = (H/p)(W/p) + prefix``.
    """
    for label, value in (("height", height), ("width", width), ("patch_size", patch_size),
                         ("dim", dim), ("blocks", blocks), ("channels", channels)):
        _check_positive_int(label, value)
    if height % patch_size or width % patch_size:
        raise ValueError(f"slice {height}x{width} is not a multiple of the patch size {patch_size}")
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be positive; got {mlp_ratio!r}")
    if isinstance(prefix_tokens, bool) or prefix_tokens < 0:
        raise ValueError(f"prefix_tokens must be a non-negative integer; got {prefix_tokens!r}")
    patches = (height // patch_size) * (width // patch_size)
    n = patches + prefix_tokens
    embedding = 2.0 * patches * channels * patch_size**2 * dim
    per_block = (8.0 + 4.0 * mlp_ratio) * n * dim**2 + 4.0 * n**2 * dim
    return embedding + blocks * per_block


def _adaptive_pool_reads(size_in: int, size_out: int) -> int:
    """Input samples read along one axis by ``adaptive_avg_pool`` (bins may overlap by a pixel)."""
    return sum(
        math.ceil((i + 1) * size_in / size_out) - (i * size_in) // size_out for i in range(size_out)
    )


def intensity_flops_per_slice(encoder: IntensityEncoder, height: int, width: int) -> float:
    """Adds of the intensity encoder's pooling on one slice: one per pixel read into a bin.

    The fine layer pools the slice to ``(H/p q) x (W/p q)``; the optional context layer pools
    each patch's ``3p x 3p`` neighbourhood to ``q x q`` (its unfold is a copy, not arithmetic).
    """
    p, q = encoder.patch_size, encoder.pooled
    grid_h, grid_w = height // p, width // p
    flops = float(_adaptive_pool_reads(height, grid_h * q) * _adaptive_pool_reads(width, grid_w * q))
    if encoder.context:
        flops += grid_h * grid_w * float(_adaptive_pool_reads(3 * p, q) ** 2)
    return flops


def encoder_flops_per_slice(encoder: SliceEncoder, height: int, width: int) -> tuple[float | None, str]:
    """FLOPs of one slice through ``encoder`` and how they were counted.

    Returns
    -------
    flops : float or None
        None for an encoder type this module does not know how to count.
    note : str
        The formula used, or why nothing was counted.
    """
    if isinstance(encoder, Dinov2Encoder):
        config = encoder.model.config
        flops = vit_flops_per_slice(
            height, width, patch_size=encoder.patch_size, dim=encoder.dim,
            blocks=len(encoder.model.encoder.layer), mlp_ratio=float(config.mlp_ratio),
        )
        return flops, "ViT matmuls: (8 + 4r) n d^2 + 4 n^2 d per block + patch embedding"
    if isinstance(encoder, PlainViTEncoder):
        flops = vit_flops_per_slice(
            height, width, patch_size=encoder.patch_size, dim=encoder.dim,
            blocks=encoder.blocks_run, mlp_ratio=encoder.mlp_ratio,
        )
        return flops, "ViT matmuls: (8 + 4r) n d^2 + 4 n^2 d per block + patch embedding"
    if isinstance(encoder, IntensityEncoder):
        return (
            intensity_flops_per_slice(encoder, height, width),
            "pooling adds, 1 per pixel read: memory-bound, not comparable with the matmul rate",
        )
    return None, f"FLOPs of {type(encoder).__name__} not counted"


def musc_flops(
    sizes: Sequence[int],
    dims: Sequence[int],
    groups: Sequence[Any] | None = None,
) -> float:
    """Matmul FLOPs of global MuSc on one batch: ``sum_layers sum_pairs 2 N_i N_j D``.

    Parameters
    ----------
    sizes : sequence of int
        Tokens per volume ``N_i``.
    dims : sequence of int
        Token width ``D`` of each layer scored.
    groups : sequence, optional
        Reference groups (volumes of one group are never compared, so their pair costs nothing).

    Returns
    -------
    float
        Over unordered eligible pairs: the scorer computes each pair's distance block once and
        takes both its row and its column minima.
    """
    sizes = [_check_positive_int("token count", n) for n in sizes]
    dims = [_check_positive_int("token width", d) for d in dims]
    if len(sizes) < 2:
        raise ValueError(f"MuSc needs at least 2 volumes; got {len(sizes)}")
    refs = reference_sets(len(sizes), groups)
    pair_products = sum(sizes[i] * sizes[j] for i, r in enumerate(refs) for j in r if j > i)
    return float(2.0 * pair_products * sum(dims))


# --------------------------------------------------------------------------------------------
# machine rate


@dataclass
class MatmulRate:
    """A timed square matrix product on one device.

    Attributes
    ----------
    device : str
    dtype : str
        ``"float32"`` or ``"bfloat16"``.
    size : int
        Edge ``n`` of the ``n x n`` operands (``2 n^3`` FLOPs per product).
    seconds : float
        Mean wall-clock seconds per product.
    """

    device: str
    dtype: str
    size: int
    seconds: float

    @property
    def flops_per_s(self) -> float:
        return 2.0 * self.size**3 / self.seconds


def measure_matmul_rate(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    repeats: int | None = None,
) -> MatmulRate:
    """Time a large square ``torch.matmul`` on ``device``: the machine's achievable matmul rate.

    Parameters
    ----------
    device : str or torch.device
        Where to compute (``"auto"`` allowed).
    dtype : torch.dtype
        ``torch.float32`` or ``torch.bfloat16``.
    size : int, optional
        Operand edge; default 2048 on CPU (about 17 GFLOP, a fraction of a second on 2 cores) and
        8192 on CUDA (1.1 TFLOP: far past launch overhead).
    repeats : int, optional
        Timed products after 1 (CPU) or 3 (CUDA) warm-ups; default 3 on CPU, 10 on CUDA.
    """
    dev = resolve_device(device)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16; got {dtype}")
    cuda = dev.type == "cuda"
    size = _check_positive_int("size", size if size is not None else (8192 if cuda else 2048))
    repeats = _check_positive_int("repeats", repeats if repeats is not None else (10 if cuda else 3))
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dev, dtype)
    b = torch.randn(size, size, generator=generator).to(dev, dtype)
    with torch.inference_mode():
        for _ in range(3 if cuda else 1):
            torch.matmul(a, b)
        _synchronise(dev)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        _synchronise(dev)
        seconds = (time.perf_counter() - start) / repeats
    return MatmulRate(device=str(dev), dtype=str(dtype).replace("torch.", ""), size=size, seconds=seconds)


# --------------------------------------------------------------------------------------------
# a self-contained ViT (no transformers), of the same size and cost as DINOv2's


class _Block(nn.Module):
    """Pre-norm transformer block with LayerScale, as in DINOv2 (fused qkv, GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        hidden = int(dim * mlp_ratio)
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.ls1 * self.proj(attended.transpose(1, 2).reshape(n, t, d))
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _PlainViT(nn.Module):
    def __init__(self, *, dim: int, blocks: int, heads: int, mlp_ratio: float, patch_size: int,
                 image_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.position_grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.position_grid**2, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(blocks))

    def forward(self, x: torch.Tensor, keep: Sequence[int]) -> list[torch.Tensor]:
        """Outputs (patch tokens only) of the 1-based blocks ``keep``."""
        tokens = self.patch_embed(x)  # (n, d, gh, gw)
        n, d, gh, gw = tokens.shape
        # DINOv2 interpolates its 37x37 position grid to the input's grid on every call: so do we
        grid = self.pos_embed[:, 1:].reshape(1, self.position_grid, self.position_grid, d).permute(0, 3, 1, 2)
        if (gh, gw) != (self.position_grid, self.position_grid):
            grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(grid.dtype)
        positions = torch.cat([self.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        hidden = torch.cat([self.cls_token.expand(n, -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1) + positions
        wanted = set(keep)
        outputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks, start=1):
            hidden = block(hidden)
            if index in wanted:
                outputs[index] = hidden[:, 1:]
        return [outputs[index] for index in keep]


class PlainViTEncoder(SliceEncoder):
    """A randomly initialised DINOv2-size ViT in plain torch: the speed of ViT-L/14 without transformers.

    Same interface, preprocessing (grey -> 3 channels, ImageNet normalisation), bf16 autocast on
    CUDA, layer selection and dropping of unused blocks as :class:`~codegraph3d.features.encoders.Dinov2Encoder`;
    the blocks are DINOv2's (pre-norm, fused qkv, SDPA attention, GELU MLP, LayerScale). Used by
    the GPU benchmark where ``transformers`` is missing or fails; never by the app.

    Build with :func:`plain_vit` or :func:`plain_vit_l14`.
    """

    normalisation: Literal["l2", "none"] = "l2"

    def __init__(self, variant: str, *, seed: int = 0, layers: Any = None,
                 device: str | torch.device = "auto") -> None:
        if variant not in VIT_VARIANTS:
            raise ValueError(f"unknown ViT variant {variant!r}; choose one of {sorted(VIT_VARIANTS)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer; got {seed!r}")
        spec = VIT_VARIANTS[variant]
        self.layers = _validate_layers(layers, spec["num_hidden_layers"])
        self.blocks_run = max(self.layers)
        self.mlp_ratio = float(spec["mlp_ratio"])
        self.device = resolve_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _PlainViT(
                dim=spec["hidden_size"], blocks=self.blocks_run, heads=spec["num_attention_heads"],
                mlp_ratio=self.mlp_ratio, patch_size=spec["patch_size"], image_size=spec["image_size"],
            )
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
            nn.init.trunc_normal_(model.pos_embed, std=0.02)
            nn.init.normal_(model.cls_token, std=1e-6)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.name = f"plain-{variant}"
        self.pretrained = False
        self.weights_sha256 = None
        self.patch_size = int(spec["patch_size"])
        self.dim = int(spec["hidden_size"])
        self.layer_names = [f"block{layer}" for layer in self.layers]
        self.description = (
            f"{UNTRAINED_WARNING} (plain-torch {variant} of DINOv2's architecture, seed {seed})"
        )

    def encode(self, slices: torch.Tensor) -> list[torch.Tensor]:
        """Encode slices; see :meth:`SliceEncoder.encode`."""
        x = self._check_slices(slices)
        n, _, height, width = x.shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        x = vit_pixels(x)
        with torch.inference_mode(), inference_autocast(self.device):
            outputs = self.model(x, self.layers)
        return [out.float().reshape(n, grid_h, grid_w, self.dim) for out in outputs]


def plain_vit(variant: str = "tiny", seed: int = 0, *, layers: Any = None,
              device: str | torch.device = "auto") -> PlainViTEncoder:
    """A seeded plain-torch ViT of one of :data:`~codegraph3d.features.encoders.VIT_VARIANTS`."""
    return PlainViTEncoder(variant, seed=seed, layers=layers, device=device)


def plain_vit_l14(seed: int = 0, *, layers: Any = (6, 12, 18, 24),
                  device: str | torch.device = "auto") -> PlainViTEncoder:
    """A seeded plain-torch ViT-L/14 (24 blocks, 1024 wide, 16 heads): DINOv2 ViT-L/14's cost."""
    return PlainViTEncoder("vit-l14", seed=seed, layers=layers, device=device)


# --------------------------------------------------------------------------------------------
# results


@dataclass
class CohortBenchmark:
    """The pipeline's stages on a generated DICOM cohort (Table 6 columns and more).

    Attributes
    ----------
    stages : dict
        Seconds per stage, in run order: ``scan_headers``, ``select``, ``load_encoder``,
        ``load_pixels``, ``preprocess``, ``tokenise``, ``score``, ``write``.
    extraction_s : float
        ``scan_headers + load_pixels + preprocess + tokenise``.
    scoring_s, total_s : float
        ``score``; ``extraction_s + scoring_s`` (the paper's Table 6 convention: no writing).
    slices_encoded : int
        Slices that went through the encoder (slabs with no kept token are skipped).
    tokeniser_flops, scorer_flops : float or None
        Counted as in the module docstring; None when not countable.
    """

    encoder: str
    encoder_description: str
    device: str
    contrast: str
    n_volumes: int
    n_scored: int
    matrix_scale: float
    grid_size: int
    window_radius: int
    stages: dict[str, float]
    extraction_s: float
    scoring_s: float
    total_s: float
    per_volume_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    slices_encoded: int
    slice_size: int
    tokens_per_volume: float
    token_dims: list[int]
    tokeniser_flops: float | None
    tokeniser_flops_note: str
    scorer_flops: float | None
    load_average_start: tuple[float, float, float]
    load_average_end: tuple[float, float, float]
    preprocess_steps: dict[str, float] = field(default_factory=dict)
    preprocess_description: str = ""


def _preprocess_description(config: Any) -> str:
    return (
        f"bias correction {config.bias_correction}, skull stripping {config.skull_strip}, registration "
        f"{config.registration}, {config.interpolation} resampling, intensity {config.intensity_scaling}"
    )


@dataclass
class ScorerBenchmark:
    """Global MuSc on random token sets of given sizes (the scorer alone)."""

    batch_size: int
    tokens_per_volume: float
    dim: int
    layers: int
    k: int
    device: str
    seconds: float
    flops: float
    peak_gpu_mb: float | None
    load_average_end: tuple[float, float, float]
    window_radius: int | None = None
    estimate_mb: float | None = None  # codegraph3d.scoring.musc.scoring_memory, one layer
    rss_before_mb: float | None = None  # resident memory with the token sets loaded
    peak_rss_mb: float | None = None  # process peak after scoring (run one B per process)


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _ball_coords(n_tokens: int, grid: int = 16) -> np.ndarray:
    """The ``n_tokens`` grid positions nearest the centre: a brain-like ball of kept tokens."""
    if n_tokens > grid**3:
        raise ValueError(f"{n_tokens} tokens do not fit a {grid}^3 grid")
    axes = np.indices((grid,) * 3).reshape(3, -1).T
    order = np.argsort(((axes - (grid - 1) / 2) ** 2).sum(axis=1), kind="stable")
    return np.ascontiguousarray(axes[order[:n_tokens]], dtype=np.int64)


@dataclass
class TokeniserBenchmark:
    """The tokeniser on random ``S^3`` volumes (no DICOM, no preprocessing)."""

    encoder: str
    encoder_description: str
    implementation: str
    implementation_note: str
    device: str
    size: int
    grid_size: int
    batch_size: int
    volume_seconds: list[float]
    slices_per_volume: list[int]
    tokens_per_volume: list[int]
    token_dim: int
    n_layers: int
    flops_per_slice: float | None
    flops_note: str
    peak_gpu_mb: float | None

    @property
    def seconds_per_volume(self) -> float:
        return float(np.mean(self.volume_seconds))


@dataclass
class EncoderBenchmark:
    """The encoder alone on random slices."""

    encoder: str
    encoder_description: str
    device: str
    n_slices: int
    size: int
    batch_size: int
    build_s: float
    seconds: float
    flops_per_slice: float | None
    flops_note: str
    peak_gpu_mb: float | None


@dataclass
class GpuTableRow:
    """One Table 6 row of the GPU table: extraction extrapolated, scoring measured."""

    batch_size: int
    extraction_s: float
    scoring_s: float
    peak_gpu_mb: float | None
    peak_rss_mb: float

    @property
    def total_s(self) -> float:
        return self.extraction_s + self.scoring_s

    @property
    def per_volume_s(self) -> float:
        return self.total_s / self.batch_size


@dataclass
class BenchmarkReport:
    """Everything one ``python -m codegraph3d_research.benchmark`` run measured."""

    started: str
    machine: dict[str, Any]
    load_average_start: tuple[float, float, float]
    load_average_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    matmul: list[MatmulRate] = field(default_factory=list)
    cohort: CohortBenchmark | None = None
    scorer: list[ScorerBenchmark] = field(default_factory=list)
    tokeniser: TokeniserBenchmark | None = None
    gpu_rows: list[GpuTableRow] = field(default_factory=list)
    encoder: EncoderBenchmark | None = None
    peak_rss_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content, derived rates included."""
        data = dataclasses.asdict(self)
        data["matmul"] = [dict(dataclasses.asdict(m), flops_per_s=m.flops_per_s) for m in self.matmul]
        data["gpu_rows"] = [
            dict(dataclasses.asdict(r), total_s=r.total_s, per_volume_s=r.per_volume_s) for r in self.gpu_rows
        ]
        if self.tokeniser is not None:
            data["tokeniser"]["seconds_per_volume"] = self.tokeniser.seconds_per_volume
        return data


# --------------------------------------------------------------------------------------------
# cohort benchmark


def encoded_slices(tokens: TokenSet, patch_size: int) -> int:
    """Slices :func:`codegraph3d.features.tokens.tokenise` ran through the encoder for ``tokens``.

    Per axis it encodes the ``patch_size`` slices of every slab holding a kept cube, i.e. of every
    distinct coordinate of the kept tokens along that axis.
    """
    _check_positive_int("patch_size", patch_size)
    return int(patch_size * sum(np.unique(tokens.coords[:, axis]).size for axis in range(_AXES)))


_COHORT_CHILD = """
import json, sys
from codegraph3d_research.synthetic import make_cohort
args = json.loads(sys.argv[1])
make_cohort(args["folder"], n_subjects=args["n"], seed=args["seed"], contrasts=(args["contrast"],),
            matrix_scale=args["matrix_scale"], with_localizer_fraction=0.0)
"""


def _make_cohort_in_child(folder: Path, n_volumes: int, seed: int, matrix_scale: float, contrast: str) -> None:
    """Generate the cohort in a child interpreter: its memory must not count as the pipeline's peak.

    A plain subprocess rather than multiprocessing, whose spawn start re-imports ``__main__``
    (which fails for ``python -`` and unguarded scripts).
    """
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    arguments = json.dumps({"folder": str(folder), "n": n_volumes, "seed": seed,
                            "matrix_scale": matrix_scale, "contrast": contrast})
    completed = subprocess.run([sys.executable, "-c", _COHORT_CHILD, arguments], env=env,
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"cohort generation failed (exit {completed.returncode}): {completed.stderr.strip()[-2000:]}")


def _benchmark_config(
    encoder: str, device: str, contrast: str, config_override: Mapping[str, Any] | str | Path | None
) -> dict[str, Any]:
    from codegraph3d.run.config import load_config

    return load_config(override=config_override).with_overrides({
        "encoder": {"name": encoder, "device": device}, "scoring": {"device": device},
        "selection": {"scored_contrasts": [contrast]},
    }, "<benchmark>")


def _check_cohort_arguments(n_volumes: int, matrix_scale: float) -> int:
    """Validate :func:`benchmark_cohort`'s sizes before anything is generated.

    Returns
    -------
    int
        ``n_volumes`` as an int.

    Raises
    ------
    ValueError
        For fewer than two volumes or a matrix scale outside ``[0.05, 2]``.
    """
    n_volumes = _check_positive_int("n_volumes", n_volumes)
    if n_volumes < 2:
        raise ValueError(f"n_volumes must be at least 2 (batch scoring needs references); got {n_volumes}")
    if not 0.05 <= float(matrix_scale) <= 2.0:
        raise ValueError(f"matrix_scale must be in [0.05, 2]; got {matrix_scale!r}")
    return n_volumes


@dataclass
class _CohortRun:
    """What the timed stages of :func:`benchmark_cohort` leave behind for the figures."""

    timer: StageTimer
    selection: Selection
    encoder: SliceEncoder
    preprocess_config: PreprocessConfig
    records: list[TokenisedSeries]
    step_seconds: dict[str, float]
    scoring: Scoring
    peak_gpu_mb: float | None


def _tokenise_series(
    decision: SeriesDecision,
    config: RunConfig,
    models: PreprocessModels,
    slice_encoder: SliceEncoder,
    timer: StageTimer,
    dev: torch.device,
    step_seconds: dict[str, float],
) -> TokenisedSeries:
    """Load, preprocess and tokenise one series as ``pipeline._prepare_one`` does, each stage timed.

    The preprocessing steps' seconds are added to ``step_seconds``.

    Returns
    -------
    TokenisedSeries
        The series' tokens, its working image released.
    """
    # DICOM and preprocessing need pydicom and SimpleITK, which the GPU machine lacks: imported
    # here, not at module level, so that --gpu-table runs there
    from codegraph3d.io.dicom import load_series_volume
    from codegraph3d.preprocess.chain import preprocess_volume
    from codegraph3d.run.pipeline import TokenisedSeries

    token_settings = config.tokens
    with timer("load_pixels"):
        loaded = load_series_volume(decision.series)
    loaded.volume.series_instance_uid = decision.series_instance_uid
    with timer("preprocess"):
        prepared = preprocess_volume(
            loaded.volume, models.config, models.template, stripper=models.stripper,
            reference=models.references.get(decision.contrast),
        )
    for step, seconds in prepared.qa["step_seconds"].items():
        step_seconds[step] = step_seconds.get(step, 0.0) + seconds
    with timer("tokenise"):
        encoded = encode_volume(
            prepared.image, prepared.brain_mask, slice_encoder,
            grid_size=token_settings.grid_size,
            min_brain_fraction=token_settings.min_brain_fraction,
            batch_size=config.encoder.batch_size,
        )
        tokens = project(
            encoded,
            projection_dim=token_settings.projection_dim,
            projection_seed=token_settings.projection_seed,
        )
        _synchronise(dev)
    prepared.image = np.zeros((0, 0, 0), np.float32)  # as the pipeline does: bound memory
    return TokenisedSeries(
        decision=decision, datasets=loaded.datasets, prepared=prepared, tokens=tokens,
        qa={"brain_volume_ml": round(prepared.brain_volume_ml, 2), "tokens_kept": tokens.n_tokens},
    )


def _run_cohort_stages(
    cohort: Path, output: Path, config: RunConfig, dev: torch.device, model_path: str | Path | None
) -> _CohortRun:
    """Run every stage of the pipeline on ``cohort`` under one timer; write the results to ``output``.

    Returns
    -------
    _CohortRun
        The timer, the selection, the tokenised series and the scoring.

    Raises
    ------
    ValueError
        When a series was not scored.
    """
    # Header scanning, preprocessing models and SEG writing need pydicom, SimpleITK and highdicom,
    # which the GPU machine lacks: imported here, not at module level, so that --gpu-table runs there
    from codegraph3d.preprocess.workers import PreprocessModels
    from codegraph3d.run.pipeline import (
        StageTimer,
        Tokenisation,
        build_encoder,
        preprocess_setup,
        scan_input,
        score_batches,
        select_input,
    )
    from codegraph3d.run.report import write_results

    _reset_gpu_peak(dev)
    timer = StageTimer()
    with timer("scan_headers"):
        scan = scan_input(cohort / "dicom" if (cohort / "dicom").is_dir() else cohort)
    with timer("select"):
        selection = select_input(scan, config)
    with timer("load_encoder"):
        slice_encoder = build_encoder(config, None)
    with timer("load_preprocess_models"):
        models = PreprocessModels(preprocess_setup(config, model_path, workers=1))
    step_seconds: dict[str, float] = {}
    records = [_tokenise_series(decision, config, models, slice_encoder, timer, dev, step_seconds)
               for decision in selection.taken]
    tokenisation = Tokenisation(series=records, skipped={}, encoder=slice_encoder.identity())
    with timer("score"):
        scoring = score_batches(tokenisation, config)
        _synchronise(dev)
    if scoring.skipped:
        raise ValueError(f"{len(scoring.skipped)} series were not scored: {scoring.skipped}")
    write_results(scoring, selection, output, config, timer)
    return _CohortRun(timer=timer, selection=selection, encoder=slice_encoder, preprocess_config=models.config,
                      records=records, step_seconds=step_seconds, scoring=scoring, peak_gpu_mb=_gpu_peak_mb(dev))


def _cohort_scorer_flops(scoring: Scoring, config: RunConfig) -> float | None:
    """Global MuSc's distance FLOPs over the scored batches; ``None`` for windowed scoring.

    Windowed scoring's cost is gathers, not matmuls, so it is not counted.
    """
    from codegraph3d.run.pipeline import reference_groups

    if int(config.scoring.window_radius) >= 0:
        return None
    scorer_flops = 0.0
    for batch in scoring.batches:
        groups = reference_groups([m.decision for m in batch.members], config.scoring.exclude_same)
        scorer_flops += musc_flops(
            [m.tokens.n_tokens for m in batch.members],
            [layer.shape[1] for layer in batch.members[0].tokens.tokens],
            groups,
        )
    return scorer_flops


def _cohort_result(
    measured: _CohortRun, config: RunConfig, dev: torch.device, contrast: str, matrix_scale: float,
    load_start: tuple[float, float, float],
) -> CohortBenchmark:
    """The Table 6 columns, stage times and FLOP counts of a cohort run.

    Raises
    ------
    ValueError
        When fewer series were scored than selected (a partial batch would mislead).
    """
    timer, records, slice_encoder = measured.timer, measured.records, measured.encoder
    stages = {name: timer.seconds.get(name, 0.0) for name in (
        "scan_headers", "select", "load_encoder", "load_pixels", "preprocess", "tokenise", "score", "write")}
    n_scored = sum(len(batch.members) for batch in measured.scoring.batches)
    n_volumes = len(measured.selection.taken)
    if n_scored != n_volumes:
        raise ValueError(f"{n_scored} of {n_volumes} selected series were scored; the benchmark needs all")
    # Table 6's extraction: everything before scoring except selection and start-up.
    extraction = stages["scan_headers"] + stages["load_pixels"] + stages["preprocess"] + stages["tokenise"]
    size = config.tokens.grid_size * slice_encoder.patch_size
    slices = sum(encoded_slices(r.tokens, slice_encoder.patch_size) for r in records)
    per_slice, note = encoder_flops_per_slice(slice_encoder, size, size)
    scorer_flops = _cohort_scorer_flops(measured.scoring, config)
    return CohortBenchmark(
        encoder=slice_encoder.name,
        encoder_description=slice_encoder.description,
        device=str(dev),
        contrast=contrast,
        n_volumes=n_volumes,
        n_scored=n_scored,
        matrix_scale=matrix_scale,
        grid_size=int(config.tokens.grid_size),
        window_radius=int(config.scoring.window_radius),
        stages=stages,
        extraction_s=extraction,
        scoring_s=stages["score"],
        total_s=extraction + stages["score"],
        per_volume_s=(extraction + stages["score"]) / n_scored,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_mb=measured.peak_gpu_mb,
        slices_encoded=slices,
        slice_size=size,
        tokens_per_volume=float(np.mean([r.tokens.n_tokens for r in records])),
        token_dims=[int(layer.shape[1]) for layer in records[0].tokens.tokens],
        tokeniser_flops=None if per_slice is None else per_slice * slices,
        tokeniser_flops_note=note,
        scorer_flops=scorer_flops,
        preprocess_steps=measured.step_seconds,
        preprocess_description=_preprocess_description(measured.preprocess_config),
        load_average_start=load_start,
        load_average_end=_load_average(),
    )


def benchmark_cohort(
    *,
    n_volumes: int = 8,
    encoder: str = "intensity",
    seed: int = 0,
    device: str = "auto",
    contrast: str = "T2w",
    matrix_scale: float = 1.0,
    config_override: Mapping[str, Any] | str | Path | None = None,
    cohort_dir: str | Path | None = None,
    model_path: str | Path | None = None,
) -> CohortBenchmark:
    """Time every stage of the pipeline on a generated single-contrast DICOM cohort.

    The stages are the pipeline's own functions; pixel loading, preprocessing and tokenisation are
    called here per series as ``pipeline._prepare_one`` calls them (``load_series_volume``,
    ``preprocess_volume`` with the configuration's ``preprocess.chain``, then
    ``encode_volume`` and ``project``: the "tokenise" stage), so that each is timed on its own,
    which the app's combined ``preprocess_and_tokenise`` stage does not do. No token cache is used:
    this measures a cold run.

    Parameters
    ----------
    n_volumes : int
        Subjects to generate, one series each (at least 2: scoring needs references); with
        ``cohort_dir``, the selected series of that cohort are used instead.
    encoder : str
        Encoder name (overrides the configuration's ``encoder.name``).
    seed : int
        Cohort seed.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``: the encoder's and the scorer's device.
    contrast : {"T2w", "T1w"}
    matrix_scale : float
        Matrix size factor of the generated series (1.0: the demo's 1.0-1.2 mm in-plane).
    config_override : mapping or path, optional
        Configuration fields to change (as the app's override file), e.g. a small token grid;
        applied after ``CODEGRAPH3D_CONFIG`` when that is set, as in the app.
    cohort_dir : path, optional
        Use this existing cohort (its ``dicom/`` folder) instead of generating one.
    model_path : path, optional
        Model folder (registration template, landmarks), as the app's ``-m``; needed when the
        configuration registers. Preprocessing runs in this process, one series at a time, so
        that its steps (N4, skull stripping, registration, resampling, standardisation) are
        timed one by one (``preprocess_steps``).

    Raises
    ------
    ValueError
        For arguments out of range, or when a series could not be tokenised or scored (a benchmark
        of a partial batch would be misleading).
    """
    n_volumes = _check_cohort_arguments(n_volumes, matrix_scale)
    config = _benchmark_config(encoder, device, contrast, config_override)
    dev = resolve_device(device)
    load_start = _load_average()
    with tempfile.TemporaryDirectory(prefix="codegraph3d-benchmark-") as scratch:
        if cohort_dir is None:
            cohort = Path(scratch) / "cohort"
            _make_cohort_in_child(cohort, n_volumes, seed, float(matrix_scale), contrast)
        else:
            cohort = Path(cohort_dir)
        measured = _run_cohort_stages(cohort, Path(scratch) / "output", config, dev, model_path)
    return _cohort_result(measured, config, dev, contrast, float(matrix_scale), load_start)


# --------------------------------------------------------------------------------------------
# scorer alone


def _random_token_sets(
    sizes: Sequence[int], dim: int, layers: int, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    return [[rng.standard_normal((n, dim), dtype=np.float32) for n in sizes] for _ in range(layers)]


def benchmark_scorer(
    batch_sizes: Sequence[int] = (30,),
    *,
    tokens_per_volume: int | Sequence[int] = 1500,
    dim: int = 384,
    layers: int = 1,
    device: str = "auto",
    seed: int = 0,
    k_fraction: float = 0.3,
    chunk_size: int = 4096,
    window_radius: int | None = None,
) -> list[ScorerBenchmark]:
    """Time MuSc (:func:`codegraph3d.scoring.batch.score_batch`) on random float32 token sets.

    The cost does not depend on the token values (every pair block is computed, minima and top-K
    are data-independent), so random Gaussian tokens measure the real scorer at the real sizes.

    Parameters
    ----------
    batch_sizes : sequence of int
        Volumes per batch ``B`` (each at least 2).
    tokens_per_volume : int or sequence of int
        ``N`` for every volume, or one ``N`` per volume cycled over the batch (measured sizes).
    dim : int
        Token width ``D`` (384 = 3 axes x 128 for ViTs).
    layers : int
        Layers scored (4 for ViT-L/14 at blocks 6/12/18/24).
    device, chunk_size, k_fraction
        As in :func:`codegraph3d.scoring.musc.musc_scores`.
    window_radius : int, optional
        ``None``: global matching. An integer: windowed matching on a 16^3 grid, every volume's
        tokens at the grid positions nearest the centre (a brain-like ball).

    Peak memory: each row records the resident memory with the token sets loaded and the
    process's peak afterwards; run one batch size per process for a clean difference
    (``tools/measure_scoring_scale.sh``), and compare it with the scorer's own estimate.
    """
    if isinstance(tokens_per_volume, (int, np.integer)) and not isinstance(tokens_per_volume, bool):
        cycle = [_check_positive_int("tokens_per_volume", tokens_per_volume)]
    else:
        cycle = [_check_positive_int("tokens_per_volume", n) for n in tokens_per_volume]
        if not cycle:
            raise ValueError("tokens_per_volume must not be empty")
    dim = _check_positive_int("dim", dim)
    layers = _check_positive_int("layers", layers)
    dev = resolve_device(device)
    rows: list[ScorerBenchmark] = []
    for batch_size in batch_sizes:
        batch_size = _check_positive_int("batch size", batch_size)
        if batch_size < 2:
            raise ValueError(f"batch sizes must be at least 2; got {batch_size}")
        sizes = [cycle[i % len(cycle)] for i in range(batch_size)]
        sets = _random_token_sets(sizes, dim, layers, np.random.default_rng([seed, batch_size]))
        windowed = {}
        if window_radius is not None:
            windowed = dict(window_radius=window_radius, coords=[_ball_coords(n) for n in sizes], grid_shape=(16, 16, 16))
        estimate = scoring_memory(
            sizes, dim, chunk_size=chunk_size, window_radius=window_radius,
            grid_shape=(16, 16, 16) if window_radius is not None else None, accelerator=dev.type != "cpu",
        )
        rss_before = _current_rss_mb()
        _reset_gpu_peak(dev)
        _synchronise(dev)
        start = time.perf_counter()
        score_batch(sets, k_fraction=k_fraction, device=dev, chunk_size=chunk_size, **windowed)
        _synchronise(dev)
        seconds = time.perf_counter() - start
        rows.append(ScorerBenchmark(
            batch_size=batch_size, tokens_per_volume=float(np.mean(sizes)), dim=dim, layers=layers,
            k=k_for_references(batch_size - 1, k_fraction), device=str(dev), seconds=seconds,
            flops=musc_flops(sizes, [dim] * layers) if window_radius is None else 0.0, peak_gpu_mb=_gpu_peak_mb(dev),
            load_average_end=_load_average(), window_radius=window_radius, estimate_mb=estimate.total / 2**20,
            rss_before_mb=rss_before, peak_rss_mb=peak_rss_mb(),
        ))
        del sets
    return rows


def measure_selection_precision(
    n_volumes: int = 6, tokens_per_volume: int = 1000, dim: int = 384, seed: int = 0, device: str = "cpu",
) -> list[dict[str, Any]]:
    """How often TF32 neighbour selection changes the chosen neighbour, and by how much.

    Two token models: iid Gaussian, and clustered (every token a 1 % perturbation of one of 20
    shared centres, so that a token has many nearly equidistant candidates in every volume). Returns per model the fraction of (token, reference
    volume) nearest distances that differ from float32 selection and the largest relative increase.
    On CPU TF32 is emulated by input rounding (:func:`codegraph3d.scoring.musc.selection_precision`).
    """
    from codegraph3d.scoring.musc import nearest_distances, selection_precision

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    models = {
        "gaussian": [rng.standard_normal((tokens_per_volume, dim)).astype(np.float32) for _ in range(n_volumes)],
        "clustered": [
            (centres[rng.integers(0, len(centres), tokens_per_volume)]
             + 0.01 * rng.standard_normal((tokens_per_volume, dim))).astype(np.float32)
            for _ in range(n_volumes)
        ],
    }
    rows = []
    for name, sets in models.items():
        with selection_precision("float32"):
            reference = nearest_distances(sets, device=device).astype(np.float64)
        with selection_precision("tf32"):
            fast = nearest_distances(sets, device=device).astype(np.float64)
        finite = np.isfinite(reference)
        relative = (fast[finite] - reference[finite]) / reference[finite]
        rows.append({
            "tokens": name, "volumes": n_volumes, "tokens_per_volume": tokens_per_volume, "dim": dim,
            "device": str(device), "changed_fraction": float(np.mean(relative > 1e-7)),
            "max_relative_increase": float(relative.max()), "min_relative_change": float(relative.min()),
        })
    return rows


# --------------------------------------------------------------------------------------------
# tokeniser on random working-grid volumes (the GPU table) and the encoder alone


def random_brain_volume(size: int, patch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random preprocessed volume: uniform noise inside an ellipsoid "brain", 0 outside.

    The ellipsoid's semi-axes are :data:`_BRAIN_SEMI_AXES` times the edge, each shrunk by up to
    4 % at random, so volumes keep different token counts like real brains (about 1400-1550 of a
    16^3 grid). Values are in ``[0, 1]``, as after preprocessing; content does not change a ViT's
    cost.

    Returns
    -------
    image : numpy.ndarray
        ``(size, size, size)`` float32.
    mask : numpy.ndarray
        Boolean, same shape.
    """
    size = _check_positive_int("size", size)
    if size % _check_positive_int("patch_size", patch_size):
        raise ValueError(f"size {size} is not a multiple of the patch size {patch_size}")
    centre = (size - 1) / 2.0
    semi = np.array(_BRAIN_SEMI_AXES) * size * rng.uniform(0.96, 1.0, size=3)
    z, y, x = np.ogrid[:size, :size, :size]
    mask = ((z - centre) / semi[0]) ** 2 + ((y - centre) / semi[1]) ** 2 + ((x - centre) / semi[2]) ** 2 <= 1.0
    image = rng.random((size, size, size), dtype=np.float32)
    image *= mask
    return image, mask


def _tokeniser_encoder(
    name: str, implementation: str, *, layers: Any, device: str, seed: int, patch_size: int | None,
    grid_size: int,
) -> tuple[SliceEncoder, str, str]:
    """Build the benchmark's encoder; with ``auto``, fall back to the plain ViT if transformers fails.

    The fallback exists for the GPU machine, whose transformers version differs from the
    development machine's and which cannot be tried beforehand: one failed import or forward pass
    must not cost the whole run.
    """
    if implementation not in ("auto", "transformers", "plain"):
        raise ValueError(f"implementation must be auto, transformers or plain; got {implementation!r}")
    vit = name.startswith("untrained-")
    if not vit and implementation == "plain":
        raise ValueError(f"the plain implementation exists for untrained ViTs only, not {name!r}")
    if implementation in ("auto", "transformers") or not vit:
        try:
            options: dict[str, Any] = {"device": device, "patch_size": patch_size}
            if name != "intensity":
                options.update(layers=layers, seed=seed)
            encoder = load_encoder(name, **options)
            probe = grid_size * encoder.patch_size
            encoder.encode(torch.rand(2, 1, probe, probe))
            return encoder, "transformers" if vit else "codegraph3d", ""
        except (ImportError, AttributeError, RuntimeError, TypeError, ValueError) as error:
            if implementation == "transformers" or not vit:
                raise
            note = f"transformers path failed ({type(error).__name__}: {error}); plain-torch ViT used"
            logger.warning(note)
    else:
        note = "plain-torch ViT requested"
    variant = name[len("untrained-"):]
    if variant not in VIT_VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; choose one of {sorted(VIT_VARIANTS)}")
    if patch_size is not None and patch_size != VIT_VARIANTS[variant]["patch_size"]:
        raise ValueError(f"the plain-torch {variant} has patch size {VIT_VARIANTS[variant]['patch_size']}; "
                         f"got patch_size={patch_size}")
    encoder = plain_vit(variant, seed, layers=layers, device=device)
    return encoder, "plain-torch", note


def benchmark_tokeniser(
    *,
    encoder: str = "untrained-vit-l14",
    implementation: str = "auto",
    layers: Any = (6, 12, 18, 24),
    volumes: int = 8,
    grid_size: int = 16,
    patch_size: int | None = None,
    projection_dim: int = 128,
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
) -> TokeniserBenchmark:
    """Time :func:`codegraph3d.features.tokens.tokenise` on random volumes of the working grid.

    One encoder call on a full batch of slices runs first and is not timed (kernel selection and
    first-call allocations are not throughput). Each volume is then timed on its own.

    Parameters
    ----------
    encoder : str
        An encoder name of :func:`codegraph3d.features.encoders.load_encoder` (not ``dinov2``: no weights).
    implementation : {"auto", "transformers", "plain"}
        For untrained ViTs: the product's transformers-based encoder, or :class:`PlainViTEncoder`;
        ``auto`` tries the first and falls back to the second.
    layers : sequence of int
        1-based blocks (ignored for ``intensity``).
    volumes : int
        Volumes tokenised and timed.
    grid_size, projection_dim, batch_size
        As in the configuration (16, 128, 16).
    patch_size : int, optional
        For ``untrained-tiny`` and ``intensity`` only.
    """
    volumes = _check_positive_int("volumes", volumes)
    grid_size = _check_positive_int("grid_size", grid_size)
    batch_size = _check_positive_int("batch_size", batch_size)
    dev = resolve_device(device)
    if dev.type == "cpu" and encoder in ("untrained-vit-l14", "untrained-vit-b14"):
        # measured: ViT-L/14 encodes 0.38 slices/s on a 2-core CPU, ~30 min per volume
        logger.warning("tokenising %d volumes with %s on the CPU takes tens of minutes per volume; "
                       "use --encoder-only for a CPU speed figure", volumes, encoder)
    slice_encoder, implementation_used, note = _tokeniser_encoder(
        encoder, implementation, layers=None if encoder == "intensity" else layers, device=str(dev),
        seed=seed, patch_size=patch_size, grid_size=grid_size,
    )
    size = grid_size * slice_encoder.patch_size
    rng = np.random.default_rng(seed)
    _reset_gpu_peak(dev)
    slice_encoder.encode(torch.rand(batch_size, 1, size, size))  # warm-up, untimed
    _synchronise(dev)
    seconds: list[float] = []
    slices: list[int] = []
    tokens_kept: list[int] = []
    token_dim = 0
    for _ in range(volumes):
        image, mask = random_brain_volume(size, slice_encoder.patch_size, rng)
        _synchronise(dev)
        start = time.perf_counter()
        tokens = tokenise(image, mask, slice_encoder, grid_size=grid_size, projection_dim=projection_dim,
                          batch_size=batch_size)
        _synchronise(dev)
        seconds.append(time.perf_counter() - start)
        slices.append(encoded_slices(tokens, slice_encoder.patch_size))
        tokens_kept.append(tokens.n_tokens)
        token_dim = int(tokens.tokens[0].shape[1])
    per_slice, flops_note = encoder_flops_per_slice(slice_encoder, size, size)
    return TokeniserBenchmark(
        encoder=slice_encoder.name, encoder_description=slice_encoder.description,
        implementation=implementation_used, implementation_note=note, device=str(dev), size=size,
        grid_size=grid_size, batch_size=batch_size, volume_seconds=seconds, slices_per_volume=slices,
        tokens_per_volume=tokens_kept, token_dim=token_dim, n_layers=len(slice_encoder.layer_names),
        flops_per_slice=per_slice, flops_note=flops_note, peak_gpu_mb=_gpu_peak_mb(dev),
    )


def gpu_table_rows(
    tokeniser: TokeniserBenchmark, scorer: Sequence[ScorerBenchmark]
) -> list[GpuTableRow]:
    """Table 6 rows: ``B x`` the measured seconds per volume of tokenisation, plus measured scoring."""
    rows = []
    for row in scorer:
        peaks = [p for p in (tokeniser.peak_gpu_mb, row.peak_gpu_mb) if p is not None]
        rows.append(GpuTableRow(
            batch_size=row.batch_size,
            extraction_s=row.batch_size * tokeniser.seconds_per_volume,
            scoring_s=row.seconds,
            peak_gpu_mb=max(peaks) if peaks else None,
            peak_rss_mb=peak_rss_mb(),
        ))
    return rows


def benchmark_encoder(
    encoder: str = "untrained-vit-l14",
    *,
    n_slices: int = 32,
    size: int = 224,
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
) -> EncoderBenchmark:
    """Slices per second of an encoder on random ``size^2`` slices (the former tools/encoder_speed.py).

    The untrained ViT-L/14 has the size and cost of DINOv2 ViT-L/14, so its speed is the
    production speed. One slice is encoded first, untimed (first-call allocations).
    """
    n_slices = _check_positive_int("n_slices", n_slices)
    size = _check_positive_int("size", size)
    batch_size = _check_positive_int("batch_size", batch_size)
    dev = resolve_device(device)
    started = time.perf_counter()
    options: dict[str, Any] = {"device": str(dev)}
    if encoder != "intensity":
        options["seed"] = seed
    slice_encoder = load_encoder(encoder, **options)
    build = time.perf_counter() - started
    generator = torch.Generator().manual_seed(seed)
    slices = torch.rand(n_slices, 1, size, size, generator=generator)
    _reset_gpu_peak(dev)
    slice_encoder.encode(slices[:1])
    _synchronise(dev)
    start = time.perf_counter()
    for first in range(0, n_slices, batch_size):
        slice_encoder.encode(slices[first:first + batch_size])
    _synchronise(dev)
    seconds = time.perf_counter() - start
    per_slice, note = encoder_flops_per_slice(slice_encoder, size, size)
    return EncoderBenchmark(
        encoder=slice_encoder.name, encoder_description=slice_encoder.description, device=str(dev),
        n_slices=n_slices, size=size, batch_size=batch_size, build_s=build, seconds=seconds,
        flops_per_slice=per_slice, flops_note=note, peak_gpu_mb=_gpu_peak_mb(dev),
    )


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: float | None, digits: int = 3) -> str:
    """Numbers for tables: ``digits`` significant figures, no exponent for ordinary sizes."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def _rate(flops: float | None, seconds: float) -> float | None:
    return None if flops is None or seconds <= 0 else flops / seconds


def _fraction(rate: float | None, peak: MatmulRate | None) -> str:
    if rate is None or peak is None:
        return "n/a"
    return f"{100.0 * rate / peak.flops_per_s:.1f} % of {peak.dtype} matmul"


def _peak_for(report: BenchmarkReport, dtype: str) -> MatmulRate | None:
    return next((m for m in report.matmul if m.dtype == dtype), None)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _machine_lines(report: BenchmarkReport) -> list[str]:
    """The title and what the figures were measured on (machine, load, peak memory)."""
    m = report.machine
    return [
        "## CoDeGraph3D benchmark",
        "",
        f"Measured {report.started} on {m['host']}: {m['cpu']}, {m['cpu_count']} CPUs, "
        f"torch {m['torch']} ({m['torch_threads']} threads, float32 matmul precision "
        f"{m['float32_matmul_precision']}), device {m['device']}"
        + (f" ({m['gpu']}, {m['gpu_memory_gb']} GB)" if "gpu" in m else "") + ".",
        (f"Load average (1/5/15 min, as `uptime`): {', '.join(map(str, report.load_average_start))} "
         f"at the start, {', '.join(map(str, report.load_average_end))} at the end. "
         f"Peak RSS of the process: {_fmt(report.peak_rss_mb)} MB."),
        "",
    ]


def _matmul_lines(matmul: Sequence[MatmulRate]) -> list[str]:
    """The machine's matmul rates, against which the achieved rates are set."""
    lines = ["Machine matmul rate (square `torch.matmul`, mean of timed products after warm-up):", ""]
    lines += _table(
        ["device", "dtype", "n", "seconds / product", "GFLOP/s"],
        [[r.device, r.dtype, str(r.size), _fmt(r.seconds), _fmt(r.flops_per_s / 1e9)] for r in matmul],
    )
    lines.append("")
    return lines


def _cohort_stage_lines(cohort: CohortBenchmark) -> list[str]:
    """The cohort's seconds per pipeline stage and, when measured, per preprocessing step."""
    labels = {
        "scan_headers": "load: header scan", "select": "select", "load_encoder": "build encoder",
        "load_pixels": "load: pixels", "preprocess": "preprocess", "tokenise": "tokenise",
        "score": "score", "write": "write (SEGs, report.json)",
    }
    lines = _table(
        ["stage", "seconds", "s / volume"],
        [[labels[name], _fmt(seconds), _fmt(seconds / cohort.n_scored)] for name, seconds in cohort.stages.items()],
    )
    if cohort.preprocess_steps:
        lines += ["", f"Preprocessing steps ({cohort.preprocess_description}), one worker:", ""]
        lines += _table(
            ["step", "seconds", "s / volume"],
            [[name.replace("_", " "), _fmt(seconds), _fmt(seconds / cohort.n_scored)]
             for name, seconds in cohort.preprocess_steps.items()],
        )
    return lines


def _cohort_rate_lines(cohort: CohortBenchmark, fp32: MatmulRate | None, bf16: MatmulRate | None) -> list[str]:
    """The cohort's encoder slices and FLOP rates, set against the machine's matmul rate."""
    tokenise_s = cohort.stages["tokenise"]
    tok_rate = _rate(cohort.tokeniser_flops, tokenise_s)
    score_rate = _rate(cohort.scorer_flops, cohort.scoring_s)
    # A ViT on CUDA runs under bf16 autocast: its rate is compared with the bf16 matmul.
    tok_peak = bf16 if cohort.device.startswith("cuda") and cohort.encoder != "intensity" else fp32
    return _table(
        ["work", "count", "seconds", "achieved", "against the machine"],
        [
            ["encoder slices", f"{cohort.slices_encoded} of {cohort.slice_size}^2", _fmt(tokenise_s),
             f"{_fmt(cohort.slices_encoded / tokenise_s)} slices/s", ""],
            ["tokeniser FLOPs", f"{_fmt(cohort.tokeniser_flops / 1e9 if cohort.tokeniser_flops else None)} GFLOP",
             _fmt(tokenise_s), f"{_fmt(tok_rate / 1e9 if tok_rate else None)} GFLOP/s",
             "memory-bound (see note)" if cohort.encoder == "intensity" else _fraction(tok_rate, tok_peak)],
            ["scorer FLOPs (global MuSc)",
             f"{_fmt(cohort.scorer_flops / 1e9 if cohort.scorer_flops else None)} GFLOP",
             _fmt(cohort.scoring_s), f"{_fmt(score_rate / 1e9 if score_rate else None)} GFLOP/s",
             _fraction(score_rate, fp32)],
        ],
    )


def _cohort_lines(cohort: CohortBenchmark, fp32: MatmulRate | None, bf16: MatmulRate | None) -> list[str]:
    """The pipeline on a DICOM cohort: Table 6 columns, stages, rates."""
    lines = [
        f"### Pipeline on a generated DICOM cohort ({cohort.n_volumes} {cohort.contrast} volumes)",
        "",
        f"Encoder: {cohort.encoder_description}. Device {cohort.device}; token grid "
        f"{cohort.grid_size}^3 on a {cohort.slice_size}^3 working grid; "
        + ("global MuSc" if cohort.window_radius < 0 else f"windowed MuSc, radius {cohort.window_radius}")
        + f"; matrix scale {cohort.matrix_scale}; {_fmt(cohort.tokens_per_volume)} tokens per volume "
        f"of width {'/'.join(map(str, cohort.token_dims))}. Load average at the end: "
        f"{', '.join(map(str, cohort.load_average_end))}.",
        "",
    ]
    lines += _table(
        ["volumes", "extraction (s)", "scoring (s)", "total (s)", "s / volume", "peak RSS (MB)", "peak GPU (MB)"],
        [[str(cohort.n_scored), _fmt(cohort.extraction_s), _fmt(cohort.scoring_s), _fmt(cohort.total_s),
          _fmt(cohort.per_volume_s), _fmt(cohort.peak_rss_mb),
          _fmt(cohort.peak_gpu_mb) if cohort.peak_gpu_mb is not None else "no GPU"]],
    )
    lines += ["", ("Extraction = header scan + pixel loading + preprocessing + tokenisation; "
                   "total = extraction + scoring (writing SEGs excluded, as in the paper's Table 6; "
                   "building the encoder is start-up, not counted)."), ""]
    lines += _cohort_stage_lines(cohort)
    lines += [""]
    lines += _cohort_rate_lines(cohort, fp32, bf16)
    lines += ["", f"Tokeniser FLOPs: {cohort.tokeniser_flops_note}. Tokenise seconds include slice "
              "extraction, pooling and projection. Scorer FLOPs: 2 N_i N_j D per unordered pair "
              "and layer" + ("." if cohort.window_radius < 0 else "; not counted for windowed scoring."), ""]
    return lines


def _tokeniser_lines(tok: TokeniserBenchmark, fp32: MatmulRate | None, bf16: MatmulRate | None) -> list[str]:
    """The tokeniser alone on random volumes: seconds, slices and FLOP rate per volume."""
    peak = bf16 if tok.device.startswith("cuda") else fp32
    per_volume = tok.seconds_per_volume
    slices = float(np.mean(tok.slices_per_volume))
    rate = _rate(None if tok.flops_per_slice is None else tok.flops_per_slice * slices, per_volume)
    lines = [
        f"### Tokeniser on random {tok.size}^3 volumes ({len(tok.volume_seconds)} volumes, no DICOM)",
        "",
        f"Encoder: {tok.encoder_description}; implementation {tok.implementation}"
        + (f" ({tok.implementation_note})" if tok.implementation_note else "")
        + f". {tok.n_layers} layers, batches of {tok.batch_size} slices"
        + (", bf16 autocast" if tok.device.startswith("cuda") and tok.encoder != "intensity" else "")
        + f"; {_fmt(float(np.mean(tok.tokens_per_volume)))} kept tokens of width {tok.token_dim} per volume.",
        "",
    ]
    lines += _table(
        ["s / volume (mean; min-max)", "slices / volume", "slices/s", "GFLOP / slice", "achieved",
         "against the machine", "peak GPU (MB)"],
        [[f"{_fmt(per_volume)} ({_fmt(min(tok.volume_seconds))}-{_fmt(max(tok.volume_seconds))})",
          _fmt(slices), _fmt(slices / per_volume),
          _fmt(tok.flops_per_slice / 1e9 if tok.flops_per_slice else None),
          f"{_fmt(rate / 1e12 if rate else None)} TFLOP/s",
          "memory-bound" if tok.encoder == "intensity" else _fraction(rate, peak),
          _fmt(tok.peak_gpu_mb) if tok.peak_gpu_mb is not None else "no GPU"]],
    )
    lines += ["", f"FLOPs: {tok.flops_note}.", ""]
    return lines


def _gpu_table_lines(rows: Sequence[GpuTableRow], tok: TokeniserBenchmark | None) -> list[str]:
    """Table 6 at the paper's batch sizes: extraction extrapolated from ``tok``, scoring measured."""
    n_tok = len(tok.volume_seconds) if tok is not None else 0
    lines = [
        "### Table 6 columns at the paper's batch sizes",
        "",
        (f"Extraction is **extrapolated**: B x the mean tokenisation time of the {n_tok} volumes above "
         "(no DICOM loading or preprocessing on this machine: those are CPU stages, see a cohort run). "
         "Scoring is **measured**: global MuSc on random token sets of the tokenised volumes' sizes."),
        "",
    ]
    lines += _table(
        ["B", "extraction (s, extrapolated)", "scoring (s, measured)", "total (s)", "s / volume",
         "peak GPU (MB)", "peak RSS (MB)"],
        [[str(r.batch_size), _fmt(r.extraction_s), _fmt(r.scoring_s), _fmt(r.total_s), _fmt(r.per_volume_s),
          _fmt(r.peak_gpu_mb) if r.peak_gpu_mb is not None else "no GPU", _fmt(r.peak_rss_mb)]
         for r in rows],
    )
    lines.append("")
    return lines


def _scorer_lines(scorer: Sequence[ScorerBenchmark], fp32: MatmulRate | None) -> list[str]:
    """The scorer alone on random tokens: one row per batch size."""
    lines = [
        "### Scorer alone (MuSc, random float32 tokens)",
        "",
    ]
    lines += _table(
        ["B", "matching", "tokens / volume", "D", "layers", "K", "device", "seconds", "GFLOP", "GFLOP/s",
         "against the machine", "peak GPU (MB)", "RSS before / peak (MB)", "estimate, one layer (MB)",
         "load at end"],
        [[str(r.batch_size), "global" if r.window_radius is None else f"window r={r.window_radius}",
          _fmt(r.tokens_per_volume), str(r.dim), str(r.layers), str(r.k), r.device,
          _fmt(r.seconds), _fmt(r.flops / 1e9) if r.flops else "-", _fmt(r.flops / r.seconds / 1e9) if r.flops else "-",
          _fraction(r.flops / r.seconds, fp32) if r.flops else "-",
          _fmt(r.peak_gpu_mb) if r.peak_gpu_mb is not None else "no GPU",
          f"{_fmt(r.rss_before_mb)} / {_fmt(r.peak_rss_mb)}", _fmt(r.estimate_mb),
          ", ".join(map(str, r.load_average_end))] for r in scorer],
    )
    lines += ["", ("FLOPs: 2 N_i N_j D per unordered pair and layer (the distance matmuls); minima, "
                   "top-K and the exact recomputation of the chosen neighbours are not counted."), ""]
    return lines


def _encoder_lines(enc: EncoderBenchmark, fp32: MatmulRate | None, bf16: MatmulRate | None) -> list[str]:
    """The encoder alone on random slices, with the minutes a whole volume would take."""
    rate = _rate(None if enc.flops_per_slice is None else enc.flops_per_slice * enc.n_slices, enc.seconds)
    peak = bf16 if enc.device.startswith("cuda") and enc.encoder != "intensity" else fp32
    # A volume is encoded along each axis: _AXES x size slices.
    volume_minutes = _AXES * enc.size * enc.seconds / enc.n_slices / 60.0
    lines = [f"### Encoder alone ({enc.n_slices} random {enc.size}^2 slices, batches of {enc.batch_size})", ""]
    lines += _table(
        ["encoder", "build (s)", "seconds", "slices/s", "GFLOP/s", "against the machine",
         f"min per volume (3 x {enc.size} slices)", "peak GPU (MB)"],
        [[enc.encoder, _fmt(enc.build_s), _fmt(enc.seconds), _fmt(enc.n_slices / enc.seconds),
          _fmt(rate / 1e9 if rate else None),
          "memory-bound" if enc.encoder == "intensity" else _fraction(rate, peak),
          _fmt(volume_minutes), _fmt(enc.peak_gpu_mb) if enc.peak_gpu_mb is not None else "no GPU"]],
    )
    lines += ["", f"Encoder: {enc.encoder_description}. FLOPs: {enc.flops_note}.", ""]
    return lines


def render_markdown(report: BenchmarkReport) -> str:
    """The report as Markdown: machine, Table 6 columns, stages, rates, scorer alone."""
    # Achieved rates are set against the measured matmul of the same precision, where measured.
    fp32, bf16 = _peak_for(report, "float32"), _peak_for(report, "bfloat16")
    lines = _machine_lines(report)
    if report.matmul:
        lines += _matmul_lines(report.matmul)
    if report.cohort is not None:
        lines += _cohort_lines(report.cohort, fp32, bf16)
    if report.tokeniser is not None:
        lines += _tokeniser_lines(report.tokeniser, fp32, bf16)
    if report.gpu_rows:
        lines += _gpu_table_lines(report.gpu_rows, report.tokeniser)
    if report.scorer:
        lines += _scorer_lines(report.scorer, fp32)
    if report.encoder is not None:
        lines += _encoder_lines(report.encoder, fp32, bf16)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m codegraph3d_research.benchmark",
        description="Speed and memory of CoDeGraph3D on this machine (Table 6 columns, stage times, "
        "FLOP rates). Default: the pipeline on a generated DICOM cohort, then the scorer alone.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu-table", action="store_true",
                      help="tokeniser on random 224^3 volumes + scorer at B = 30 and 180 (tools/gpu_benchmark.sh)")
    mode.add_argument("--encoder-only", action="store_true", help="the encoder alone on random slices")
    parser.add_argument("--encoder", default=None,
                        help="encoder name; default intensity (cohort), untrained-vit-l14 (--gpu-table, --encoder-only)")
    parser.add_argument("--n", type=int, default=8, help="cohort volumes (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--config", default=None, help="configuration override YAML, as the app's (cohort)")
    parser.add_argument("--contrast", default="T2w", choices=("T2w", "T1w"))
    parser.add_argument("--matrix-scale", type=float, default=1.0, help="cohort matrix size factor (default 1.0)")
    parser.add_argument("--skip-cohort", action="store_true", help="default mode: only the scorer alone")
    parser.add_argument("--cohort-dir", default=None,
                        help="use this existing cohort (e.g. demo/cohort) instead of generating one")
    parser.add_argument("--models", default=None,
                        help="model folder (registration template, landmarks), as the app's -m")
    parser.add_argument("--scorer-sizes", type=int, nargs="*", default=None,
                        help="batch sizes of the scorer alone; none to skip (default 30 on CPU, 30 180 on CUDA)")
    parser.add_argument("--scorer-tokens", type=int, default=1500, help="tokens per volume (scorer alone)")
    parser.add_argument("--scorer-dim", type=int, default=384, help="token width D (scorer alone)")
    parser.add_argument("--scorer-window", type=int, default=None,
                        help="window radius of the scorer alone (default: global matching)")
    parser.add_argument("--scorer-layers", type=int, default=None,
                        help="layers (scorer alone); default 1 on CPU, 4 on CUDA, the encoder's in --gpu-table")
    parser.add_argument("--tokenise-volumes", type=int, default=8, help="--gpu-table: volumes tokenised")
    parser.add_argument("--grid-size", type=int, default=16, help="--gpu-table: token grid edge")
    parser.add_argument("--patch-size", type=int, default=None, help="--gpu-table: untrained-tiny/intensity patch")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18, 24], help="--gpu-table: ViT blocks")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="--gpu-table, --encoder-only: slices per encoder call (cohort: the configuration's)")
    parser.add_argument("--vit-impl", default="auto", choices=("auto", "transformers", "plain"),
                        help="--gpu-table: transformers-based encoder, plain-torch ViT, or auto (fallback)")
    parser.add_argument("--slices", type=int, default=32, help="--encoder-only: slices encoded")
    parser.add_argument("--size", type=int, default=224, help="--encoder-only: slice edge in pixels")
    parser.add_argument("--matmul-size", type=int, default=None, help="edge of the timed matmul (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--precision-check", action="store_true",
                        help="only print how TF32 neighbour selection differs from float32 (emulated on CPU)")
    parser.add_argument("--out", action="append", default=[],
                        help="write the report to FILE.md (Markdown) or FILE.json; may be repeated")
    return parser


def _write(report: BenchmarkReport, text: str, outputs: Sequence[str]) -> None:
    for name in outputs:
        path = Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        else:
            path.write_text(text + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> BenchmarkReport:
    """Run the benchmark the arguments ask for, print its Markdown and write ``--out`` files."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.precision_check:
        device_name = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        for row in measure_selection_precision(seed=args.seed, device=device_name):
            print(json.dumps(row))
        raise SystemExit(0)
    for name in args.out:
        if Path(name).suffix not in (".md", ".json"):
            parser.error(f"--out {name}: the file must end in .md or .json")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    cuda = device.type == "cuda"
    report = BenchmarkReport(
        started=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=machine_description(device),
        load_average_start=_load_average(),
    )
    report.matmul.append(measure_matmul_rate(device, torch.float32, args.matmul_size))
    if cuda:
        report.matmul.append(measure_matmul_rate(device, torch.bfloat16, args.matmul_size))
    scorer_sizes = args.scorer_sizes if args.scorer_sizes is not None else ([30, 180] if cuda else [30])
    if args.gpu_table:
        report.tokeniser = benchmark_tokeniser(
            encoder=args.encoder or "untrained-vit-l14", implementation=args.vit_impl, layers=args.layers,
            volumes=args.tokenise_volumes, grid_size=args.grid_size, patch_size=args.patch_size,
            batch_size=args.batch_size, device=str(device), seed=args.seed,
        )
        report.scorer = benchmark_scorer(
            scorer_sizes, tokens_per_volume=report.tokeniser.tokens_per_volume,
            dim=report.tokeniser.token_dim, layers=args.scorer_layers or report.tokeniser.n_layers,
            device=str(device), seed=args.seed,
        )
        report.gpu_rows = gpu_table_rows(report.tokeniser, report.scorer)
    elif args.encoder_only:
        report.encoder = benchmark_encoder(
            args.encoder or "untrained-vit-l14", n_slices=args.slices, size=args.size,
            batch_size=args.batch_size, device=str(device), seed=args.seed,
        )
    else:
        if not args.skip_cohort:
            report.cohort = benchmark_cohort(
                n_volumes=args.n, encoder=args.encoder or "intensity", seed=args.seed, device=args.device,
                contrast=args.contrast, matrix_scale=args.matrix_scale, config_override=args.config,
                cohort_dir=args.cohort_dir, model_path=args.models,
            )
        if scorer_sizes:
            report.scorer = benchmark_scorer(
                scorer_sizes, tokens_per_volume=args.scorer_tokens, dim=args.scorer_dim,
                layers=args.scorer_layers or (4 if cuda else 1), device=str(device), seed=args.seed,
                window_radius=args.scorer_window,
            )
    report.load_average_end = _load_average()
    report.peak_rss_mb = peak_rss_mb()
    text = render_markdown(report)
    print(text)
    _write(report, text, args.out)
    return report


if __name__ == "__main__":
    main()
