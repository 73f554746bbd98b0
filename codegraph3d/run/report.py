"""Writing the results: one SEG per scored series, an SR per study and report.json (codegraph3d.report/1).

Every file appears whole (temporary name, then rename); the output folder holds only ``SEG/``,
``SR/``, ``previews/`` (``output.previews``) and ``report.json`` (DESIGN.md §4). Fields of
report.json are only ever added, never renamed.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pydicom

from codegraph3d import ALGORITHM_NAME, __version__
from codegraph3d.core.files import write_json_atomic
from codegraph3d.run.config import RunConfig, config_hash
from codegraph3d.io.selection import is_valid_uid
from codegraph3d.io.seg import write_binary_seg, write_fractional_seg
from codegraph3d.io.dicom import load_series_volume
from codegraph3d.io.previews import write_preview
from codegraph3d.io.key_slices import KeySlice, write_key_slice_sr
from codegraph3d.io.sr import MaskFinding, SeriesFinding, write_study_sr
from codegraph3d.decision.operating_point import bank_operating_point, operating_point
from codegraph3d.decision.settings import DecisionSettings
from codegraph3d.run.pipeline import ScoredBatch, Scoring, Selection, SeriesMaps, StageTimer, TokenisedSeries, series_outputs
from codegraph3d.core.progress import StageClock, peak_rss_mb

__all__ = ["REPORT_SCHEMA", "encoder_warning", "write_results", "write_failure_report"]

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "codegraph3d.report/1"


def encoder_warning(encoder: Mapping[str, Any]) -> str | None:
    """Short warning shown in every output when the encoder is not pretrained DINOv2."""
    if encoder.get("pretrained"):
        return None
    if encoder.get("name") == "intensity":
        return "weight-free intensity encoder, not DINOv2"
    return "UNTRAINED random ViT: no anomaly signal"


def _safe_uid(uid: str) -> str:
    # File names come from UIDs; a hostile UID must never become a path.
    # Selection skips such series; this guards the invariant where the name is made.
    if not is_valid_uid(uid):
        raise ValueError(f"UID {uid!r} is not a valid DICOM UID; refusing to use it in a file name")
    return uid


def _ranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank 1 = highest score; percentile = share of the other volumes scoring lower (0-100)."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), int)
    ranks[order] = np.arange(1, len(scores) + 1)
    lower = np.array([(scores < s).sum() for s in scores])
    percentiles = 100.0 * lower / max(len(scores) - 1, 1)
    return ranks, percentiles


def _series_row(decision, status: str, reason: str) -> dict[str, Any]:
    return {
        "study_instance_uid": decision.study_instance_uid,
        "series_instance_uid": decision.series_instance_uid,
        "patient_id": decision.patient_id,
        "series_description": decision.series_description,
        "contrast": decision.contrast,
        "status": status,
        "reason": reason,
        "score": None,
        "rank": None,
        "percentile": None,
        "flagged": None,
        "anomalous_volume_ml": None,
        "n_findings": None,
        "findings": [],
        "preview": None,
        "seg_binary": None,
        "seg_score": None,
        "qa": {},
    }


def _codegraph_summary(batch) -> dict[str, Any]:
    """What CoDeGraph found in a batch, by series UID (report.json)."""
    found = batch.scores.codegraph
    uids = batch.volume_uids or [member.decision.series_instance_uid for member in batch.members]
    implicated = found.implicated_totals
    return {
        "communities": [[uids[v] for v in group] for group in found.communities],
        "implicated_tokens": {uids[v]: int(implicated[v]) for v in range(len(uids)) if implicated[v]},
        "burnout_tokens_per_layer": [[int(c) for c in layer] for layer in found.burnout_counts],
    }


def _rate(point: Mapping[str, Any]) -> float | None:
    rate = point["false_flag_rate_per_normal_series"]
    return None if isinstance(rate, str) else float(rate)


def _decided_with(batch: ScoredBatch, config: RunConfig) -> DecisionSettings:
    """The settings a batch's flags were decided with: ``threshold.with_bank``'s where the bank's
    volumes gave the statistics (an uncalibrated bank's point is looked up for those bounds)."""
    settings = config.decision_settings()
    if batch.decision.params.get("reference") == "bank":
        return dataclasses.replace(settings, threshold=config.threshold.for_bank())
    return settings


def _batch_record(batch: ScoredBatch, operating: Mapping[str, Any]) -> dict[str, Any]:
    """A contrast batch's entry of report.json: size, thresholds, policy and its operating point."""
    decision = batch.decision
    return {
        "contrast": batch.contrast,
        "n_series": len(batch.members),
        "chunk": batch.chunk + 1,
        "n_chunks": batch.n_chunks,
        "bank_references": list(batch.bank_references),
        "threshold": decision.volume_threshold,
        # The lesion policy's bound for findings at the brain's rim, where it differs (else null).
        "rim_threshold": decision.rim_threshold,
        "voxel_threshold": decision.voxel_threshold,
        # lesion policy: the flag bound is a finding's evidence (z x ml), the mask bound is in z.
        "threshold_units": "z*ml" if decision.units == "z" else "score",
        "voxel_threshold_units": decision.units,
        "threshold_policy": decision.policy,
        "threshold_params": decision.params,
        "operating_point": dict(operating),
        "n_flagged": int(decision.flagged.sum()),
        "k": [int(k) for k in batch.scores.k],
        "score_to_unit": {"low": batch.unit_low, "high": batch.unit_high},
        "map_interpolation": {"mask": batch.mask_interpolation, "score": batch.score_interpolation},
        "method": "codegraph" if batch.scores.codegraph is not None else "musc",
        **({"codegraph": _codegraph_summary(batch)} if batch.scores.codegraph is not None else {}),
    }


def _preview(member: TokenisedSeries, maps: SeriesMaps, output: Path, config: RunConfig) -> str | None:
    """Write ``previews/<SeriesInstanceUID>.png`` for a flagged series when ``output.previews`` is on.

    The source pixels are decoded again here (only for flagged series): the pipeline releases them
    after preprocessing to bound memory.
    """
    if not config.output.previews or not maps.binary.any():
        return None
    largest = maps.findings[0]
    title = (f"{member.decision.contrast}  {len(maps.findings)} finding(s)  largest {largest['volume_ml']:.1f} ml  "
             "research use only")
    folder = output / "previews"
    try:
        volume = load_series_volume(member.decision.series).volume
        folder.mkdir(parents=True, exist_ok=True)
        path = write_preview(folder / f"{_safe_uid(member.decision.series_instance_uid)}.png", volume.array,
                             maps.binary, tuple(float(v) for v in volume.spacing[::-1]), title=title)
    except (OSError, ValueError) as error:
        # A preview is a convenience: its failure must not cost the run its SEGs, SR and report.
        logger.warning("series=%s: no preview written: %s", member.decision.series_instance_uid, error)
        return None
    return str(path.relative_to(output))


def _selection_rows(selection: Selection, scoring: Scoring) -> dict[str, dict[str, Any]]:
    """A report row per series of the input, in selection order; scored rows are filled in later."""
    rows: dict[str, dict[str, Any]] = {}
    for decision in selection.decisions:
        uid = decision.series_instance_uid
        if not decision.taken:
            rows[uid] = _series_row(decision, "skipped", decision.reason)
            continue
        reason = scoring.skipped.get(uid, "")
        rows[uid] = _series_row(decision, "skipped" if reason else "scored", reason)
        if reason:
            # A series that failed quality control keeps the measurements that failed it.
            rows[uid]["qa"] = scoring.tokenisation.skipped_qa.get(uid, {})
    return rows


def _seg_text(encoder: Mapping[str, Any], batch: ScoredBatch) -> dict[str, Any]:
    """What every SEG of a batch says about the encoder and the batch (its content description)."""
    weights = (encoder.get("weights_sha256") or "")[:12]
    details = (
        f"{ALGORITHM_NAME} {__version__}; encoder {encoder['description']}; "
        f"batch {batch.contrast} of {len(batch.members)}"
        + (f" + {len(batch.bank_references)} bank references" if batch.bank_references else "")
        + (f" (chunk {batch.chunk + 1}/{batch.n_chunks})" if batch.n_chunks > 1 else "")
        + "; volume threshold "
        f"{batch.decision.volume_threshold:.6g}"
        + (f" ({batch.decision.rim_threshold:.6g} at the brain's rim)" if batch.decision.rim_threshold is not None else "")
        + f", voxel threshold {batch.decision.voxel_threshold:.6g}"
    )
    return dict(
        encoder_description=f"{encoder['name']}" + (f" sha256:{weights}" if weights else ""),
        encoder_warning=encoder_warning(encoder),
        details=details,
    )


def _write_segs(member: TokenisedSeries, maps: SeriesMaps, seg_dir: Path, config: RunConfig,
                text: Mapping[str, Any]) -> tuple[Path, Path | None]:
    """The BINARY SEG of a series, and its FRACTIONAL SEG when ``output.fractional`` is on."""
    uid = member.decision.series_instance_uid
    binary_path = seg_dir / f"{_safe_uid(uid)}_binary.dcm"
    write_binary_seg(member.datasets, maps.binary, binary_path, series_number=int(config.output.series_number), **text)
    if not config.output.fractional:
        return binary_path, None
    score_path = seg_dir / f"{_safe_uid(uid)}_score.dcm"
    write_fractional_seg(
        member.datasets, maps.unit, score_path, series_number=int(config.output.series_number) + 1, **text,
    )
    return binary_path, score_path


def _scored_row(batch: ScoredBatch, index: int, maps: SeriesMaps, paths: tuple[Path, Path | None],
                ranks: tuple[np.ndarray, np.ndarray], output: Path) -> dict[str, Any]:
    """The report fields of a scored series."""
    member, (binary_path, score_path) = batch.members[index], paths
    return dict(
        status="scored",
        reason="",
        score=float(batch.scores.volume_scores[index]),
        rank=int(ranks[0][index]),
        percentile=round(float(ranks[1][index]), 2),
        flagged=bool(batch.decision.flagged[index]),
        anomalous_volume_ml=round(maps.anomalous_volume_ml, 3),
        seg_binary=str(binary_path.relative_to(output)),
        seg_score=str(score_path.relative_to(output)) if score_path else None,
        batch_size=len(batch.members),
        references=int(batch.scores.n_references[index]),
        qa=member.qa,
        n_findings=len(maps.findings),
        findings=maps.findings,
    )


def _sr_finding(batch: ScoredBatch, row: Mapping[str, Any], maps: SeriesMaps, binary_path: Path,
                point: Mapping[str, Any]) -> SeriesFinding:
    """A series' entry of its study's SR (the SEG it references is read back, without pixels)."""
    return SeriesFinding(
        seg=pydicom.dcmread(binary_path, stop_before_pixels=True),
        score=row["score"], rank=row["rank"], batch_size=len(batch.members),
        percentile=row["percentile"], threshold=float(batch.decision.volume_threshold),
        flagged=row["flagged"], anomalous_volume_ml=row["anomalous_volume_ml"],
        findings=tuple(MaskFinding(f["volume_ml"], tuple(f["centroid_lps_mm"]), f["peak_score"])
                       for f in maps.findings),
        policy=batch.decision.policy, threshold_units=batch.decision.units,
        false_flag_rate=_rate(point), rim_threshold=batch.decision.rim_threshold,
    )


def _key_slices(member: TokenisedSeries, maps: SeriesMaps) -> list[KeySlice]:
    """One key slice per finding of a series: its source image header and pixel rectangle."""
    return [
        KeySlice(member.datasets[f["key_slice"]["index"]], tuple(f["key_slice"]["rows"]),
                 tuple(f["key_slice"]["columns"]))
        for f in maps.findings
    ]


def _write_srs(findings: Mapping[str, list[tuple[SeriesFinding, list[KeySlice]]]], output: Path,
               config: RunConfig) -> dict[str, dict[str, str | None]]:
    """Per study with scored series: its SR (``output.sr``) and, when it has findings, its
    key-slice SR (``output.key_slice_sr``); each independent of the other.

    Paths relative to the output folder, by study UID (``sr``, ``sr_key_slices``; None when not written).
    """
    if not findings:
        return {}
    sr_dir = output / "SR"
    sr_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, str | None]] = {}
    for study_uid, entries in findings.items():
        series = [entry for entry, _ in entries]
        sr_path = None
        if config.output.sr:
            sr_path = write_study_sr(
                series, sr_dir / f"{_safe_uid(study_uid)}_sr.dcm", series_number=int(config.output.series_number) + 2,
            )
        key_path = None
        if config.output.key_slice_sr:
            key_path = write_key_slice_sr(
                series, [keys for _, keys in entries], sr_dir / f"{_safe_uid(study_uid)}_key_slices_sr.dcm",
                series_number=int(config.output.series_number) + 3,
            )
        paths[study_uid] = {
            "sr": str(sr_path.relative_to(output)) if sr_path else None,
            "sr_key_slices": str(key_path.relative_to(output)) if key_path else None,
        }
    return paths


