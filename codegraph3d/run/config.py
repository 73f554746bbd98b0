"""One configuration file with the product's defaults (the paper's, except where
``default_config.yaml`` says otherwise), overridable per run.

The defaults live in ``default_config.yaml`` beside this module, documented field by field. A run
overrides them with a YAML file holding only the fields to change:

1. the file named by the environment variable ``CODEGRAPH3D_CONFIG``, else
2. ``codegraph3d.yaml`` in the model folder, else
3. nothing (the defaults).

Overrides are validated eagerly against the defaults: an unknown section or field, or a value of
another type, is an error naming the file and the field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from codegraph3d.decision.lesion_policy import LesionPolicy
from codegraph3d.scoring.maps import INTERPOLATIONS

__all__ = [
    "ConfigError", "CONFIG_ENV_VAR", "MODEL_FOLDER_CONFIG", "default_config", "load_config", "config_hash",
    "lesion_policy_of",
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
_WHOLE_MAPPINGS = frozenset({"threshold.finding_mass_by_contrast"})


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
        if not _compatible(default, value):
            raise ConfigError(
                f"{source}: configuration field '{name}' must be of type {type(default).__name__}; "
                f"got {value!r}"
            )
        base[key] = copy.deepcopy(value)


def load_config(
    model_path: str | os.PathLike | None = None,
    override: str | os.PathLike | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the defaults and apply the run's overrides.

    Parameters
    ----------
    model_path : path-like, optional
        The model folder; its ``codegraph3d.yaml`` applies when no environment override is set.
    override : path-like or mapping, optional
        An explicit override (a YAML file or a nested mapping), applied last. Tests use it.

    Returns
    -------
    dict
        The merged configuration, with ``config_sources`` listing the files applied.

    Raises
    ------
    ConfigError
        For a missing or unreadable override file, an unknown field or a value of the wrong type.
    """
    config = default_config()
    sources: list[str] = []
    candidates: list[Path] = []
    env_value = os.environ.get(CONFIG_ENV_VAR, "").strip()
    if env_value:
        path = Path(env_value)
        if not path.is_file():
            raise ConfigError(
                f"{CONFIG_ENV_VAR}={env_value}: no such file; point it at a YAML file or unset it"
            )
        candidates.append(path)
    elif model_path is not None and (Path(model_path) / MODEL_FOLDER_CONFIG).is_file():
        candidates.append(Path(model_path) / MODEL_FOLDER_CONFIG)
    overrides: list[tuple[str, Mapping[str, Any]]] = []
    for path in candidates:
        overrides.append((str(path), _read_yaml(path)))
    if isinstance(override, Mapping):
        overrides.append(("<override>", override))
    elif override is not None:
        overrides.append((str(override), _read_yaml(Path(override))))
    for source, values in overrides:
        _merge(config, values, source)
        sources.append(source)
    _validate(config)
    config["config_sources"] = sources
    return config


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


