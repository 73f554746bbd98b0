"""Token-cache entries of a combined encoder, assembled from its parts' entries.

A :class:`~codegraph3d.features.encoders.CombinedEncoder` returns each part's layers unchanged,
zero-padded to the widest part, and tokenisation treats every layer on its own; so the entry the
app would write for ``efficientnet-lite0+intensity`` is the EfficientNet-Lite0 entry's features
with the intensity entry's layer appended (padded). Where both parts are cached for the same
series and preprocessing, this writes that entry without encoding the series again (a cohort
measured with both encoders gets the combination for the cost of a copy). The parts must agree
on everything but the encoder: the same series, source files, preprocessing and kept tokens;
anything else is refused with the field that differs.

Usage::

    python -m codegraph3d_research.combine_caches --cache CACHE --config COMBINED.yaml \\
        --part CACHE_A/SETTINGS_ID_A --part CACHE_B/SETTINGS_ID_B [-m MODELS]

The first part's entry gives geometry and provenance; the combined settings folder is created
under ``--cache`` with the id the app computes for ``COMBINED.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from codegraph3d.features.encoders import CombinedEncoder, SliceEncoder
from codegraph3d.features.tokens import EncodedVolume
from codegraph3d.run.config import CONFIG_ENV_VAR, load_config
from codegraph3d.run.pipeline import build_encoder
from codegraph3d.store.cache import CachedSeries, CacheEntryError, TokenCache, encoder_material, read_entry

__all__ = ["CombineError", "combine_entries", "combine_folders", "main"]


class CombineError(ValueError):
    """Part entries that cannot be combined; the message names the file and the difference."""


def combine_entries(parts: Sequence[CachedSeries], encoder: SliceEncoder, where: str) -> CachedSeries:
    """One entry whose features are the parts' layers in order, each zero-padded to ``encoder.dim``."""
    if len(parts) < 2:
        raise CombineError(f"{where}: a combined entry needs two or more part entries; got {len(parts)}")
    first = parts[0]
    for part in parts[1:]:
        if not np.array_equal(part.encoded.coords, first.encoded.coords):
            raise CombineError(f"{where}: the parts kept different tokens (were they preprocessed alike?)")
        if not np.array_equal(part.prepared.brain_mask, first.prepared.brain_mask):
            raise CombineError(f"{where}: the parts' brain masks differ; combine entries of one preprocessing only")
        if part.sop_instance_uids != first.sop_instance_uids:
            raise CombineError(f"{where}: the parts were built from different source slices")
    if any(part.encoded.features.shape[3] > encoder.dim for part in parts):
        raise CombineError(f"{where}: a part's features are wider than the combined encoder's {encoder.dim}")
    layers = [layer for part in parts for layer in part.encoded.layer_names]
    if layers != list(encoder.layer_names):
        raise CombineError(f"{where}: the parts' layers {layers} are not the combined encoder's {encoder.layer_names}")
    features = np.concatenate([
        np.pad(part.encoded.features, ((0, 0), (0, 0), (0, 0), (0, encoder.dim - part.encoded.features.shape[3])))
        for part in parts
    ])
    encoded = EncodedVolume(features=features.astype(np.float32), coords=first.encoded.coords,
                            grid_shape=first.encoded.grid_shape, layer_names=layers,
                            brain_fraction=first.encoded.brain_fraction)
    return dataclasses.replace(first, encoded=encoded)


def _combined_material(sidecar: dict[str, Any], encoder: SliceEncoder) -> dict[str, Any]:
    """The first part's key material with the combined encoder's identity in place of its own."""
    material = dict(sidecar["key_material"])
    material["settings"] = {**material["settings"], "encoder": encoder_material(encoder)}
    return material


def _check_settings(name: str, settings: Sequence[dict[str, Any]], encoder: CombinedEncoder) -> None:
    """Each part entry made by the combined encoder's part, all with one preprocessing."""
    for index, (setting, part) in enumerate(zip(settings, encoder.parts, strict=True)):
        if setting.get("encoder") != encoder_material(part):
            raise CombineError(f"{name}: part {index + 1}'s entry was made by another encoder than {part.name!r} "
                               "as configured (other weights, layers or settings); fill its cache again")
        for field in ("preprocess", "tokens", "landmarks", "format"):
            if setting.get(field) != settings[0].get(field):
                raise CombineError(f"{name}: the parts' settings differ in {field!r}; combine one preprocessing only")


def combine_folders(cache: Path, parts: Sequence[Path], encoder: CombinedEncoder) -> tuple[int, int]:
    """Write the combined entry of every series all parts hold; return (written, skipped) counts.

    Raises
    ------
    CombineError
        For a part folder whose count differs from the encoder's parts, an unreadable entry, or
        entries that were not made by the encoder's parts with one preprocessing.
    """
    if len(parts) != len(encoder.parts):
        raise CombineError(f"{encoder.name!r} has {len(encoder.parts)} parts; got {len(parts)} part folders")
    target = TokenCache(cache)
    written = skipped = 0
    for npz in sorted(parts[0].glob("*.npz")):
        others = [folder / npz.name for folder in parts[1:]]
        if not all(path.is_file() for path in others):
            skipped += 1
            continue
        try:
            read = [read_entry(path) for path in (npz, *others)]
        except CacheEntryError as error:
            raise CombineError(f"a part entry cannot be read: {error}") from error
        _check_settings(npz.name, [sidecar["key_material"]["settings"] for sidecar, _ in read], encoder)
        entry = combine_entries([entry for _, entry in read], encoder, str(npz))
        target.store(_combined_material(read[0][0], encoder), entry)
        written += 1
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the combined entries."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="cache folder to write the combined entries into")
    parser.add_argument("--config", type=Path, required=True, help="configuration naming the combined encoder")
    parser.add_argument("--part", type=Path, action="append", required=True,
                        help="a settings folder of one part's entries, in the combined encoder's part order")
    parser.add_argument("-m", "--models", default="demo/models")
    args = parser.parse_args(argv)
    if len(args.part) < 2:
        raise SystemExit("--part: give one settings folder per part (two or more)")
    previous = os.environ.get(CONFIG_ENV_VAR)
    os.environ[CONFIG_ENV_VAR] = str(args.config)
    try:
        encoder = build_encoder(load_config(args.models), args.models)
    finally:  # a caller's configuration is left as it was
        if previous is None:
            os.environ.pop(CONFIG_ENV_VAR, None)
        else:
            os.environ[CONFIG_ENV_VAR] = previous
    if not isinstance(encoder, CombinedEncoder):
        raise SystemExit(f"--config: encoder {encoder.name!r} is not a combination of encoders")
    written, skipped = combine_folders(args.cache, args.part, encoder)
    print(f"{written} combined entries written under {args.cache}; {skipped} series not held by every part")
    return 0


if __name__ == "__main__":
    sys.exit(main())
