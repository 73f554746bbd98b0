#!/usr/bin/env python3
"""Where the global MuSc scorer's time goes, against the one-sided cdist formulation and the matmul rate.

On random L2-normalised float32 tokens (``--volumes`` B x ``--tokens`` N x ``--dim`` D, one
layer), in one process with ``--threads`` torch threads, this times:

* a **one-sided reference**: for every volume, ``torch.cdist`` to all other volumes' tokens, the
  minimum per other volume, the mean of the smallest 30 % (the formulation of the MuSc paper's
  released scorer, written here from its description; no code taken from it);
* the product's ``musc_scores`` (each unordered pair visited once; the chosen neighbour's
  distance recomputed from the difference);
* the float32 matmul rate of this machine at the scorer's block shape, from which each
  formulation's pure matmul time follows (the reference does B (B - 1) N^2 D multiply-adds, the
  product half of that);

then prints torch's profiler table of ``musc_scores`` (self time per operator), which splits
its time into the pair matmuls (``addmm``), the row and column minima (``min``), the exact
recomputation (``index``, ``sub``, ``linalg_vector_norm``) and bookkeeping. Each time is the
best of ``--repeats`` runs.

Usage::

    .venv/bin/python tools/profile_scorer.py [--volumes 30] [--tokens 1000] [--dim 384] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from codegraph3d.scoring.musc import musc_scores


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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((args.tokens, args.dim)).astype(np.float32) for _ in range(args.volumes)]
    arrays = [a / np.linalg.norm(a, axis=1, keepdims=True) for a in arrays]
    stacked = torch.from_numpy(np.stack(arrays))
    t_ref, ref = best_time(lambda: one_sided_reference(stacked), args.repeats)
    t_ours, ours = best_time(lambda: musc_scores(arrays, k_fraction=0.3), args.repeats)
    difference = max(float(np.max(np.abs(np.asarray(a) - b.numpy()))) for a, b in zip(ours, ref))
    rate = matmul_rate(args.tokens, args.dim, 4096)
    ours_flop = args.volumes * (args.volumes - 1) / 2 * args.tokens**2 * args.dim * 2
    print(f"B = {args.volumes}, N = {args.tokens}, D = {args.dim}, {args.threads} thread(s); "
          f"float32 matmul {rate:.1f} GFLOP/s")
    print(f"one-sided reference: {t_ref:6.2f} s (its matmuls alone {2 * ours_flop / rate / 1e9:5.2f} s)")
    print(f"musc_scores:         {t_ours:6.2f} s (its matmuls alone {ours_flop / rate / 1e9:5.2f} s); "
          f"{t_ref / t_ours:.2f}x the reference; largest score difference {difference:.1e}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        musc_scores(arrays, k_fraction=0.3)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
