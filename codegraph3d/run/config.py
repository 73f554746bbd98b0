"""One configuration file with the product's defaults (the paper's, except where
``default_config.yaml`` says otherwise), overridable per run.

The defaults live in ``default_config.yaml`` beside this module, documented field by field. A run
overrides them with a YAML file holding only the fields to change:

1. the file named by the environment variable ``CODEGRAPH3D_CONFIG``, else
2. ``codegraph3d.yaml`` in the model folder, else
3. nothing (the defaults).

Overrides are validated eagerly, once, when the file is read: an unknown section or field, or a
value of another type, is an error naming the file and the field (the merge); then each section
becomes a frozen, typed record that checks its own ranges and choices, and :class:`RunConfig`
checks what spans sections. The run layer hands those records down; no module below it reads the
raw mapping. :meth:`RunConfig.as_dict` is the merged mapping, as report.json records it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from codegraph3d.decision.settings import PER_CONTRAST_BOUNDS, DecisionSettings, ThresholdPolicy, ThresholdSettings, choice
from codegraph3d.features.encoders import configured_patch_size
from codegraph3d.io.selection import SelectionRules
from codegraph3d.preprocess.chain import PreprocessConfig
from codegraph3d.scoring.codegraph import CoDeGraphConfig
from codegraph3d.scoring.maps import INTERPOLATIONS
from codegraph3d.scoring.musc import check_layer_weights
from codegraph3d.store.cache import TokenRecipe

__all__ = [
    "AddScored", "BankSettings", "CacheSettings", "ConfigError", "CONFIG_ENV_VAR", "EncoderSettings",
    "ExcludeSame", "ExecutionBackend", "ExecutionSettings", "LoadingSettings", "MODEL_FOLDER_CONFIG", "OutputSettings", "PreprocessSettings",
    "RunConfig", "ScoringMethod", "ScoringPrecision", "ScoringSettings", "TokenSettings", "config_hash",
    "default_config", "load_config",
]

CONFIG_ENV_VAR = "CODEGRAPH3D_CONFIG"
MODEL_FOLDER_CONFIG = "codegraph3d.yaml"
_DEFAULTS_PATH = Path(__file__).with_name("default_config.yaml")


class ConfigError(ValueError):
    """Raised for a configuration file that cannot be used."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives one key twice (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"line {line}: key {key!r} is given twice in one section (first on line {seen[key]}); "
                    "keep one: YAML would silently take the last"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(handle: Any) -> Any:
    return yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def default_config() -> dict[str, Any]:
    """Return a fresh copy of the documented defaults."""
    with _DEFAULTS_PATH.open(encoding="utf-8") as handle:
        return _load_yaml(handle)


