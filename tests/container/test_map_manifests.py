"""The MAP manifests derived from app.yaml (map/manifests.py), and the entrypoint's ``show`` of them."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures import ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "map" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


manifests = _load("manifests")
entrypoint = _load("entrypoint")
APP_YAML = yaml.safe_load((ROOT / "app.yaml").read_text(encoding="utf-8"))


def test_the_projects_app_yaml_gives_complete_manifests():
    app = manifests.application_manifest(APP_YAML, "4.0.0")
    package = manifests.package_manifest(APP_YAML, {"dinov2-large": "/opt/holoscan/models/dinov2-large"})
    assert app["input"]["formats"] == [{"type": "file"}] and app["output"]["formats"] == [{"type": "file"}]
    assert json.loads(app["command"])[-1] == "/opt/holoscan/app/map/entrypoint.py"
    assert app["timeout"] == APP_YAML["application"]["timeout"] and app["version"] == APP_YAML["application"]["version"]
    assert app["environment"]["HOLOSCAN_CONFIG_PATH"] == "/var/holoscan/app.yaml"
    # The entrypoint's layout defaults are the manifest's environment.
    for name, value in app["environment"].items():
        if name in entrypoint.DEFAULTS:
            assert entrypoint.DEFAULTS[name] == value, name
    assert package["resources"] == {k: APP_YAML["resources"][k] for k in ("cpu", "gpu", "memory", "gpuMemory")}
    assert package["models"] == {"dinov2-large": "/opt/holoscan/models/dinov2-large"}
    assert package["platformConfig"] == "dgpu"


def test_cpu_only_resources_give_a_cpu_platform():
    config = copy.deepcopy(APP_YAML)
    config["resources"]["gpu"] = 0
    assert manifests.package_manifest(config)["platformConfig"] == "cpu"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda c: c["application"].pop("input-formats"), "application.input-formats"),
        (lambda c: c["application"].__setitem__("output-formats", []), "application.output-formats"),
        (lambda c: c["application"].__setitem__("timeout", "long"), "application.timeout"),
        (lambda c: c["resources"].pop("gpuMemory"), "resources.gpuMemory"),
        (lambda c: c["resources"].__setitem__("memory", "lots"), "resources.memory"),
        (lambda c: c["resources"].__setitem__("cpu", -1), "resources.cpu"),
        (lambda c: c.pop("resources"), "'resources'"),
    ],
)
def test_a_bad_app_yaml_is_refused_naming_the_key(edit, fragment):
    config = copy.deepcopy(APP_YAML)
    edit(config)
    with pytest.raises(manifests.ManifestError, match=fragment.replace(".", r"\.")):
        manifests.application_manifest(config, "4.0.0")
        manifests.package_manifest(config)


def test_command_line_writes_manifests_that_the_entrypoint_shows(tmp_path: Path, monkeypatch):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "map" / "manifests.py"), "--app-yaml", str(ROOT / "app.yaml"),
         "--output", str(tmp_path), "--model", "template=/opt/holoscan/models/template"],
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads((tmp_path / "pkg.json").read_text())["models"] == {"template": "/opt/holoscan/models/template"}
    monkeypatch.setenv("HOLOSCAN_APP_MANIFEST_PATH", str(tmp_path / "app.json"))
    monkeypatch.setenv("HOLOSCAN_PKG_MANIFEST_PATH", str(tmp_path / "pkg.json"))
    out = io.StringIO()
    assert entrypoint.main(["show"], out) == 0
    assert '"applicationRoot": "/opt/holoscan/app"' in out.getvalue()


def test_command_line_refuses_a_broken_app_yaml(tmp_path: Path):
    bad = tmp_path / "app.yaml"
    bad.write_text("application:\n  version: 1\n", encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "map" / "manifests.py"), "--app-yaml", str(bad), "--output", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert completed.returncode == 2 and "application.input-formats" in completed.stderr
    assert not (tmp_path / "out").exists()
