"""Thin MONAI Deploy operators around the ``codegraph3d`` library; they hold no algorithm.

Import :mod:`operators.runtime` (done here) before the SDK so that its runtime library loads.
"""

from .runtime import prepare_process

prepare_process()

from .cohort_operators import (  # noqa: E402 - the runtime must be prepared before the SDK import
    BatchScorerOperator,
    CohortLoaderOperator,
    ResultWriterOperator,
    SeriesSelectorOperator,
    TokeniserOperator,
)

__all__ = [
    "CohortLoaderOperator",
    "SeriesSelectorOperator",
    "TokeniserOperator",
    "BatchScorerOperator",
    "ResultWriterOperator",
]
