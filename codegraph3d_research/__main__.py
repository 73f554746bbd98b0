"""``python -m codegraph3d_research``: the ``codegraph3d-research`` command."""

import sys

from codegraph3d_research.cli import main

sys.exit(main())
