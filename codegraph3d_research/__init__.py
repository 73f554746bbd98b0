"""Research tooling around the CoDeGraph3D product: not shipped in the MAP image.

Evaluation against ground truth (:mod:`.evaluate`, :mod:`.metrics`, :mod:`.plots`,
:mod:`.compare`, :mod:`.mask_quality`), experiments (:mod:`.ablations`, :mod:`.baseline`,
:mod:`.benchmark`) and synthetic cohorts (:mod:`.synthetic`). This package imports the product
(:mod:`codegraph3d`); the product never imports it, which import-linter checks
(``[tool.importlinter]`` in pyproject.toml).
"""
