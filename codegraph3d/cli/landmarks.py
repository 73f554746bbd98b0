"""``codegraph3d landmarks {template,learn,show}``: reference landmarks of the Nyul standardisation.

Usage::

    codegraph3d landmarks template MODEL_FOLDER_OR_JSON [--percentiles 1 10 ... 99]
    codegraph3d landmarks learn --contrast T2w --output MODEL_FOLDER \\
        image1.nii.gz --mask mask1.nii.gz image2.nii.gz --mask mask2.nii.gz dicom_series_folder/
    codegraph3d landmarks show [MODEL_FOLDER]

``template`` computes the T1w reference from the MNI152 template nilearn ships; ``learn`` learns
one contrast's reference from a site's normal studies (NIfTI images, each optionally followed by
its ``--mask``, or DICOM folders of one series each) into ``MODEL_FOLDER/landmarks/``; ``show``
prints the reference in effect per contrast and where it comes from
(:func:`codegraph3d.preprocess.intensity.load_reference_landmarks`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from codegraph3d.run.config import load_config
from codegraph3d.preprocess.intensity import (
    DEFAULT_PERCENTILES,
    KNOWN_CONTRASTS,
    PACKAGE_LANDMARKS,
    ReferenceLandmarks,
    learn_reference,
    load_reference_landmarks,
    merge_landmarks_file,
    model_landmarks_path,
    read_landmarks_file,
    template_reference,
    volume_landmarks,
)
from codegraph3d.io.dicom import load_series_volume, scan_headers
from codegraph3d.preprocess.skullstrip import brain_mask_from_intensity

__all__ = ["TAKES_EXTRA_ARGUMENTS", "configure", "run"]

# ``learn`` takes its inputs as ``IMAGE [--mask MASK] ...``, parsed here (:func:`_training_inputs`).
TAKES_EXTRA_ARGUMENTS = True


def _read_nifti(path: Path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a 3-D scalar image; got {image.GetDimension()}-D with "
                         f"{image.GetNumberOfComponentsPerPixel()} components")
    return sitk.GetArrayFromImage(image).astype(np.float64)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _dicom_array(folder: Path) -> np.ndarray:
    series = scan_headers(folder).series
    if len(series) != 1:
        found = [f"{s.series_instance_uid} ({s.series_description!r})" for s in series]
        raise ValueError(
            f"{folder}: expected exactly one DICOM series, found {len(series)}"
            + (f": {', '.join(found)}" if found else "")
            + "; give one folder per series of the contrast being learnt"
        )
    return np.asarray(load_series_volume(series[0]).volume.array, dtype=np.float64)


def _training_inputs(tokens: Sequence[str]) -> list[tuple[Path, Path | None]]:
    """Pair each input with the ``--mask`` that follows it (``learn`` takes ``IMAGE [--mask MASK]``)."""
    pairs: list[tuple[Path, Path | None]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("--mask="):
            tokens = [*tokens[:index], "--mask", token.split("=", 1)[1], *tokens[index + 1:]]
            continue
        if token == "--mask":
            if not pairs or index + 1 >= len(tokens):
                raise ValueError("--mask must follow the NIfTI image it belongs to and name a file")
            image, mask = pairs[-1]
            if mask is not None:
                raise ValueError(f"{image}: two --mask options; give one mask per image")
            if not _is_nifti(image):
                raise ValueError(f"{image}: --mask applies to NIfTI images; a DICOM series uses the intensity mask")
            pairs[-1] = (image, Path(tokens[index + 1]))
            index += 2
            continue
        if token.startswith("-"):
            raise ValueError(f"unknown option {token!r} among the training inputs")
        pairs.append((Path(token), None))
        index += 1
    if not pairs:
        raise ValueError("learn needs at least one NIfTI image or DICOM series folder")
    return pairs


def _training_landmarks(
    image_path: Path, mask_path: Path | None, percentiles: Sequence[float], mask_threshold: float
) -> np.ndarray:
    if image_path.is_dir():
        array = _dicom_array(image_path)
    elif image_path.is_file() and _is_nifti(image_path):
        array = _read_nifti(image_path)
    else:
        raise ValueError(f"{image_path}: not a NIfTI file (.nii, .nii.gz) nor a DICOM series folder")
    if mask_path is not None:
        if not mask_path.is_file():
            raise ValueError(f"{mask_path}: mask file not found")
        mask = _read_nifti(mask_path) > 0
        if mask.shape != array.shape:
            raise ValueError(f"{mask_path}: mask shape {mask.shape} does not match {image_path} {array.shape}")
    else:
        # The preprocessing's own mask, so that training and use see the same brain voxels.
        mask = brain_mask_from_intensity(array, mask_threshold)
    if not mask.any():
        raise ValueError(f"{image_path}: the brain mask is empty; give a --mask or check the image")
    return volume_landmarks(array, mask, percentiles)


# --------------------------------------------------------------------------------------------
# command line


def _output_json(target: str) -> Path:
    """A ``.json`` target is the file itself; anything else is a model folder."""
    path = Path(target)
    return path if path.suffix.lower() == ".json" else model_landmarks_path(path)


def _configured_percentiles(model_path: str | None) -> tuple[float, ...]:
    return load_config(model_path).preprocess.chain.landmark_percentiles


def _describe(reference: ReferenceLandmarks) -> str:
    pairs = ", ".join(f"p{p:g}->{v:.4f}" for p, v in zip(reference.percentiles, reference.values, strict=True))
    return f"{reference.contrast}: {reference.source}\n    {pairs}"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``template``, ``learn`` and ``show`` actions to ``parser``."""
    actions = parser.add_subparsers(dest="command", required=True)
    template = actions.add_parser("template", help="compute the T1w reference from the MNI152 template nilearn ships")
    template.add_argument("target", help="model folder (writes landmarks/reference_landmarks.json) or a .json file")
    template.add_argument("--percentiles", type=float, nargs="+", default=list(DEFAULT_PERCENTILES))
    # allow_abbrev=False: "--mask" (an input's mask, left to _training_inputs) must not be read as
    # an abbreviation of "--mask-threshold".
    learn = actions.add_parser(
        "learn",
        allow_abbrev=False,
        help="Nyul training from normal studies of one contrast",
        description="Inputs: NIfTI images, each optionally followed by --mask MASK.nii.gz (otherwise the "
        "preprocessing's intensity mask), and/or DICOM folders holding one series each. Give the options "
        "(--percentiles in particular) before the inputs.",
    )
    learn.add_argument("--contrast", required=True, choices=KNOWN_CONTRASTS)
    learn.add_argument("--output", required=True, help="model folder; writes landmarks/reference_landmarks.json")
    learn.add_argument("--percentiles", type=float, nargs="+", default=None,
                       help="default: preprocess.landmark_percentiles of the output folder's configuration")
    learn.add_argument("--mask-threshold", type=float, default=0.05,
                       help="intensity mask: fraction of the 99th percentile (preprocess.mask_threshold)")
    show = actions.add_parser("show", help="print the reference in effect per contrast and its source")
    show.add_argument("model_path", nargs="?", default=None)
    show.add_argument("--percentiles", type=float, nargs="+", default=None,
                      help="default: preprocess.landmark_percentiles of the model folder's configuration")


