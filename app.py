"""CoDeGraph3D MONAI Deploy application: brain MR DICOM studies in, DICOM-SEG and scores out.

Usage: ``python app.py -i INPUT_FOLDER -o OUTPUT_FOLDER -m MODEL_FOLDER`` (or the HOLOSCAN_*
environment variables in a MAP). Exit codes: 0 done, 2 nothing could be scored, 1 internal error.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from operators import (
    BatchScorerOperator,
    CohortLoaderOperator,
    ResultWriterOperator,
    SeriesSelectorOperator,
    TokeniserOperator,
)
from operators.runtime import run_application

from holoscan.conditions import CountCondition  # noqa: E402 - after the runtime preparation
from monai.deploy.core import Application

from codegraph3d.core.files import remove_partials
from codegraph3d.run.config import load_config
from codegraph3d.run.pipeline import StageTimer


class CoDeGraph3DApp(Application):
    """Zero-shot anomaly detection in brain MRI by batch-based mutual scoring (CoDeGraph3D)."""

    name = "codegraph3d"
    description = __doc__
    version = "0.1.0"

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        self.output_folder = Path(context.output_path)
        # A run killed outright (SIGKILL, power loss) cannot clean up; its leftovers go now.
        stale = remove_partials(self.output_folder)
        if stale:
            logging.getLogger("codegraph3d").warning(
                "removed %d half-written file(s) left in %s by an interrupted run", len(stale), self.output_folder
            )
        model_folder = Path(context.model_path) if context.model_path else None
        self.config = load_config(model_folder)
        self.encoder_identity = None
        timer = StageTimer()

        def remember_encoder(identity: dict) -> None:
            self.encoder_identity = identity

        loader = CohortLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(context.input_path), timer=timer, name="cohort_loader"
        )
        selector = SeriesSelectorOperator(self, config=self.config, timer=timer, name="series_selector")
        tokeniser = TokeniserOperator(
            self, config=self.config, model_folder=model_folder, timer=timer, on_encoder=remember_encoder,
            name="tokeniser",
        )
        scorer = BatchScorerOperator(self, config=self.config, timer=timer, name="batch_scorer")
        writer = ResultWriterOperator(
            self, config=self.config, output_folder=self.output_folder, timer=timer, name="result_writer"
        )
        self.add_flow(loader, selector, {("scan", "scan")})
        self.add_flow(selector, tokeniser, {("selection", "selection")})
        self.add_flow(tokeniser, scorer, {("tokens", "tokens")})
        self.add_flow(scorer, writer, {("scores", "scores")})
        self.add_flow(selector, writer, {("selection_for_report", "selection")})


if __name__ == "__main__":
    sys.exit(run_application(CoDeGraph3DApp))
