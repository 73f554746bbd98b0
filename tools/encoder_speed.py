"""Print an encoder's slices per second on this machine (a benchmark, not a test).

Example: ``.venv/bin/python tools/encoder_speed.py untrained-vit-l14 --slices 32``. The untrained
ViT-L/14 has the real size and cost of DINOv2 ViT-L/14, so its speed is the production speed.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from codegraph3d.encoders import load_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("encoder", help="intensity, untrained-vit-l14, untrained-vit-s14, untrained-tiny")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="slice edge in pixels")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    started = time.perf_counter()
    encoder = load_encoder(args.encoder, device=args.device)
    built = time.perf_counter() - started
    slices = torch.rand(args.slices, 1, args.size, args.size)
    encoder.encode(slices[:1])  # warm-up: first-call allocations are not throughput
    started = time.perf_counter()
    for start in range(0, args.slices, args.batch_size):
        encoder.encode(slices[start : start + args.batch_size])
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"encoder: {encoder.description}")
    print(f"device: {encoder.device}, torch threads: {torch.get_num_threads()}, build {built:.1f} s")
    print(f"{args.slices} slices of {args.size}^2 in {seconds:.1f} s: {args.slices / seconds:.3f} slices/s")
    print(f"a 224^3 volume (3 x 224 slices) would take {3 * 224 * seconds / args.slices / 60:.1f} min")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
