"""docs/BAD_INPUT.md names, for every case, the test that asserts it: those tests must exist."""

from __future__ import annotations

import re
from fixtures import ROOT

TABLE = ROOT / "docs" / "BAD_INPUT.md"


def _table_rows() -> list[list[str]]:
    rows = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header


def test_every_case_names_an_existing_test():
    rows = _table_rows()
    assert len(rows) >= 20
    previous = ""
    for case, behaviour, tests in rows:
        tests = previous if tests == "same" else tests  # "same": the row above's test
        previous = tests
        references = re.findall(r"`(test_[\w]+\.py)(?:::([\w*]+))?`", tests)
        assert references and behaviour, f"row {case!r} names no test"
        for file_name, function in references:
            # Test file names are unique across the test folders; the table names the file alone.
            found = sorted((ROOT / "tests").rglob(file_name))
            assert len(found) == 1, f"row {case!r}: no single tests/**/{file_name} ({found})"
            source = found[0]
            if function:
                pattern = re.escape(function).replace(r"\*", r"\w*")
                assert re.search(rf"^def {pattern}\(", source.read_text(encoding="utf-8"), re.MULTILINE), (
                    f"row {case!r}: {file_name} has no test {function}"
                )