def _compatible(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


# Mappings whose keys are data (contrast names), not fields: a later layer replaces them whole.
_WHOLE_MAPPINGS = frozenset(f"threshold.{name}_by_contrast" for name in PER_CONTRAST_BOUNDS) | {"threshold.with_bank"}
# Fields whose default is null ("use another field's value", or for layer_weights "the plain mean"): a later
# layer may set them back to null.
_NULLABLE = frozenset({"threshold.bank_prior_volumes", "scoring.layer_weights"})


def _merge(base: dict[str, Any], override: Mapping[str, Any], source: str, prefix: str = "") -> None:
    for key, value in override.items():
        name = f"{prefix}{key}"
        if key not in base and prefix != "selection.":
            raise ConfigError(
                f"{source}: unknown configuration field '{name}'; valid fields here are "
                f"{sorted(base)} (see codegraph3d/run/default_config.yaml)"
            )
        if key not in base:  # a selection rule: validated as a whole by SelectionRules
            base[key] = copy.deepcopy(value)
            continue
        default = base[key]
        if isinstance(default, dict) and default and isinstance(value, dict) and name not in _WHOLE_MAPPINGS:
            _merge(default, value, source, prefix=f"{name}.")
            continue
        if not _compatible(default, value) and not (value is None and name in _NULLABLE):
            raise ConfigError(
                f"{source}: configuration field '{name}' must be of type {type(default).__name__}; "
                f"got {value!r}"
            )
        base[key] = copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------
# typed sections: each checks its own fields when made; the messages name the field


class ExcludeSame(StrEnum):
    """Which references a volume is never scored against (``scoring.exclude_same``)."""

    PATIENT_ID = "patient_id"
    STUDY = "study"
    NONE = "none"


class ScoringMethod(StrEnum):
    """``scoring.method``: plain MuSc, or MuSc with CoDeGraph's removal of repeated anomalies."""

    MUSC = "musc"
    CODEGRAPH = "codegraph"


class ScoringPrecision(StrEnum):
    """``scoring.precision`` of the distance matmuls on a GPU."""

    FLOAT32 = "float32"
    TF32 = "tf32"


class ExecutionBackend(StrEnum):
    """Where the stages run (``execution.backend``)."""

    LOCAL = "local"  # this process and local worker processes
    RAY = "ray"  # preprocessing on Ray actors: an embedded instance, or a cluster


class AddScored(StrEnum):
    """Which scored series join the cohort bank after a run (``bank.add_scored``)."""

    NONE = "none"
    UNFLAGGED = "unflagged"
    ALL = "all"


def _integer(value: Any, name: str, low: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{hint}; got {value!r}")


@dataclass(frozen=True)
class LoadingSettings:
    """``loading``: how many studies are loaded and preprocessed at a time (bounds memory)."""

    studies_per_chunk: int = 8

    def __post_init__(self) -> None:
        _integer(self.studies_per_chunk, "loading.studies_per_chunk", 1)


@dataclass(frozen=True)
class PreprocessSettings:
    """``preprocess``: worker processes, and the chain's settings on the working grid.

    Attributes
    ----------
    workers : int
        Worker processes (0: automatic); how a run is spread, not what a series becomes.
    chain : PreprocessConfig
        The chain's validated settings, with ``size`` the working grid of the configured encoder.
    """

    workers: int
    chain: PreprocessConfig

    def __post_init__(self) -> None:
        _integer(self.workers, "preprocess.workers", 0, " (0 = automatic)")


@dataclass(frozen=True)
class EncoderSettings:
    """``encoder``: which 2D encoder, its weights, layers, batch, device, seed and patch size."""

    name: str
    weights: str
    layers: tuple[int, ...]
    batch_size: int
    device: str
    seed: int
    patch_size: int

    def __post_init__(self) -> None:
        _integer(self.batch_size, "encoder.batch_size", 1)
        if any(isinstance(layer, bool) or not isinstance(layer, int) or layer < 1 for layer in self.layers):
            raise ValueError(f"encoder.layers must be 1-based block indices; got {list(self.layers)}")

    @property
    def family_patch_size(self) -> int:
        """The patch size of the encoder's family (DINOv2: 14), which fixes the working grid."""
        return configured_patch_size(self.name, self.patch_size)


@dataclass(frozen=True)
class TokenSettings:
    """``tokens``: the 3D token grid, the brain-fraction rule and the seeded projection."""

    grid_size: int
    projection_dim: int
    projection_seed: int
    min_brain_fraction: float

    def __post_init__(self) -> None:
        for name in ("grid_size", "projection_dim"):
            _integer(getattr(self, name), f"tokens.{name}", 1)
        _integer(self.projection_seed, "tokens.projection_seed", 0)
        if not 0.0 < self.min_brain_fraction <= 1.0:
            raise ValueError("tokens.min_brain_fraction must lie in (0, 1]")


@dataclass(frozen=True)
class ScoringSettings:
    """``scoring``: the MuSc / CoDeGraph scorer, its memory bound and the batch chunks."""

    k_fraction: float
    exclude_same: ExcludeSame
    device: str
    chunk_size: int
    memory_budget_mb: float
    precision: ScoringPrecision
    window_radius: int
    batch_size: int
    batch_seed: int
    method: ScoringMethod
    codegraph: CoDeGraphConfig
    layer_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # The count is checked against the encoder's layers when the encoder is loaded.
        object.__setattr__(self, "layer_weights", check_layer_weights(self.layer_weights))
        if not 0.0 < self.k_fraction <= 1.0:
            raise ValueError(f"scoring.k_fraction must lie in (0, 1]; got {self.k_fraction}")
        for name, enum in (("exclude_same", ExcludeSame), ("precision", ScoringPrecision), ("method", ScoringMethod)):
            object.__setattr__(self, name, choice(enum, getattr(self, name), f"scoring.{name}"))
        if isinstance(self.window_radius, bool) or not isinstance(self.window_radius, int) or self.window_radius < -1:
            raise ValueError(f"scoring.window_radius must be -1 (global) or a radius >= 0; got {self.window_radius}")
        if self.memory_budget_mb < 0:
            raise ValueError(f"scoring.memory_budget_mb must be >= 0 (0 = no bound); got {self.memory_budget_mb!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size in (1,) or self.batch_size < 0:
            raise ValueError(f"scoring.batch_size must be 0 (one batch) or at least 2; got {self.batch_size!r}")
        _integer(self.batch_seed, "scoring.batch_seed", 0)


@dataclass(frozen=True)
class OutputSettings:
    """``output``: map interpolation, previews, the FRACTIONAL SEG, series numbers, the SRs."""

    mask_interpolation: str
    score_interpolation: str
    previews: bool
    fractional: bool
    series_number: int
    sr: bool
    key_slice_sr: bool

    def __post_init__(self) -> None:
        for name in ("mask_interpolation", "score_interpolation"):
            if getattr(self, name) not in INTERPOLATIONS:
                raise ValueError(f"output.{name} must be one of {list(INTERPOLATIONS)}; got {getattr(self, name)!r}")


def _not_a_file(folder: str, name: str, use: str) -> None:
    if folder and Path(folder).expanduser().exists() and not Path(folder).expanduser().is_dir():
        raise ValueError(f"{name} {folder!r} is a file; point it at {use}, or '' to turn it off")


@dataclass(frozen=True)
class BankSettings:
    """``bank``: the cohort bank's folder, when it joins a batch, its draw, what a run adds."""

    folder: str
    min_patients: int
    max_references: int
    seed: int
    add_scored: AddScored
    reuse_scores: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "add_scored", choice(AddScored, self.add_scored, "bank.add_scored"))
        if not isinstance(self.reuse_scores, bool):
            raise ValueError(f"bank.reuse_scores must be true or false; got {self.reuse_scores!r}")
        for name, low in (("min_patients", 2), ("max_references", 1), ("seed", 0)):
            _integer(getattr(self, name), f"bank.{name}", low)
        _not_a_file(self.folder, "bank.folder", "the cohort bank's folder")


@dataclass(frozen=True)
class ExecutionSettings:
    """``execution``: local workers, or Ray (embedded when ``ray_address`` is empty, else a cluster)."""

    backend: ExecutionBackend
    ray_address: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", choice(ExecutionBackend, self.backend, "execution.backend"))


@dataclass(frozen=True)
class CacheSettings:
    """``cache``: the token cache's folder (``""``: no cache)."""

    folder: str

    def __post_init__(self) -> None:
        _not_a_file(self.folder, "cache.folder", "a folder for the token cache")


# ---------------------------------------------------------------------------------------------
# the run's configuration


def _frozen(value: Any) -> Any:
    """A read-only deep copy: the record a run hands down cannot change under it."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: _frozen(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    return value


def _thawed(value: Any) -> Any:
    """The plain JSON-able form of :func:`_frozen`'s output (lists, dicts), as read from YAML."""
    if isinstance(value, Mapping):
        return {key: _thawed(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thawed(item) for item in value]
    return value


@dataclass(frozen=True)
class RunConfig:
    """A run's configuration: validated once, typed by section, read-only.

    Made by :func:`load_config` (or :meth:`from_mapping`); a variant is made with
    :meth:`with_overrides`, never by replacing a section, so that :meth:`as_dict` (what report.json
    records and the configuration hash covers) always describes the sections.
    """

    loading: LoadingSettings
    selection: SelectionRules
    preprocess: PreprocessSettings
    encoder: EncoderSettings
    tokens: TokenSettings
    scoring: ScoringSettings
    threshold: ThresholdSettings
    output: OutputSettings
    bank: BankSettings
    cache: CacheSettings
    execution: ExecutionSettings
    values: Mapping[str, Any] = field(repr=False, compare=False)
    sources: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], sources: tuple[str, ...] = ()) -> RunConfig:
        """Build the typed record from a merged mapping of every section (types already checked).

        Raises
        ------
        ConfigError
            For a value out of range, a choice outside its options, or settings that conflict
            across sections; the message names the field.
        """
        try:
            return cls(**_sections(values), sources=tuple(sources), values=_frozen(values))
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from error

    def __post_init__(self) -> None:
        # The sections are views of ``values`` (what report.json records and the hash covers): a
        # record whose sections were replaced by hand would describe one run and record another.
        if any(getattr(self, name) != section for name, section in _sections(_thawed(self.values)).items()):
            raise ValueError("RunConfig's sections differ from its values; make variants with with_overrides()")
        scored = self.selection.scored_contrasts
        for prefix, threshold in (("threshold.", self.threshold), ("threshold.with_bank.", self.threshold.for_bank())):
            for name in PER_CONTRAST_BOUNDS:
                for contrast in getattr(threshold, f"{name}_by_contrast"):
                    if contrast not in scored:
                        raise ValueError(
                            f"{prefix}{name}_by_contrast: {contrast!r} is not a scored contrast (selection."
                            f"scored_contrasts: {list(scored)}); name the contrast batches as the report does"
                        )
        if self.threshold.policy is ThresholdPolicy.BANK and not self.bank.folder:
            raise ValueError("threshold.policy bank needs a cohort bank: set bank.folder")

    def as_dict(self) -> dict[str, Any]:
        """The merged mapping of every section plus ``config_sources``, as report.json records it."""
        return {**_thawed(self.values), "config_sources": list(self.sources)}

    def with_overrides(self, override: Mapping[str, Any], source: str = "<override>") -> RunConfig:
        """A new configuration: this one with ``override`` merged on and validated again."""
        values = _thawed(self.values)
        _merge(values, override, source)
        return RunConfig.from_mapping(values, (*self.sources, source))

    @property
    def working_grid_size(self) -> int:
        """Edge of the working grid: ``tokens.grid_size`` x the encoder family's patch size."""
        return int(self.tokens.grid_size) * self.encoder.family_patch_size

    def token_recipe(self) -> TokenRecipe:
        """The settings that make two series' tokens comparable (token cache and bank identity)."""
        return TokenRecipe(
            preprocess=_thawed(self.values["preprocess"]), grid_size=self.tokens.grid_size,
            min_brain_fraction=self.tokens.min_brain_fraction,
            projection_dim=self.tokens.projection_dim, projection_seed=self.tokens.projection_seed,
        )

    def decision_settings(self) -> DecisionSettings:
        """The settings a flag depends on besides the encoder (matched against operating points)."""
        return DecisionSettings(
            threshold=self.threshold, k_fraction=self.scoring.k_fraction,
            window_radius=self.scoring.window_radius, method=self.scoring.method.value,
            min_brain_fraction=self.tokens.min_brain_fraction, registration=self.preprocess.chain.registration,
            resolution_fwhm_mm=self.preprocess.chain.resolution_fwhm_mm, layer_weights=self.scoring.layer_weights,
        )


def _section(values: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One section's fields, lists as tuples (the records are frozen)."""
    return {key: tuple(item) if isinstance(item, list) else item for key, item in values[name].items()}


def _preprocess_settings(values: Mapping[str, Any], size: int) -> PreprocessSettings:
    settings = _section(values, "preprocess")
    workers = settings.pop("workers")
    for key in ("clip_percentiles", "brain_ml_warn", "brain_ml_fail", "landmark_percentiles"):
        try:
            settings[key] = tuple(float(v) for v in settings[key])
        except (TypeError, ValueError):
            raise ValueError(f"preprocess.{key} must be a list of numbers; got {list(settings[key])!r}") from None
    return PreprocessSettings(workers=workers, chain=PreprocessConfig(size=size, **settings))


def _sections(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every section of a merged mapping as its typed record, in the order the file has them."""
    try:
        selection = SelectionRules.from_dict(values["selection"])
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"selection rules: {error}") from error
    scoring = _section(values, "scoring")
    try:
        scoring["codegraph"] = CoDeGraphConfig(**values["scoring"]["codegraph"])
    except (ValueError, TypeError) as error:
        raise ConfigError(f"scoring.codegraph: {error}") from error
    encoder = EncoderSettings(**_section(values, "encoder"))
    tokens = TokenSettings(**_section(values, "tokens"))
    return {
        "loading": LoadingSettings(**_section(values, "loading")),
        "selection": selection,
        "preprocess": _preprocess_settings(values, int(tokens.grid_size) * encoder.family_patch_size),
        "encoder": encoder,
        "tokens": tokens,
        "scoring": ScoringSettings(**scoring),
        "threshold": ThresholdSettings(**values["threshold"]),
        "output": OutputSettings(**_section(values, "output")),
        "bank": BankSettings(**_section(values, "bank")),
        "cache": CacheSettings(**_section(values, "cache")),
        "execution": ExecutionSettings(**_section(values, "execution")),
    }


def load_config(
    model_path: str | os.PathLike | None = None,
    override: str | os.PathLike | Mapping[str, Any] | None = None,
) -> RunConfig:
    """Load the defaults, apply the run's overrides, and validate them once.

    Parameters
    ----------
    model_path : path-like, optional
        The model folder; its ``codegraph3d.yaml`` applies when no environment override is set.
    override : path-like or mapping, optional
        An explicit override (a YAML file or a nested mapping), applied last. Tests use it.

    Returns
    -------
    RunConfig
        The typed configuration; ``sources`` lists the files applied.

    Raises
    ------
    ConfigError
        For a missing or unreadable override file, an unknown field, a value of the wrong type or
        out of range, or settings that conflict.
    """
    values = default_config()
    overrides = [(str(path), _read_yaml(path)) for path in _override_files(model_path)]
    if isinstance(override, Mapping):
        overrides.append(("<override>", override))
    elif override is not None:
        overrides.append((str(override), _read_yaml(Path(override))))
    for source, layer in overrides:
        _merge(values, layer, source)
    return RunConfig.from_mapping(values, tuple(source for source, _ in overrides))


def _override_files(model_path: str | os.PathLike | None) -> list[Path]:
    """The configuration file of the environment variable, else the model folder's, else none."""
    env_value = os.environ.get(CONFIG_ENV_VAR, "").strip()
    if env_value:
        path = Path(env_value)
        if not path.is_file():
            raise ConfigError(
                f"{CONFIG_ENV_VAR}={env_value}: no such file; point it at a YAML file or unset it"
            )
        return [path]
    if model_path is not None and (Path(model_path) / MODEL_FOLDER_CONFIG).is_file():
        return [Path(model_path) / MODEL_FOLDER_CONFIG]
    return []


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        with path.open(encoding="utf-8") as handle:
            values = _load_yaml(handle) or {}
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the configuration file ({error})") from error
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: a configuration file must hold a mapping of sections")
    return values


def config_hash(config: RunConfig) -> str:
    """SHA-256 of the configuration's canonical JSON (sources excluded), for reports."""
    relevant = {key: value for key, value in config.as_dict().items() if key != "config_sources"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode("utf-8")).hexdigest()