def _study_rows(rows: Mapping[str, Mapping[str, Any]],
                sr_paths: Mapping[str, Mapping[str, str | None]]) -> list[dict[str, Any]]:
    """Per study: its highest series score, whether any series is flagged, its SR."""
    studies: dict[str, dict[str, Any]] = {}
    for row in rows.values():
        study = studies.setdefault(
            row["study_instance_uid"],
            {"study_instance_uid": row["study_instance_uid"], "patient_id": row["patient_id"],
             "score": None, "flagged": False, "scored_series": 0,
             "sr": sr_paths.get(row["study_instance_uid"], {}).get("sr"),
             "sr_key_slices": sr_paths.get(row["study_instance_uid"], {}).get("sr_key_slices")},
        )
        if row["status"] == "scored":
            study["scored_series"] += 1
            study["flagged"] = study["flagged"] or bool(row["flagged"])
            study["score"] = row["score"] if study["score"] is None else max(study["score"], row["score"])
    return list(studies.values())


def _write_batch(batch: ScoredBatch, rows: dict[str, dict[str, Any]],
                 findings: dict[str, list[tuple[SeriesFinding, list[KeySlice]]]],
                 output: Path, config: RunConfig, encoder: Mapping[str, Any], point: Mapping[str, Any],
                 clock: StageClock) -> None:
    """The SEGs and report rows of a batch's series, and their SR entries."""
    ranks = _ranks(batch.scores.volume_scores)
    text = _seg_text(encoder, batch)
    for index, member in enumerate(batch.members):
        uid = member.decision.series_instance_uid
        maps = series_outputs(batch, index)
        paths = _write_segs(member, maps, output / "SEG", config, text)
        row = rows[uid]
        row.update(_scored_row(batch, index, maps, paths, ranks, output), preview=_preview(member, maps, output, config))
        if config.output.sr or config.output.key_slice_sr:
            keys = _key_slices(member, maps) if config.output.key_slice_sr else []
            findings.setdefault(member.decision.study_instance_uid, []).append(
                (_sr_finding(batch, row, maps, paths[0], point), keys)
            )
        logger.info(
            "study=%s series=%s decision=scored contrast=%s score=%.5g rank=%d/%d flagged=%s "
            "anomalous_ml=%.2f findings=%d seg=%s",
            member.decision.study_instance_uid, uid, batch.contrast, row["score"], row["rank"],
            len(batch.members), row["flagged"], row["anomalous_volume_ml"], row["n_findings"], row["seg_binary"],
        )
        elapsed, remaining = clock.advance()
        logger.info("wrote the results of %d/%d series (%.0f s elapsed, ETA %.0f s)",
                    clock.done, clock.total, elapsed, remaining)


