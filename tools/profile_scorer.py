#!/usr/bin/env python3
"""Where the global MuSc scorer's time goes, against the one-sided cdist formulation and the matmul rate.

On random L2-normalised float32 tokens (``--volumes`` B x ``--tokens`` N x ``--dim`` D, one
layer), in one process with ``--threads`` torch threads (and, where the OS allows, the process
pinned to that many CPUs), this times:

* a **one-sided reference**: for every volume, ``torch.cdist`` to all other volumes' tokens, the
  minimum per other volume, the mean of the smallest 30 % (the formulation of the MuSc paper's
  released scorer, written here from its description; no code taken from it);
* the **baseline**: this product's ``musc_scores`` as it was at ``--baseline-commit`` (default:
  the scorer before the work on matmul-limited scoring), loaded from the git history, so the
  gain is measured on the same machine in the same process; skipped outside a git clone;
* today's ``musc_scores`` (each unordered pair visited once; the chosen neighbour's distance
  recomputed from the difference);
* the float32 matmul rate of this machine at the scorer's block shape, from which each
  formulation's pure matmul time follows (the reference does B (B - 1) N^2 D multiply-adds, the
  product half of that).

Each time is the median of ``--repeats`` runs (the three scorers interleaved, so a change of
load hits all of them). It prints the two ratios (today's scorer against the reference and
against the baseline) and the largest score difference to the reference; ``--profile`` adds
torch's profiler table of ``musc_scores`` (self time per operator: the pair matmuls ``addmm``,
the minima ``min``/``amin``/``gather``, the exact recomputation ``index_select``, ``sub_``,
``linalg_vector_norm``).

Usage::

    .venv/bin/python tools/profile_scorer.py [--volumes 30] [--tokens 1000] [--dim 384] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from codegraph3d.scoring.musc import musc_scores

#: The last commit before the scorer's matmul-limit work: its ``musc_scores`` is the baseline.
BASELINE_COMMIT = "ca6876a"

def one_sided_reference(tokens: torch.Tensor, k_fraction: float = 0.3) -> torch.Tensor:
    """Per-volume token scores by the one-sided formulation: ``(B, N)``."""
    n_volumes, n_tokens, dim = tokens.shape
    scores = []
    for i in range(n_volumes):
        others = torch.cat((tokens[:i], tokens[i + 1:])).reshape(-1, dim)
        nearest = torch.cdist(tokens[i], others).reshape(n_tokens, n_volumes - 1, n_tokens).amin(dim=2)
        k = int((n_volumes - 1) * k_fraction)
        scores.append(torch.topk(nearest, k, dim=1, largest=False).values.mean(dim=1))
    return torch.stack(scores)


def best_time(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The shortest wall time of ``repeats`` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def median_times(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall time of each run over ``repeats`` rounds (runs interleaved), and last results."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def baseline_scorer(commit: str) -> Callable[..., list[np.ndarray]] | None:
    """``musc_scores`` of ``codegraph3d/scoring/musc.py`` at ``commit``, or None without git history."""
    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:codegraph3d/scoring/musc.py"], cwd=root, check=True,
            capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "musc_baseline.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("musc_baseline", path)
        assert spec is not None and spec.loader is not None
        module: ModuleType = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return module.musc_scores


def pin_threads(threads: int) -> str:
    """Torch threads, and the process pinned to as many CPUs where the OS allows; says which."""
    torch.set_num_threads(threads)
    try:
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cpus)
        return f"{threads} torch thread(s) on CPUs {cpus}"
    except (AttributeError, OSError):
        return f"{threads} torch thread(s), CPUs not pinned"


def matmul_rate(rows: int, dim: int, columns: int, repeats: int = 10) -> float:
    """Float32 GFLOP/s of ``(rows x dim) @ (dim x columns)`` on this machine."""
    a, b = torch.randn(rows, dim), torch.randn(dim, columns)
    torch.mm(a, b)
    seconds, _ = best_time(lambda: [torch.mm(a, b) for _ in range(repeats)], 3)
    return repeats * 2 * rows * dim * columns / seconds / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument("--profile", action="store_true", help="add torch's profiler table")
    args = parser.parse_args(argv)
    pinned = pin_threads(args.threads)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((args.tokens, args.dim)).astype(np.float32) for _ in range(args.volumes)]
    arrays = [a / np.linalg.norm(a, axis=1, keepdims=True) for a in arrays]
    stacked = torch.from_numpy(np.stack(arrays))
    runs: dict[str, Callable[[], object]] = {
        "reference": lambda: one_sided_reference(stacked),
        "today": lambda: musc_scores(arrays, k_fraction=0.3),
    }
    baseline = baseline_scorer(args.baseline_commit)
    if baseline is not None:
        runs["baseline"] = lambda: baseline(arrays, k_fraction=0.3)
    for run in runs.values():  # warm-up: first-call allocations and thread start-up
        run()
    times, results = median_times(runs, args.repeats)
    ref = results["reference"]

    def difference(name: str) -> float:
        return max(float(np.max(np.abs(np.asarray(a) - b.numpy()))) for a, b in zip(results[name], ref))

    rate = matmul_rate(args.tokens, args.dim, 1536)
    ours_flop = args.volumes * (args.volumes - 1) / 2 * args.tokens**2 * args.dim * 2
    print(f"B = {args.volumes}, N = {args.tokens}, D = {args.dim}, {pinned}; median of {args.repeats} runs; "
          f"float32 matmul {rate:.1f} GFLOP/s")
    print(f"one-sided reference:  {times['reference']:6.2f} s (its matmuls alone {2 * ours_flop / rate / 1e9:5.2f} s)")
    if baseline is not None:
        print(f"baseline ({args.baseline_commit}):   {times['baseline']:6.2f} s; largest score difference "
              f"to the reference {difference('baseline'):.1e}")
    print(f"musc_scores (today):  {times['today']:6.2f} s (its matmuls alone {ours_flop / rate / 1e9:5.2f} s); "
          f"largest score difference to the reference {difference('today'):.1e}")
    print(f"today against the reference: {times['reference'] / times['today']:.2f}x faster")
    if baseline is not None:
        print(f"today against the baseline:  {times['baseline'] / times['today']:.2f}x faster")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            musc_scores(arrays, k_fraction=0.3)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
