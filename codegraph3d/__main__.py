"""``python -m codegraph3d``: the ``codegraph3d`` command (:mod:`codegraph3d.cli`)."""

from codegraph3d.cli import main

raise SystemExit(main())