def _learn(args: argparse.Namespace, rest: Sequence[str]) -> None:
    if not 0.0 < args.mask_threshold < 1.0:
        raise ValueError(f"--mask-threshold must lie in (0, 1); got {args.mask_threshold}")
    percentiles = args.percentiles or _configured_percentiles(args.output)
    inputs = _training_inputs(rest)
    landmark_sets = [_training_landmarks(image, mask, percentiles, args.mask_threshold) for image, mask in inputs]
    names = ", ".join(image.name for image, _ in inputs[:3]) + (", ..." if len(inputs) > 3 else "")
    reference = learn_reference(
        landmark_sets, percentiles, contrast=args.contrast,
        source=f"learnt from {len(inputs)} normal {args.contrast} scan(s) ({names})",
    )
    written = merge_landmarks_file(model_landmarks_path(args.output), reference)
    print(f"wrote {written}\n{_describe(reference)}")


def _show(args: argparse.Namespace) -> None:
    percentiles = args.percentiles or _configured_percentiles(args.model_path)
    contrasts = list(KNOWN_CONTRASTS)
    for path in ([model_landmarks_path(args.model_path)] if args.model_path else []) + [PACKAGE_LANDMARKS]:
        if path.is_file():
            contrasts += [name for name in read_landmarks_file(path) if name not in contrasts]
    for contrast in contrasts:
        print(_describe(load_reference_landmarks(contrast, args.model_path, percentiles)))


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Carry out one landmarks action; 0 done, 2 bad input."""
    if args.command != "learn" and rest:
        print(f"error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    try:
        if args.command == "template":
            reference = template_reference(args.percentiles)
            written = merge_landmarks_file(_output_json(args.target), reference)
            print(f"wrote {written}\n{_describe(reference)}")
        elif args.command == "learn":
            _learn(args, rest)
        else:
            _show(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
