#!/usr/bin/env python3
"""Write the MAP manifests (``/etc/holoscan/app.json`` and ``pkg.json``) from ``app.yaml``.

The MONAI Deploy packager derives both manifests from the application's ``app.yaml``; the offline
image build (``tools/build_map.sh``) cannot run the packager, so this script does the same
derivation with the same keys: ``application.input-formats``/``output-formats``/``timeout``/
``version`` become the application manifest, ``resources`` (cpu, gpu, memory, gpuMemory) the
package manifest. A missing or malformed key is an error naming the key, so an image is never
built with manifests that the orchestrator would misread.

Usage::

    python map/manifests.py --app-yaml app.yaml --output DIR [--sdk-version 4.0.0]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ManifestError", "application_manifest", "package_manifest", "write_manifests"]

API_VERSION = "1.0.0"
SDK_NAME = "monai-deploy"
APPLICATION_ROOT = "/opt/holoscan/app"
MODEL_ROOT = "/opt/holoscan/models"
WORKING_DIRECTORY = "/var/holoscan"
ENTRYPOINT = "/opt/holoscan/app/map/entrypoint.py"
PYTHON = "/opt/holoscan/venv/bin/python"

#: The MAP runtime's environment; the entrypoint reads the same names (``map/entrypoint.py``).
ENVIRONMENT: dict[str, str] = {
    "HOLOSCAN_APPLICATION": APPLICATION_ROOT,
    "HOLOSCAN_INPUT_PATH": f"{WORKING_DIRECTORY}/input",
    "HOLOSCAN_OUTPUT_PATH": f"{WORKING_DIRECTORY}/output",
    "HOLOSCAN_WORKDIR": WORKING_DIRECTORY,
    "HOLOSCAN_MODEL_PATH": MODEL_ROOT,
    "HOLOSCAN_CONFIG_PATH": f"{WORKING_DIRECTORY}/app.yaml",
    "HOLOSCAN_APP_MANIFEST_PATH": "/etc/holoscan/app.json",
    "HOLOSCAN_PKG_MANIFEST_PATH": "/etc/holoscan/pkg.json",
    "HOLOSCAN_LOGS_PATH": f"{WORKING_DIRECTORY}/logs",
}

# Kubernetes-style quantities, as the packager accepts them ("16Gi", "512Mi", "10GB").
_QUANTITY = re.compile(r"^\d+(\.\d+)?\s*(Ki|Mi|Gi|Ti|KB|MB|GB|TB)?$")


class ManifestError(ValueError):
    """``app.yaml`` lacks a key the manifests need, or holds a value of the wrong kind."""


def _require(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise ManifestError(f"app.yaml: missing '{where}{key}'")
    return mapping[key]


def _formats(value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ManifestError(f"app.yaml: 'application.{key}' must be a non-empty list of names, got {value!r}")
    return [{"type": name} for name in value]


def application_manifest(config: Mapping[str, Any], sdk_version: str) -> dict[str, Any]:
    """The application manifest (``app.json``) that the MAP specification defines.

    Parameters
    ----------
    config
        The parsed ``app.yaml``.
    sdk_version
        The MONAI Deploy App SDK version the image installs.
    """
    application = _require(config, "application", "")
    timeout = application.get("timeout", 0)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
        raise ManifestError(f"app.yaml: 'application.timeout' must be whole seconds >= 0, got {timeout!r}")
    return {
        "apiVersion": API_VERSION,
        "command": json.dumps([PYTHON, ENTRYPOINT]),
        "environment": dict(ENVIRONMENT),
        "input": {"path": "input/", "formats": _formats(_require(application, "input-formats", "application."), "input-formats")},
        "output": {"path": "output/", "formats": _formats(_require(application, "output-formats", "application."), "output-formats")},
        "readiness": None,
        "liveness": None,
        "sdk": SDK_NAME,
        "sdkVersion": sdk_version,
        "timeout": timeout,
        "version": str(_require(application, "version", "application.")),
        "workingDirectory": WORKING_DIRECTORY,
    }


def package_manifest(config: Mapping[str, Any], models: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The package manifest (``pkg.json``): where the app and models live, and what it needs.

    Parameters
    ----------
    config
        The parsed ``app.yaml``.
    models
        Model name -> path inside the image, for the models baked into the image.
    """
    application = _require(config, "application", "")
    resources = _require(config, "resources", "")
    checked: dict[str, Any] = {}
    for key in ("cpu", "gpu"):
        value = _require(resources, key, "resources.")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ManifestError(f"app.yaml: 'resources.{key}' must be a number >= 0, got {value!r}")
        checked[key] = value
    for key in ("memory", "gpuMemory"):
        value = str(_require(resources, key, "resources."))
        if not _QUANTITY.match(value):
            raise ManifestError(f"app.yaml: 'resources.{key}' must be a quantity such as 16Gi, got {value!r}")
        checked[key] = value
    return {
        "apiVersion": API_VERSION,
        "applicationRoot": APPLICATION_ROOT,
        "modelRoot": MODEL_ROOT,
        "models": dict(models or {}),
        "resources": checked,
        "version": str(_require(application, "version", "application.")),
        "platformConfig": "dgpu" if checked["gpu"] else "cpu",
    }


def write_manifests(app_yaml: Path, output: Path, sdk_version: str, models: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """Read ``app_yaml`` and write ``app.json`` and ``pkg.json`` into ``output``."""
    import yaml  # the image installs PyYAML with the app; the entrypoint itself stays stdlib-only

    try:
        config = yaml.safe_load(Path(app_yaml).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ManifestError(f"cannot read {app_yaml}: {error}") from error
    if not isinstance(config, Mapping):
        raise ManifestError(f"{app_yaml}: expected a mapping at the top level")
    app = application_manifest(config, sdk_version)
    package = package_manifest(config, models)
    output.mkdir(parents=True, exist_ok=True)
    paths = (output / "app.json", output / "pkg.json")
    for path, manifest in zip(paths, (app, package)):
        path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths


def _models_argument(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app-yaml", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="folder for app.json and pkg.json")
    parser.add_argument("--sdk-version", default="4.0.0")
    parser.add_argument("--model", action="append", type=_models_argument, default=[], metavar="NAME=PATH",
                        help="a model baked into the image (repeatable)")
    args = parser.parse_args(argv)
    try:
        paths = write_manifests(args.app_yaml, args.output, args.sdk_version, dict(args.model))
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
