#!/usr/bin/env python3
"""The global MuSc scorer on a GPU: against the one-sided cdist reference, and where its time goes.

For each ``--sizes`` entry ``B:N`` (random L2-normalised float32 tokens, D = ``--dim``, one layer)
it times, interleaved, the one-sided reference of ``tools/profile_scorer.py`` (``torch.cdist``
per volume, each pair twice), ``musc_scores`` with float32 selection and with TF32 selection;
the median of ``--repeats`` runs after a warm-up, the two ratios and the largest score
difference to the reference. ``--phases B`` then times the scorer's phases one by one
(validation and stacking, centring, choosing neighbours, exact distances, top-K reduction) with
the device synchronised between them. Prints one JSON line per row.

For a GPU machine whose own python3 has torch (nothing to install), e.g.::

    PYTHONPATH=$PWD python3 tools/gpu_scorer.py --sizes 30:1000 30:1500 180:1500 --phases 180
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_scorer import one_sided_reference  # noqa: E402  (a sibling script, not a package)

from codegraph3d.scoring import musc  # noqa: E402


def random_tokens(n_volumes: int, n_tokens: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    """L2-normalised Gaussian float32 token sets, as in ``tools/profile_scorer.py``."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((n_tokens, dim)).astype(np.float32) for _ in range(n_volumes)]
    return [a / np.linalg.norm(a, axis=1, keepdims=True) for a in arrays]


def synchronised(dev: torch.device, run: Callable[[], object]) -> Callable[[], object]:
    """``run`` followed by a device synchronisation, so that wall time covers the kernels."""
    def wrapped() -> object:
        result = run()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return result
    return wrapped


def ratio_row(arrays: list[np.ndarray], dev: torch.device, repeats: int) -> dict[str, object]:
    """Median times of the reference and of the scorer (float32, TF32 selection), and differences."""
    stacked = torch.from_numpy(np.stack(arrays)).to(dev)

    def ours(precision: str) -> Callable[[], object]:
        def run() -> list[np.ndarray]:
            with musc.selection_precision(precision):
                return musc.musc_scores(arrays, k_fraction=0.3, device=dev)
        return synchronised(dev, run)

    runs = {"reference": synchronised(dev, lambda: one_sided_reference(stacked)),
            "float32": ours("float32"), "tf32": ours("tf32")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, object] = {name: run() for name, run in runs.items()}  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    reference = results["reference"].cpu().numpy()
    row: dict[str, object] = {"B": len(arrays), "N": arrays[0].shape[0], "D": arrays[0].shape[1],
                              "device": str(dev), "repeats": repeats, "median_s": median}
    for name in ("float32", "tf32"):
        row[f"{name}_against_reference"] = median["reference"] / median[name]
        row[f"{name}_max_difference"] = max(
            float(np.abs(np.asarray(s) - reference[i]).max()) for i, s in enumerate(results[name]))
    return row


def phase_row(arrays: list[np.ndarray], dev: torch.device, chunk_size: int = 4096) -> dict[str, object]:
    """Seconds of each phase of one ``musc_scores`` call (float32 selection), synchronised."""
    seconds: dict[str, float] = {}

    def timed(name: str, run: Callable[[], object]) -> object:
        start = time.perf_counter()
        result = synchronised(dev, run)()
        seconds[name] = time.perf_counter() - start
        return result

    with torch.inference_mode():
        batch = timed("validate", lambda: musc._prepare_batch(arrays, None))
        tokens, sq_norms = timed("centre", lambda: musc._stack_centred(batch, dev))
        if dev.type == "cpu":
            chosen = timed("choose", lambda: musc._block_nearest(batch, tokens, sq_norms, chunk_size))
        else:
            chosen = timed("choose", lambda: musc._padded_nearest(batch, tokens, sq_norms, chunk_size))
        distances = timed("exact", lambda: musc._exact_distances(batch, tokens, chosen, chunk_size))
        timed("reduce", lambda: musc._musc_reduce(distances, batch.starts, batch.refs, 0.3))
    return {"B": len(arrays), "N": arrays[0].shape[0], "device": str(dev), "phase_seconds": seconds,
            "total_s": sum(seconds.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["30:1000", "30:1500", "180:1500"], help="B:N pairs")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--phases", type=int, nargs="*", default=[180], help="B values for the phase table (N 1500)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    for size in args.sizes:
        n_volumes, n_tokens = (int(x) for x in size.split(":"))
        repeats = args.repeats if n_volumes < 100 else max(1, args.repeats - 2)
        print(json.dumps(ratio_row(random_tokens(n_volumes, n_tokens, args.dim), dev, repeats)), flush=True)
    for n_volumes in args.phases:
        arrays = random_tokens(n_volumes, 1500, args.dim)
        phase_row(arrays, dev)  # warm-up
        print(json.dumps(phase_row(arrays, dev)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
