#!/usr/bin/env python3
"""Entrypoint of the MAP container: runs the app and returns *its* exit code.

The stock MAP entrypoint exits 0 even when the application fails, which hides failures from the
clinical orchestrator. This one keeps the stock verbs and tells the truth:

``run`` (default, also with no verb)
    ``python $HOLOSCAN_APPLICATION/app.py -i $HOLOSCAN_INPUT_PATH -o $HOLOSCAN_OUTPUT_PATH
    -m $HOLOSCAN_MODEL_PATH`` plus any further arguments. Its output goes to stdout and to
    ``$HOLOSCAN_LOGS_PATH/app-<UTC time>.log``; the exit status is the app's (0 done, 2 bad
    input, 1 internal error; a signal ``N`` gives ``128 + N`` as in a shell).
``show``
    Prints the application and package manifests (``$HOLOSCAN_APP_MANIFEST_PATH``,
    ``$HOLOSCAN_PKG_MANIFEST_PATH``).
``env``
    Prints the ``HOLOSCAN_*`` environment.
``extract``
    Copies the application, its configuration and the models to ``$HOLOSCAN_EXPORT_PATH``
    (mount a host folder there): ``app/``, ``config/app.yaml``, ``models/``.

Standard library only: it must work in the image before anything else is imported.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TextIO

#: Defaults of the MAP layout (overridden by the environment of the same name).
DEFAULTS: dict[str, str] = {
    "HOLOSCAN_APPLICATION": "/opt/holoscan/app",
    "HOLOSCAN_INPUT_PATH": "/var/holoscan/input",
    "HOLOSCAN_OUTPUT_PATH": "/var/holoscan/output",
    "HOLOSCAN_MODEL_PATH": "/opt/holoscan/models",
    "HOLOSCAN_LOGS_PATH": "/var/holoscan/logs",
    "HOLOSCAN_CONFIG_PATH": "/var/holoscan/app.yaml",
    "HOLOSCAN_APP_MANIFEST_PATH": "/etc/holoscan/app.json",
    "HOLOSCAN_PKG_MANIFEST_PATH": "/etc/holoscan/pkg.json",
    "HOLOSCAN_EXPORT_PATH": "/var/run/holoscan/export",
}

EXIT_USAGE = 2

USAGE = """usage: entrypoint [run [APP_ARGS...] | show | env | extract | help]
  run      run the application on $HOLOSCAN_INPUT_PATH (default verb); exit status = the app's
  show     print the application and package manifests
  env      print the HOLOSCAN_* environment
  extract  copy the application, its configuration and models to $HOLOSCAN_EXPORT_PATH"""


def setting(name: str) -> str:
    """The environment's value of a MAP variable, or the MAP layout's default."""
    return os.environ.get(name) or DEFAULTS[name]


def show(out: TextIO) -> int:
    """Print both manifests; a missing or unreadable one is an error naming the file."""
    for name in ("HOLOSCAN_APP_MANIFEST_PATH", "HOLOSCAN_PKG_MANIFEST_PATH"):
        path = Path(setting(name))
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            print(f"error: cannot read the manifest {path} ({name}): {error}", file=sys.stderr)
            return EXIT_USAGE
        out.write(f"{path}:\n{json.dumps(manifest, indent=2, sort_keys=True)}\n")
    return 0


def show_env(out: TextIO) -> int:
    """Print every HOLOSCAN_* variable the app will see (layout defaults marked)."""
    names = sorted(set(DEFAULTS) | {k for k in os.environ if k.startswith("HOLOSCAN_")})
    for name in names:
        value = os.environ.get(name)
        out.write(f"{name}={value}\n" if value else f"{name}={DEFAULTS[name]}  (default)\n")
    return 0


def extract(out: TextIO) -> int:
    """Copy app, configuration and models to the export folder, refusing a missing folder."""
    export = Path(setting("HOLOSCAN_EXPORT_PATH"))
    if not export.is_dir() or not os.access(export, os.W_OK):
        print(
            f"error: the export folder {export} does not exist or is not writable; mount a writable "
            "host folder there (for example: -v $PWD/export:/var/run/holoscan/export)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    copies = [
        (Path(setting("HOLOSCAN_APPLICATION")), export / "app"),
        (Path(setting("HOLOSCAN_MODEL_PATH")), export / "models"),
    ]
    for source, target in copies:
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
            out.write(f"extracted {source} -> {target}\n")
        else:
            out.write(f"skipped {source}: not present\n")
    config = Path(setting("HOLOSCAN_CONFIG_PATH"))
    if config.is_file():
        (export / "config").mkdir(exist_ok=True)
        shutil.copy2(config, export / "config" / config.name)
        out.write(f"extracted {config} -> {export / 'config' / config.name}\n")
    return 0


def _log_file(out: TextIO) -> TextIO | None:
    logs = Path(setting("HOLOSCAN_LOGS_PATH"))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    try:
        logs.mkdir(parents=True, exist_ok=True)
        return open(logs / f"app-{stamp}-{os.getpid()}.log", "w", encoding="utf-8")  # noqa: SIM115
    except OSError as error:
        # Still run: a missing log folder must not cost the clinical result, but say so.
        out.write(f"warning: cannot write logs to {logs} ({error}); logging to stdout only\n")
        return None


def remove_partials(output: Path) -> str:
    """Delete the half-written files an interrupted app left in the output folder.

    The app writes every result under a hidden temporary name (``.<name>.<random>.partial``) and
    renames it when whole (``codegraph3d/core/files.py``). An app stopped midway (Holoscan force-exits
    3 s after SIGTERM; the kernel's OOM killer gives no warning) cannot clean up, so the
    entrypoint, which outlives it, does. Returns the line to log ("" when nothing was left).
    """
    removed = 0
    if output.is_dir():
        for path in output.rglob(".*.partial"):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return f"entrypoint: removed {removed} half-written file(s) from {output}\n" if removed else ""


def run(app_args: list[str], out: TextIO) -> int:
    """Run the app, copy its output to ``out`` and the log file, return its exit status."""
    application = Path(setting("HOLOSCAN_APPLICATION"))
    script = application / "app.py"
    if not script.is_file():
        print(f"error: no application at {script} (HOLOSCAN_APPLICATION={application})", file=sys.stderr)
        return EXIT_USAGE
    command = [
        sys.executable, str(script),
        "-i", setting("HOLOSCAN_INPUT_PATH"),
        "-o", setting("HOLOSCAN_OUTPUT_PATH"),
        "-m", setting("HOLOSCAN_MODEL_PATH"),
        *app_args,
    ]
    log = _log_file(out)
    try:
        process = subprocess.Popen(
            command, cwd=application, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace", bufsize=1,
        )
        # As PID 1 of a container this process gets the orchestrator's SIGTERM and the kernel
        # ignores it for PID 1 by default: pass it on, so the app stops (and cleans up) at once.
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda received, _frame: process.send_signal(received))
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            out.flush()
            if log is not None:
                log.write(line)
                log.flush()
        status = process.wait()
        if status < 0:  # killed by a signal: report it as a shell would
            status = 128 - status
        summary = remove_partials(Path(setting("HOLOSCAN_OUTPUT_PATH")))
        summary += f"entrypoint: application exited with status {status}\n"
        out.write(summary)
        if log is not None:
            log.write(summary)
        return status
    finally:
        if log is not None:
            log.close()


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Dispatch a verb; see the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    stream = sys.stdout if out is None else out
    verb = args[0] if args and not args[0].startswith("-") else "run"
    rest = args[1:] if args and not args[0].startswith("-") else args
    if verb == "run":
        return run(rest, stream)
    if verb in ("show", "env", "extract") and rest:
        print(f"error: '{verb}' takes no arguments\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    if verb == "show":
        return show(stream)
    if verb == "env":
        return show_env(stream)
    if verb == "extract":
        return extract(stream)
    if verb in ("help", "--help", "-h"):
        stream.write(USAGE + "\n")
        return 0
    print(f"error: unknown verb {verb!r}\n{USAGE}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
