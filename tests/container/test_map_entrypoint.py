"""The MAP container's entrypoint (map/entrypoint.py): verbs, logs and a truthful exit status."""

from __future__ import annotations

import io
import json
import signal
import sys
from pathlib import Path

import pytest
from fixtures import ROOT

sys.path.insert(0, str(ROOT / "map"))
import entrypoint  # noqa: E402


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A MAP layout under tmp_path, wired through the HOLOSCAN_* environment."""
    paths = {
        "HOLOSCAN_INPUT_PATH": tmp_path / "input",
        "HOLOSCAN_OUTPUT_PATH": tmp_path / "output",
        "HOLOSCAN_MODEL_PATH": tmp_path / "models",
        "HOLOSCAN_LOGS_PATH": tmp_path / "logs",
        "HOLOSCAN_CONFIG_PATH": tmp_path / "app.yaml",
        "HOLOSCAN_APP_MANIFEST_PATH": tmp_path / "etc" / "app.json",
        "HOLOSCAN_PKG_MANIFEST_PATH": tmp_path / "etc" / "pkg.json",
        "HOLOSCAN_EXPORT_PATH": tmp_path / "export",
        "HOLOSCAN_APPLICATION": ROOT,
    }
    for name, path in paths.items():
        monkeypatch.setenv(name, str(path))
    for name in ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH"):
        paths[name].mkdir()
    return paths


def test_show_prints_both_manifests_and_names_a_missing_one(layout, capsys):
    out = io.StringIO()
    assert entrypoint.main(["show"], out) == entrypoint.EXIT_USAGE  # no manifests yet
    assert "app.json (HOLOSCAN_APP_MANIFEST_PATH)" in capsys.readouterr().err
    layout["HOLOSCAN_APP_MANIFEST_PATH"].parent.mkdir()
    layout["HOLOSCAN_APP_MANIFEST_PATH"].write_text(json.dumps({"apiVersion": "1.0.0", "command": "python3 app.py"}))
    layout["HOLOSCAN_PKG_MANIFEST_PATH"].write_text(json.dumps({"applicationRoot": "/opt/holoscan/app"}))
    assert entrypoint.main(["show"], out) == 0
    text = out.getvalue()
    assert '"command": "python3 app.py"' in text and '"applicationRoot": "/opt/holoscan/app"' in text


def test_env_lists_the_layout_and_marks_defaults(layout, monkeypatch):
    monkeypatch.delenv("HOLOSCAN_EXPORT_PATH")
    out = io.StringIO()
    assert entrypoint.main(["env"], out) == 0
    lines = out.getvalue().splitlines()
    assert f"HOLOSCAN_INPUT_PATH={layout['HOLOSCAN_INPUT_PATH']}" in lines
    assert "HOLOSCAN_EXPORT_PATH=/var/run/holoscan/export  (default)" in lines


def test_extract_copies_app_config_and_models_and_refuses_a_missing_folder(layout, tmp_path, monkeypatch, capsys):
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text("print('app')\n")
    monkeypatch.setenv("HOLOSCAN_APPLICATION", str(app))
    (layout["HOLOSCAN_MODEL_PATH"] / "landmarks.json").write_text("{}")
    layout["HOLOSCAN_CONFIG_PATH"].write_text("scoring: {}\n")
    out = io.StringIO()
    assert entrypoint.main(["extract"], out) == entrypoint.EXIT_USAGE
    assert "mount a writable host folder" in capsys.readouterr().err
    layout["HOLOSCAN_EXPORT_PATH"].mkdir()
    assert entrypoint.main(["extract"], out) == 0
    export = layout["HOLOSCAN_EXPORT_PATH"]
    assert (export / "app" / "app.py").read_text() == "print('app')\n"
    assert (export / "models" / "landmarks.json").is_file()
    assert (export / "config" / "app.yaml").read_text() == "scoring: {}\n"


def test_unknown_verb_and_stray_arguments_are_usage_errors(layout, capsys):
    assert entrypoint.main(["deploy"], io.StringIO()) == entrypoint.EXIT_USAGE
    assert "unknown verb 'deploy'" in capsys.readouterr().err
    assert entrypoint.main(["show", "x"], io.StringIO()) == entrypoint.EXIT_USAGE
    help_text = io.StringIO()
    assert entrypoint.main(["help"], help_text) == 0 and "extract" in help_text.getvalue()


@pytest.mark.parametrize("body, status", [
    ("import sys; print('scored'); sys.exit(0)", 0),
    ("import sys; print('bad input', file=sys.stderr); sys.exit(2)", 2),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 128 + signal.SIGTERM),
])
def test_run_returns_the_application_status_and_logs_its_output(layout, tmp_path, monkeypatch, body, status):
    # A stand-in application: what is under test here is the entrypoint's plumbing.
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(
        "import sys\nprint('argv', sys.argv[1:])\n" + body + "\n", encoding="utf-8"
    )
    monkeypatch.setenv("HOLOSCAN_APPLICATION", str(app))
    out = io.StringIO()
    assert entrypoint.main([], out) == status
    logs = list(layout["HOLOSCAN_LOGS_PATH"].glob("app-*.log"))
    assert len(logs) == 1
    logged = logs[0].read_text(encoding="utf-8")
    assert logged == out.getvalue()
    assert f"'-i', '{layout['HOLOSCAN_INPUT_PATH']}'" in logged
    assert f"application exited with status {status}" in logged


def test_run_without_a_log_folder_still_runs_and_warns(layout, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("HOLOSCAN_LOGS_PATH", str(blocker / "logs"))
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text("print('ran')\n")
    monkeypatch.setenv("HOLOSCAN_APPLICATION", str(app))
    out = io.StringIO()
    assert entrypoint.main(["run"], out) == 0
    assert "cannot write logs" in out.getvalue() and "ran" in out.getvalue()


def test_the_real_app_on_input_without_mr_series_fails_through_the_entrypoint(layout, monkeypatch):
    monkeypatch.setenv("HOLOSCAN_CONFIG_PATH", str(ROOT / "app.yaml"))  # the SDK reads it
    (layout["HOLOSCAN_INPUT_PATH"] / "notes.txt").write_text("not DICOM\n")
    out = io.StringIO()
    status = entrypoint.main([], out)
    assert status == 2  # operators.runtime.EXIT_INPUT: bad input, not success
    logged = next(layout["HOLOSCAN_LOGS_PATH"].glob("app-*.log")).read_text(encoding="utf-8")
    assert str(layout["HOLOSCAN_INPUT_PATH"]) in logged
    assert "no readable DICOM study found" in logged
    assert "application exited with status 2" in logged
    # The output holds only the failure report, which says the same.
    assert [p.name for p in layout["HOLOSCAN_OUTPUT_PATH"].iterdir()] == ["report.json"]
    report = json.loads((layout["HOLOSCAN_OUTPUT_PATH"] / "report.json").read_text(encoding="utf-8"))
    assert (report["status"], report["exit_code"]) == ("failed", 2)


def test_an_app_killed_while_writing_leaves_no_half_written_file(layout, tmp_path, monkeypatch):
    """SIGKILL (the OOM killer; Holoscan's forced exit) runs no clean-up: the entrypoint does it."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "from codegraph3d.core.files import atomic_path\n"
        "output = Path(sys.argv[sys.argv.index('-o') + 1])\n"
        "with atomic_path(output / 'SEG' / 'whole.dcm') as temporary:\n"
        "    temporary.write_bytes(b'whole')\n"
        "with atomic_path(output / 'SEG' / 'cut.dcm') as temporary:\n"
        "    temporary.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("HOLOSCAN_APPLICATION", str(app))
    out = io.StringIO()
    assert entrypoint.main([], out) == 128 + signal.SIGKILL
    output = layout["HOLOSCAN_OUTPUT_PATH"]
    assert sorted(p.name for p in (output / "SEG").iterdir()) == ["whole.dcm"]
    assert f"removed 1 half-written file(s) from {output}" in out.getvalue()
