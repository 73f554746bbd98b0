"""Process set-up the SDK needs before it is imported, and the exit-code contract of the app.

Import this module before ``monai.deploy``: the SDK's Holoscan runtime loads ``libcudart.so.13``
even on a CPU-only machine, and the ``nvidia-cuda-runtime`` wheel (pinned in requirements-cpu.txt) ships it
inside site-packages, where the dynamic loader does not look. Loading it here by absolute path
makes ``python app.py`` work with no environment set-up by the user.
"""

from __future__ import annotations

import ctypes
import gc
import glob
import logging
import os
import resource
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable

__all__ = ["prepare_process", "run_application", "EXIT_OK", "EXIT_INPUT", "EXIT_INTERNAL"]

EXIT_OK = 0
EXIT_INPUT = 2
EXIT_INTERNAL = 1
_STACK_BYTES = 32 * 1024 * 1024


def prepare_process() -> None:
    """Preload the bundled CUDA runtime and raise the stack limit Holoscan asks for."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    for library in sorted(glob.glob(str(site_packages / "nvidia" / "cu13" / "lib" / "libcudart.so.13*"))):
        try:
            ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError:
            continue
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = _STACK_BYTES if hard == resource.RLIM_INFINITY else min(_STACK_BYTES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            # Applies to threads created from now on, which is where Holoscan runs operators.
            resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
        except (ValueError, OSError):
            pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_application(make_app: Callable[[], Any]) -> int:
    """Run the app and map its outcome to the documented exit codes.

    0: every selected series was scored or skipped with a recorded reason; 2: nothing could be
    scored (bad or empty input, missing weights, bad configuration); 1: an internal error. For a
    non-zero exit the message is the last log line and, when possible, in report.json.
    """
    from codegraph3d.run.config import ConfigError, RunConfig
    from codegraph3d.run.pipeline import CohortError
    from codegraph3d.run.report import write_failure_report

    app = None
    try:
        app = make_app()
        app.run()
    except (CohortError, ConfigError) as error:
        code, message = EXIT_INPUT, str(error)
    except SystemExit as error:  # argparse: bad command line
        return int(error.code or 0)
    except Exception as error:  # noqa: BLE001 - the contract: any other failure is exit code 1
        logging.getLogger("codegraph3d").exception("internal error")
        code, message = EXIT_INTERNAL, f"internal error: {type(error).__name__}: {error}"
    else:
        return EXIT_OK
    output = getattr(app, "output_folder", None)
    # Before the configuration loads, app.config is still the SDK Application's config() method.
    config = getattr(app, "config", None)
    config = config if isinstance(config, RunConfig) else None
    encoder = getattr(app, "encoder_identity", None)
    # The application logs its own teardown when it is destroyed: let that happen now, so that
    # the failure stays the last line of the log.
    del app
    gc.collect()
    if output is not None:
        write_failure_report(output, message, code, config, encoder)
    logging.getLogger("codegraph3d").error("FAILED (exit code %d): %s", code, message)
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    return code
