#!/usr/bin/env python3
"""What reusing a cohort bank's own scores saves: one study scored against a bank, with and without them.

A study that arrives alone is scored with ``--bank`` bank volumes (:class:`BankGroup` keys: the
bank volumes reference each other only). This times the app's scorer
(:func:`codegraph3d.scoring.batch.score_batch`) on random float32 tokens laid out on a brain-like
16^3 grid (``--tokens`` positions per volume, ``--dim`` features, ``--layers`` layers):

* **fresh**: every volume scored, as a run without kept scores does (and as the first run with
  ``bank.reuse_scores`` does, which then keeps the bank volumes' part);
* **reused**: the bank volumes' scores passed in (``known_scores``), only the studies scored
  (``--queries`` of them), or every volume where that would cost more
  (:func:`codegraph3d.scoring.batch.known_scores_pay`, whose costs these figures set).

Both with global matching and with ``--window-radius`` (the learnt encoder's configuration).
Each time is the median of ``--repeats`` runs; the largest difference between the study's two
scores is printed beside them (it must be float32 rounding: the same references, the same K).

Usage::

    .venv/bin/python tools/benchmark_bank_scores.py [--bank 40] [--queries 1] [--tokens 1600] [--dim 384]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from codegraph3d.scoring.batch import score_batch
from codegraph3d.scoring.musc import BankGroup


def _volumes(n: int, tokens: int, dim: int, layers: int, seed: int) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """``[layer][volume]`` unit-norm tokens and each volume's grid coords (a random subset of 16^3)."""
    rng = np.random.default_rng(seed)
    coords = [np.stack(np.unravel_index(np.sort(rng.choice(16**3, tokens, replace=False)), (16, 16, 16)), 1)
              for _ in range(n)]
    sets = []
    for _ in range(layers):
        layer = [rng.standard_normal((tokens, dim)).astype(np.float32) for _ in range(n)]
        sets.append([t / np.linalg.norm(t, axis=1, keepdims=True) for t in layer])
    return sets, coords


def _timed(repeats: int, call) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=40, help="bank volumes (the app's bank.max_references)")
    parser.add_argument("--queries", type=int, default=1, help="studies scored together against the bank")
    parser.add_argument("--tokens", type=int, default=1600, help="tokens per volume (brain positions of 16^3)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--window-radius", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.queries + args.bank
    sets, coords = _volumes(n, args.tokens, args.dim, args.layers, seed=0)
    groups = [f"q{i}" for i in range(args.queries)] + [BankGroup(f"b{i}") for i in range(args.bank)]
    print(f"{args.queries} stud(ies) + {args.bank} bank volumes, {args.tokens} tokens x {args.dim} dims, "
          f"{args.layers} layers, {torch.get_num_threads()} thread(s)")
    print("| matching | fresh (s) | reused (s) | ratio | largest score difference |")
    print("|---|---|---|---|---|")
    for radius in (None, args.window_radius):
        options = dict(k_fraction=0.3, groups=groups, device="cpu", window_radius=radius, coords=coords,
                       grid_shape=(16, 16, 16))
        fresh_time, fresh = _timed(args.repeats, lambda: score_batch(sets, **options))
        known = [layer[args.queries:] for layer in fresh.per_layer]
        reused_time, reused = _timed(args.repeats, lambda: score_batch(sets, known_scores=known, **options))
        difference = max(float(np.abs(a - b).max()) for a, b in
                         zip(fresh.token_scores[: args.queries], reused.token_scores[: args.queries]))
        label = "global" if radius is None else f"window radius {radius}"
        print(f"| {label} | {fresh_time:.2f} | {reused_time:.2f} | {fresh_time / reused_time:.1f} x | {difference:.2g} |")


if __name__ == "__main__":
    main()
