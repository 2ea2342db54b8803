"""The README's "Differences from the original" names, in each row, the tests that pin the difference: they exist."""

import re

from conftest import ROOT


def differences_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Differences from the original", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what ")]


def named_tests(cell: str) -> list[tuple[str, str | None]]:
    """(file, test or None) for every `file.py`, `file.py::test` and `::test` (of the file before it) in a cell."""
    named, current = [], None
    for code in re.findall(r"`([^`]+)`", cell):
        file, _, test = code.partition("::")
        if file.endswith(".py"):
            current = file
        elif file or not test or current is None:
            continue
        named.append((current, test.split("[")[0] or None))
    return named


def test_every_difference_names_tests_that_exist():
    rows = differences_rows()
    assert len(rows) >= 20
    for row in rows:
        pinned_by = row.rstrip(" |").rsplit(" | ", 1)[1]
        tests = named_tests(pinned_by)
        assert tests, f"no test named in: {row[:80]}"
        for file, test in tests:
            source = (ROOT / "tests" / file).read_text()
            assert test is None or re.search(rf"^def {re.escape(test)}\(", source, re.M), (file, test)