def write_results(
    scoring: Scoring,
    selection: Selection,
    output_dir: str | Path,
    config: RunConfig,
    timer: StageTimer,
) -> dict[str, Any]:
    """Write the SEGs of every scored series, the SR of every study and report.json; return the report.

    Parameters
    ----------
    scoring : Scoring
        The scored batches.
    selection : Selection
        Every series' selection decision (skipped series are reported too).
    output_dir : path-like
        The output folder (created when missing).
    config : RunConfig
        The run's configuration (recorded in the report).
    timer : StageTimer
        Stage timings so far; the write stage is added.
    """
    output = Path(output_dir)
    (output / "SEG").mkdir(parents=True, exist_ok=True)
    encoder = scoring.tokenisation.encoder
    rows = _selection_rows(selection, scoring)
    findings: dict[str, list[tuple[SeriesFinding, list[KeySlice]]]] = {}
    batches = []
    clock = StageClock(sum(len(batch.members) for batch in scoring.batches))
    with timer("write"):
        for batch in scoring.batches:
            point = bank_operating_point(batch.decision.params) or operating_point(
                batch.decision.policy, encoder["name"], batch.contrast, _decided_with(batch, config)
            )
            _write_batch(batch, rows, findings, output, config, encoder, point, clock)
            batches.append(_batch_record(batch, point))
        sr_paths = _write_srs(findings, output, config)
    batches += [{"contrast": contrast, "n_series": 0, "error": error} for contrast, error in scoring.errors.items()]
    report = _base_report(config, encoder)
    policies = sorted({batch.decision.policy for batch in scoring.batches})
    report.update(
        decision_policy=[{"name": p.split("/")[0], "version": p.split("/")[-1]} for p in policies],
        status="completed",
        exit_code=0,
        batches=batches,
        series=list(rows.values()),
        studies=_study_rows(rows, sr_paths),
        bad_files=[{"path": str(path), "reason": reason} for path, reason in selection.scan.bad_files],
        bank=scoring.bank or None,
        timings_s={stage: round(seconds, 3) for stage, seconds in timer.seconds.items()},
        peak_rss_mb=round(peak_rss_mb(), 1),
    )
    write_json_atomic(output / "report.json", report)
    return report


def _base_report(config: RunConfig | None, encoder: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "algorithm": {"name": ALGORITHM_NAME, "version": __version__},
        "product_version": __version__,
        "encoder": dict(encoder) if encoder else None,
        "encoder_warning": encoder_warning(encoder) if encoder else None,
        "config": config.as_dict() if config else None,
        "config_sha256": config_hash(config) if config else None,
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "batches": [],
        "series": [],
    }


def write_failure_report(
    output_dir: str | Path,
    message: str,
    exit_code: int,
    config: RunConfig | None = None,
    encoder: Mapping[str, Any] | None = None,
) -> Path | None:
    """Write report.json for a failed run; return its path, or None when it cannot be written."""
    report = _base_report(config, encoder)
    report.update(status="failed", exit_code=exit_code, message=message, peak_rss_mb=round(peak_rss_mb(), 1))
    try:
        return write_json_atomic(Path(output_dir) / "report.json", report)
    except OSError as error:
        logger.error("could not write report.json to %s: %s", output_dir, error)
        return None