def _validate(config: Mapping[str, Any]) -> None:
    """Cross-field checks that single-field types cannot express."""
    from codegraph3d.io.selection import SelectionRules

    try:
        SelectionRules.from_dict(config["selection"])
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"selection rules: {error}") from error
    if not 0.0 < config["scoring"]["k_fraction"] <= 1.0:
        raise ConfigError(f"scoring.k_fraction must lie in (0, 1]; got {config['scoring']['k_fraction']}")
    if config["scoring"]["exclude_same"] not in ("patient_id", "study", "none"):
        raise ConfigError(
            "scoring.exclude_same must be one of patient_id, study, none; "
            f"got {config['scoring']['exclude_same']!r}"
        )
    if not isinstance(config["scoring"]["window_radius"], int) or config["scoring"]["window_radius"] < -1:
        raise ConfigError(f"scoring.window_radius must be -1 (global) or a radius >= 0; got {config['scoring']['window_radius']}")
    if config["scoring"]["method"] not in ("musc", "codegraph"):
        raise ConfigError(f"scoring.method must be musc or codegraph; got {config['scoring']['method']!r}")
    try:
        from codegraph3d.scoring.codegraph import CoDeGraphConfig

        CoDeGraphConfig(**config["scoring"]["codegraph"])
    except (ValueError, TypeError) as error:
        raise ConfigError(f"scoring.codegraph: {error}") from error
    preprocess = {key: value for key, value in config["preprocess"].items() if key != "workers"}
    for key in ("clip_percentiles", "landmark_percentiles", "brain_ml_warn", "brain_ml_fail"):
        preprocess[key] = tuple(preprocess[key])
    try:
        from codegraph3d.preprocess.chain import PreprocessConfig

        PreprocessConfig(**preprocess)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error
    workers = config["preprocess"]["workers"]
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"preprocess.workers must be an integer >= 0 (0 = automatic); got {workers!r}")
    if config["loading"]["studies_per_chunk"] < 1:
        raise ConfigError("loading.studies_per_chunk must be at least 1")
    if not 0.0 < config["tokens"]["min_brain_fraction"] <= 1.0:
        raise ConfigError("tokens.min_brain_fraction must lie in (0, 1]")
    if any(not isinstance(layer, int) or layer < 1 for layer in config["encoder"]["layers"]):
        raise ConfigError(f"encoder.layers must be 1-based block indices; got {config['encoder']['layers']}")
    if config["scoring"]["memory_budget_mb"] < 0:
        raise ConfigError(f"scoring.memory_budget_mb must be >= 0 (0 = no bound); got {config['scoring']['memory_budget_mb']!r}")
    if config["scoring"]["precision"] not in ("float32", "tf32"):
        raise ConfigError(f"scoring.precision must be float32 or tf32; got {config['scoring']['precision']!r}")
    batch_size = config["scoring"]["batch_size"]
    if not isinstance(batch_size, int) or batch_size == 1 or batch_size < 0:
        raise ConfigError(f"scoring.batch_size must be 0 (one batch) or at least 2; got {batch_size!r}")
    if not isinstance(config["scoring"]["batch_seed"], int) or config["scoring"]["batch_seed"] < 0:
        raise ConfigError(f"scoring.batch_seed must be an integer >= 0; got {config['scoring']['batch_seed']!r}")
    bank = config["bank"]
    threshold = config["threshold"]
    if threshold["policy"] not in ("lesion", "robust_z", "bank"):
        raise ConfigError(f"threshold.policy must be lesion, robust_z or bank; got {threshold['policy']!r}")
    if not (np.isfinite(threshold["min_finding_ml"]) and threshold["min_finding_ml"] >= 0):
        raise ConfigError(f"threshold.min_finding_ml must be >= 0; got {threshold['min_finding_ml']!r}")
    scored = config["selection"]["scored_contrasts"]
    for contrast, mass in threshold["finding_mass_by_contrast"].items():
        if contrast not in scored:
            raise ConfigError(
                f"threshold.finding_mass_by_contrast: {contrast!r} is not a scored contrast "
                f"(selection.scored_contrasts: {scored}); name the contrast batches as the report does"
            )
        if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not (np.isfinite(mass) and mass >= 0):
            raise ConfigError(
                f"threshold.finding_mass_by_contrast.{contrast} must be a number >= 0 (z x ml); got {mass!r}"
            )
    if threshold["reference"] not in ("auto", "batch"):
        raise ConfigError(f"threshold.reference must be auto or batch; got {threshold['reference']!r}")
    try:
        lesion_policy_of(config)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    for key in ("mask_interpolation", "score_interpolation"):
        if config["output"][key] not in INTERPOLATIONS:
            raise ConfigError(f"output.{key} must be one of {list(INTERPOLATIONS)}; got {config['output'][key]!r}")
    if config["threshold"]["policy"] == "bank" and not bank["folder"]:
        raise ConfigError("threshold.policy bank needs a cohort bank: set bank.folder")
    if bank["add_scored"] not in ("none", "unflagged", "all"):
        raise ConfigError(f"bank.add_scored must be none, unflagged or all; got {bank['add_scored']!r}")
    for key, low in (("min_patients", 2), ("max_references", 1), ("seed", 0)):
        if not isinstance(bank[key], int) or bank[key] < low:
            raise ConfigError(f"bank.{key} must be an integer >= {low}; got {bank[key]!r}")
    if bank["folder"] and Path(bank["folder"]).expanduser().exists() and not Path(bank["folder"]).expanduser().is_dir():
        raise ConfigError(f"bank.folder {bank['folder']!r} is a file; point it at the cohort bank's folder, or '' to turn it off")
    folder = config["cache"]["folder"]
    if folder and Path(folder).expanduser().exists() and not Path(folder).expanduser().is_dir():
        raise ConfigError(
            f"cache.folder {folder!r} is a file; point it at a folder for the token cache, or '' to turn it off"
        )


def lesion_policy_of(config: Mapping[str, Any], contrast: str | None = None) -> LesionPolicy:
    """The ``threshold`` section's lesion-policy settings as a validated :class:`LesionPolicy`.

    Parameters
    ----------
    config : mapping
        The run configuration.
    contrast : str, optional
        The contrast batch decided: its ``finding_mass_by_contrast`` entry, if any, replaces
        ``finding_mass``.
    """
    threshold = config["threshold"]
    mass = threshold["finding_mass_by_contrast"].get(contrast, threshold["finding_mass"])
    return LesionPolicy(
        token_z=threshold["token_z"], finding_mass=mass,
        voxel_z=threshold["voxel_z"], prior_volumes=threshold["prior_volumes"],
        tail_quantile=threshold["tail_quantile"], bank_false_flag_rate=threshold["bank_false_flag_rate"],
        bank_confidence=threshold["bank_confidence"],
    )


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the configuration's canonical JSON (sources excluded), for reports and caches."""
    relevant = {key: value for key, value in config.items() if key != "config_sources"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode("utf-8")).hexdigest()
