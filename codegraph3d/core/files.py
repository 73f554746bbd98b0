"""Files that appear whole: written under a temporary name in the same folder, then renamed."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "write_json_atomic", "remove_partials", "PARTIAL_SUFFIX"]


PARTIAL_SUFFIX = ".partial"


def remove_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed run left under ``folder``; return what was removed.

    Only names this module makes (``.<name>.<random>.partial``) are touched. Call it when no
    other process writes there: at the start of a run, or after the app has exited.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(f".*{PARTIAL_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block succeeds.

    The temporary file starts with ``.`` and ends with ``.partial`` so that a reader listing the
    folder never mistakes it for a result; it is removed when the block fails.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    # mkstemp creates 0600; results must be readable like any other file the process writes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json_atomic(target: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``target`` atomically and return the path."""
    with atomic_path(target) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(target)
