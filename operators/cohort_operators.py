"""The operator chain: load headers -> select series -> tokenise -> score batches -> write.

The SDK's ``DICOMDataLoaderOperator`` is replaced, not wrapped: it reads every file with its pixels
at once and one truncated file can abort the whole load, while :class:`CohortLoaderOperator` reads
headers only, names and skips bad files, and leaves pixels to :class:`TokeniserOperator`, which
reads them per chunk of studies. The SDK's series-to-volume converter and SEG writer handle only
the first selected series of the first study, so every series is carried here instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from codegraph3d.run.pipeline import (
    StageTimer,
    CohortError,
    build_encoder,
    scan_input,
    score_batches,
    select_input,
    tokenise_selected,
    update_bank,
)
from codegraph3d.core.files import write_json_atomic
from codegraph3d.core.progress import StageClock
from codegraph3d.run.config import RunConfig
from codegraph3d.run.report import write_results

logger = logging.getLogger("codegraph3d.operators")


class CohortLoaderOperator(Operator):
    """Scan the input folder's DICOM headers (no pixels). Output ``scan``: ``ScanResult``."""

    def __init__(self, fragment: Fragment, *args: Any, input_folder: Path, timer: StageTimer, **kwargs: Any) -> None:
        self.input_folder = Path(input_folder)
        self.timer = timer
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("scan")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        with self.timer("load_headers"):
            scan = scan_input(self.input_folder)
        op_output.emit(scan, "scan")


class SeriesSelectorOperator(Operator):
    """Select brain MR series and classify their contrast. ``scan`` -> ``selection``."""

    def __init__(self, fragment: Fragment, *args: Any, config: RunConfig, timer: StageTimer, **kwargs: Any) -> None:
        self.config = config
        self.timer = timer
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("scan")
        spec.output("selection")
        spec.output("selection_for_report")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        scan = op_input.receive("scan")
        with self.timer("select"):
            selection = select_input(scan, self.config)
        op_output.emit(selection, "selection")
        op_output.emit(selection, "selection_for_report")


class TokeniserOperator(Operator):
    """Load pixels per chunk of studies, preprocess and tokenise. ``selection`` -> ``tokens``."""

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        config: RunConfig,
        model_folder: Path | None,
        timer: StageTimer,
        on_encoder: Any = None,
        **kwargs: Any,
    ) -> None:
        self.config = config
        self.model_folder = model_folder
        self.timer = timer
        self.on_encoder = on_encoder
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("selection")
        spec.output("tokens")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        selection = op_input.receive("selection")
        with self.timer("load_encoder"):
            encoder = build_encoder(self.config, self.model_folder)
        if self.on_encoder is not None:
            self.on_encoder(encoder.identity())
        clock = StageClock(0)

        def progress(done: int, total: int) -> None:
            clock.total = total
            elapsed, eta = clock.advance(done - clock.done)
            logger.info("tokenised %d/%d series (%.1f s elapsed, ETA %.0f s)", done, total, elapsed, eta)

        tokenisation = tokenise_selected(
            selection, self.config, encoder, self.timer, progress, model_path=self.model_folder
        )
        op_output.emit(tokenisation, "tokens")


class BatchScorerOperator(Operator):
    """MuSc-score every contrast batch and apply the threshold policy. ``tokens`` -> ``scores``."""

    def __init__(self, fragment: Fragment, *args: Any, config: RunConfig, timer: StageTimer, **kwargs: Any) -> None:
        self.config = config
        self.timer = timer
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("tokens")
        spec.output("scores")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        tokenisation = op_input.receive("tokens")
        with self.timer("score"):
            scoring = score_batches(tokenisation, self.config)
        op_output.emit(scoring, "scores")


class ResultWriterOperator(Operator):
    """Write a DICOM-SEG per scored series and report.json. Inputs ``scores`` and ``selection``."""

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        config: RunConfig,
        output_folder: Path,
        timer: StageTimer,
        **kwargs: Any,
    ) -> None:
        self.config = config
        self.output_folder = Path(output_folder)
        self.timer = timer
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("scores")
        spec.input("selection")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        scoring = op_input.receive("scores")
        selection = op_input.receive("selection")
        # highdicom logs every copied module at INFO: thousands of lines per cohort.
        logging.getLogger("highdicom").setLevel(logging.WARNING)
        report = write_results(scoring, selection, self.output_folder, self.config, self.timer)
        if self.config.bank.add_scored != "none":
            # After the results are written: a bank problem must not cost the study its SEGs.
            try:
                added = update_bank(scoring, self.config, source=str(self.output_folder))
                report.setdefault("bank", None)
                report["bank"] = {**(report["bank"] or {}), "added": added}
                logger.info("cohort bank: added %d series (bank.add_scored %s)", len(added), self.config.bank.add_scored)
            except (CohortError, ValueError, OSError) as error:
                report["bank_error"] = str(error)
                logger.error("cohort bank not updated: %s", error)
            write_json_atomic(self.output_folder / "report.json", report)
        scored = [row for row in report["series"] if row["status"] == "scored"]
        logger.info(
            "wrote %d SEG(s) and report.json to %s; timings (s): %s; peak RSS %.0f MB",
            len(scored), self.output_folder,
            ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in report["timings_s"].items()),
            report["peak_rss_mb"],
        )
        for row in sorted(scored, key=lambda r: (r["contrast"], r["rank"])):
            logger.info(
                "  %-6s rank %2d score %.5f flagged=%-5s series %s (%s)",
                row["contrast"], row["rank"], row["score"], row["flagged"], row["series_instance_uid"],
                row["series_description"],
            )
