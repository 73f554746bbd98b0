"""``codegraph3d template install MODEL_FOLDER``: copy the MNI152 template into a model folder.

The template is the MNI152 2009c T1 brain that nilearn ships (nothing is read from the network);
:func:`codegraph3d.preprocess.registration.install_template` puts it under ``MODEL_FOLDER/template/``.
"""

from __future__ import annotations

import argparse

from codegraph3d.preprocess.registration import install_template

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``install`` action to ``parser``."""
    actions = parser.add_subparsers(dest="command", required=True)
    install = actions.add_parser("install", help="copy the MNI152 2009 T1 brain template into MODEL_FOLDER/template/")
    install.add_argument("model_folder")


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Install the template; returns 0."""
    print(f"installed {install_template(args.model_folder)}")
    return 0
