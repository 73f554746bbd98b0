"""Optional packages, imported where they are used, with one message format when one is missing.

The product runs without deepbet or HD-BET (a configuration chooses another method); a missing
one is an error only when the configuration asks for it, and the error names the feature, the
package(s), the install command and the alternative. MONAI's ``optional_import`` does the same
job, but importing any part of ``monai`` loads the whole ``monai`` namespace, the Deploy SDK and
Holoscan included (docs/ARCHITECTURE.md), which this SDK-free library must not do.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["OptionalDependencyError", "missing_packages", "missing_message", "optional_import"]


class OptionalDependencyError(ImportError):
    """An optional package the configuration needs is not installed; the message says how to fix it."""


def missing_packages(*names: str) -> list[str]:
    """The top-level packages among ``names`` that cannot be imported here (nothing is imported)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def missing_message(feature: str, packages: list[str], install: str, alternative: str = "", detail: str = "") -> str:
    """The one wording of a missing optional package: feature, package(s), install command, alternative."""
    names = ", ".join(packages)
    text = f"{feature} needs {names}, which {'is' if len(packages) == 1 else 'are'} not installed"
    text += f" ({detail})" if detail else ""
    text += f"; install it with '{install}'"
    return text + (f", or {alternative}" if alternative else "")


def optional_import(module: str, feature: str, install: str, alternative: str = "") -> ModuleType:
    """Import ``module``; an :class:`OptionalDependencyError` in :func:`missing_message`'s wording if it fails.

    Parameters
    ----------
    module : str
        Dotted module name (its top-level package is the one named as missing).
    feature : str
        What needs it, as the user configured it (``"skull stripping method 'deepbet'"``).
    install : str
        The command that installs it.
    alternative : str, optional
        What to configure instead.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise OptionalDependencyError(
            missing_message(feature, [module.split(".")[0]], install, alternative, detail=str(error))
        ) from error
