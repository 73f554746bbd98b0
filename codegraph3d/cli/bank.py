"""``codegraph3d bank {list,add,remove,check} BANK``: look after a cohort bank.

``add`` preprocesses and tokenises the input's selected series with the run configuration (the
``CODEGRAPH3D_CONFIG`` file, or ``codegraph3d.yaml`` in the model folder), exactly as a run does.
Exit status: 0 done, 1 ``check`` found problems, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from codegraph3d.store.bank import BankError, CohortBank, bank_settings, series_record
from codegraph3d.run.config import load_config
from codegraph3d.run.pipeline import build_encoder, scan_input, select_input, tokenise_selected

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``list``, ``add``, ``remove`` and ``check`` actions to ``parser``."""
    actions = parser.add_subparsers(dest="command", required=True)
    listing = actions.add_parser("list", help="print the banked series")
    listing.add_argument("bank", type=Path)
    adding = actions.add_parser("add", help="tokenise a DICOM folder and add its selected series")
    adding.add_argument("bank", type=Path)
    adding.add_argument("-i", "--input", type=Path, required=True, help="DICOM folder")
    adding.add_argument("-m", "--models", type=Path, default=None, help="model folder (template, weights)")
    removing = actions.add_parser("remove", help="remove every series of the given studies")
    removing.add_argument("bank", type=Path)
    removing.add_argument("--study", nargs="+", required=True, help="Study Instance UID(s)")
    checking = actions.add_parser("check", help="verify every entry; --repair drops bad entries and orphans")
    checking.add_argument("bank", type=Path)
    checking.add_argument("--repair", action="store_true")


def add_from_input(bank_folder: Path, input_folder: Path, model_folder: Path | None) -> list[str]:
    """Tokenise the selected series of ``input_folder`` as a run would and add them to the bank."""
    if not input_folder.is_dir():
        raise BankError(f"input folder {input_folder} does not exist")
    config = load_config(model_folder)
    selection = select_input(scan_input(input_folder), config)
    encoder = build_encoder(config, model_folder)
    tokenisation = tokenise_selected(selection, config, encoder, model_path=model_folder)
    bank = CohortBank(bank_folder, bank_settings(config.token_recipe(), encoder, tokenisation.landmarks), create=True)
    for uid, reason in tokenisation.skipped.items():
        print(f"not added: series {uid}: {reason}")
    return bank.add([series_record(record) for record in tokenisation.series], source=str(input_folder))


def _list(bank: CohortBank) -> int:
    entries = bank.entries()
    print(f"cohort bank {bank.folder}: settings {bank.settings_id}, encoder "
          f"{bank.settings['encoder']['name']}, {len(entries)} series")
    for entry in sorted(entries, key=lambda e: (e.contrast, e.study_instance_uid)):
        print(f"  {entry.contrast:4s} study {entry.study_instance_uid} series {entry.series_instance_uid} "
              f"patient {entry.patient_id or '-'} tokens {entry.n_tokens} added {entry.added}")
    return 0


def _check(bank: CohortBank, repair: bool) -> int:
    problems = bank.check(repair=repair)
    for problem in problems:
        print(problem)
    if problems and repair:
        print(f"repaired: {len(problems)} problem(s) removed")
        return 0
    print("bank OK" if not problems else f"{len(problems)} problem(s); run with --repair to remove them")
    return 0 if not problems else 1


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Carry out one bank action; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "add":
            added = add_from_input(args.bank, args.input, args.models)
            print(f"added {len(added)} series to {args.bank}")
            return 0
        bank = CohortBank(args.bank)
        if args.command == "list":
            return _list(bank)
        if args.command == "remove":
            removed = bank.remove(args.study)
            print(f"removed {len(removed)} series of {len(set(args.study))} study(ies) from {bank.folder}")
            return 0
        return _check(bank, args.repair)
    except (BankError, ValueError, OSError, RuntimeError) as error:  # RuntimeError: CohortError
        print(f"error: {error}", file=sys.stderr)
        return 2
