"""Affine registration of a skull-stripped series to the brain-only MNI152 2009 template.

Batch scoring compares the same token position across volumes, so the same anatomy must sit in
the same token. The template is the MNI152 2009c T1 brain that nilearn ships (1 mm, skull-stripped),
installed under the model folder by ``codegraph3d template install MODEL_FOLDER``
(nothing is read from the network, and a MAP carries its model folder).

Registration: SimpleITK, Mattes mutual information (so T2w and FLAIR register to the T1 template),
a moments-centred affine start, regular-step gradient descent over a 3-level pyramid (shrink 4-2-1,
smoothing 2-1-0 mm) with 5 % random sampling. Faster settings were seen to stop silently at the
iteration cap with 6-11 mm errors, so the stop condition is recorded and a run that ended on the
iteration cap, or with a weak final metric, is flagged in the QA record rather than trusted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from codegraph3d.core.transforms import transform_matrix

__all__ = [
    "TEMPLATE_FOLDER",
    "nilearn_template",
    "Template",
    "RegistrationResult",
    "install_template",
    "load_template",
    "mattes_method",
    "register_affine",
]

TEMPLATE_FOLDER = "template"
TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# nilearn's own brain-mask rule for this template: intensity / max > 0.2.
_MASK_FRACTION = 0.2
# A final Mattes metric above this (less negative) means the images barely share information.
DOUBTFUL_METRIC = -0.2


@dataclass
class Template:
    """The registration target: the template image, its brain mask and brain centre (LPS mm)."""

    image: sitk.Image
    mask: sitk.Image
    centre_lps: np.ndarray
    path: Path


@dataclass
class RegistrationResult:
    """An affine map from template space to subject space, with its QA record.

    ``matrix`` maps a template LPS point (homogeneous) to the subject LPS point that matches it.
    """

    matrix: np.ndarray
    qa: dict[str, Any] = field(default_factory=dict)

    @property
    def doubtful(self) -> bool:
        return bool(self.qa.get("doubtful"))


def nilearn_template() -> Path:
    """The MNI152 2009 T1 brain template file the installed nilearn ships (nothing is downloaded)."""
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"nilearn does not ship {TEMPLATE_FILE} at {path}; install nilearn==0.14.1")
    return path


def install_template(model_folder: str | Path) -> Path:
    """Copy the MNI152 2009 T1 brain template from the installed nilearn into the model folder."""
    target = Path(model_folder) / TEMPLATE_FOLDER / TEMPLATE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(nilearn_template(), target)
    return target


def load_template(model_folder: str | Path | None) -> Template:
    """Load the template installed under ``model_folder``.

    Raises
    ------
    FileNotFoundError
        Naming the expected file and the command that installs it.
    """
    if model_folder is None:
        raise FileNotFoundError(
            "registration needs the template under the model folder; pass -m MODEL_FOLDER and run "
            "'python -m codegraph3d template install MODEL_FOLDER'"
        )
    path = Path(model_folder) / TEMPLATE_FOLDER / TEMPLATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"registration template not found: expected {path}; install it with "
            f"'python -m codegraph3d template install {model_folder}' (README: 'Registration')"
        )
    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    mask = sitk.GetImageFromArray((array > _MASK_FRACTION * float(array.max())).astype(np.uint8))
    mask.CopyInformation(image)
    z, y, x = np.nonzero(sitk.GetArrayFromImage(mask))
    centre_index = [float(x.mean()), float(y.mean()), float(z.mean())]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index))
    return Template(image=image, mask=mask, centre_lps=centre, path=path)


def mattes_method(sampling: float, seed: int) -> sitk.ImageRegistrationMethod:
    """A registration method with a Mattes MI metric (32 bins) on a reproducible random sample.

    Parameters
    ----------
    sampling : float
        Fraction of the fixed image's (masked) voxels sampled by the metric.
    seed : int
        Seed of the sampling, at least 1: SimpleITK reads 0 as "seed from the wall clock", which
        would make reruns differ.
    """
    if seed < 1:
        raise ValueError(f"seed must be >= 1 (SimpleITK treats 0 as the wall clock); got {seed}")
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)
    return method


def coarsen_to_spacing(image: sitk.Image, spacing: tuple[float, ...]) -> tuple[sitk.Image, list[int]]:
    """Average blocks of voxels along the axes at least twice as fine as ``spacing``.

    The registration metric samples the moving image only at template points, so detail much
    finer than the template adds nothing to the fit, while the per-level smoothing of a 0.5 mm
    series (eight times the voxels of a 1 mm one) costs gigabytes. Block averaging (BinShrink)
    keeps the physical extent and filters before it subsamples. Axes coarser than half of
    ``spacing`` are left alone, so series at usual resolutions are registered exactly as given.

    Returns
    -------
    tuple of (SimpleITK.Image, list of int)
        The image (the input itself when nothing is shrunk) and the factor per axis (x, y, z).
    """
    factors = [max(1, int(np.floor(target / step + 1e-6))) for step, target in zip(image.GetSpacing(), spacing)]
    factors = [min(factor, size) for factor, size in zip(factors, image.GetSize())]
    if all(factor == 1 for factor in factors):
        return image, factors
    return sitk.BinShrink(image, factors), factors


def register_affine(
    moving: sitk.Image,
    template: Template,
    *,
    seed: int = 1,
    shrink_factors: tuple[int, ...] = (4, 2, 1),
    smoothing_mm: tuple[float, ...] = (2.0, 1.0, 0.0),
    sampling: float = 0.05,
    iterations: int = 200,
    min_step: float = 1e-3,
) -> RegistrationResult:
    """Register a skull-stripped subject image (background 0) to the template.

    Parameters
    ----------
    moving : SimpleITK.Image
        The subject's brain, float, background 0.
    template : Template
        The fixed image.
    seed : int
        Seed of the metric's random sampling, so that reruns give the same transform. Must be
        positive: SimpleITK reads 0 as "seed from the wall clock".
    shrink_factors, smoothing_mm : tuple
        The pyramid: template shrink factor and Gaussian smoothing (mm) per level.
    sampling : float
        Fraction of the template's brain voxels sampled by the metric at each level.
    iterations : int
        Iteration cap per level; a level that reaches it is flagged as doubtful.
    min_step : float
        Step (in the optimiser's physical-shift units, about mm) below which a level has converged.
    """
    fixed = template.image
    moving, moving_shrink = coarsen_to_spacing(sitk.Cast(moving, sitk.sitkFloat32), fixed.GetSpacing())
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    transform = sitk.AffineTransform(initial)
    method = mattes_method(sampling, seed)
    method.SetMetricFixedMask(template.mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=min_step, numberOfIterations=iterations, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    if len(shrink_factors) != len(smoothing_mm) or not shrink_factors:
        raise ValueError(f"shrink_factors {shrink_factors} and smoothing_mm {smoothing_mm} need one entry per level")
    method.SetShrinkFactorsPerLevel(list(shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(smoothing_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    stop = method.GetOptimizerStopConditionDescription()
    metric = float(method.GetMetricValue())
    matrix = transform_matrix(transform)
    linear = matrix[:3, :3]
    hit_cap = "Maximum number of iterations" in stop
    scales = np.linalg.svd(linear, compute_uv=False)
    implausible_scale = bool(scales.min() < 0.7 or scales.max() > 1.4)
    qa = {
        "method": f"affine, Mattes MI, shrink {'-'.join(map(str, shrink_factors))}",
        "metric": round(metric, 5),
        "stop_condition": stop,
        "iterations": int(method.GetOptimizerIteration()),
        "scales": [round(float(v), 4) for v in scales],
        "doubtful": bool(hit_cap or metric > DOUBTFUL_METRIC or implausible_scale),
        "template": str(template.path.name),
        "moving_shrink": moving_shrink,
    }
    reasons = []
    if hit_cap:
        reasons.append("the optimiser stopped at its iteration cap")
    if metric > DOUBTFUL_METRIC:
        reasons.append(f"weak final metric {metric:.3f} (> {DOUBTFUL_METRIC})")
    if implausible_scale:
        reasons.append(f"implausible scaling {qa['scales']}")
    if reasons:
        qa["warning"] = "registration doubtful: " + "; ".join(reasons)
    return RegistrationResult(matrix=matrix, qa=qa)
