"""Each fact has one home: the x-y-z tile id, URL redaction and the write-to-a-temporary-name-
then-rename are defined once (the first two in the Lambda package, which cnsq imports)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "cnsq").rglob("*.py"), *(REPO / "lambda").rglob("*.py")])


def _offenders(pattern: str, home: str) -> list[str]:
    found = []
    for path in SOURCES:
        relative = path.relative_to(REPO).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(pattern, line) and relative != home:
                found.append(f"{relative}:{number}: {line.strip()}")
    return found


def test_the_tile_id_is_formatted_in_one_place():
    pattern = r'f"\{[^}]*x[^}]*\}-\{[^}]*y[^}]*\}-\{[^}]*z[^}]*\}'
    assert _offenders(pattern, "lambda/download_and_predict/tiles.py") == []


def test_urls_are_masked_in_one_place():
    assert _offenders(r"re\.(sub|compile)\(r?[\"'].*//", "lambda/download_and_predict/masking.py") == []


def test_files_are_replaced_atomically_in_one_place():
    assert _offenders(r"\.partial|\.replace\((path|target|self\.path)\)", "cnsq/files.py") == []


def test_the_tile_id_grammar_and_its_zoom_limit_have_one_home():
    """The strict form bulk readers match, and the zoom limit, are download_and_predict.tiles'
    (export once kept its own pattern and a literal 30 twice)."""
    assert _offenders(r"\[0-9\]\{1,\d+\}-|<= ?30\b|Range\(0, ?30\)", "lambda/download_and_predict/tiles.py") == []


def test_the_controller_decides_in_one_step():
    """The stack's controller, the simulation and `cnsq run --concurrency auto` apply what
    download_and_predict.scaling.step decides; none calls the rules under it on its own."""
    sources = sorted([*SOURCES, *(REPO / "simulation").rglob("*.py")])
    found = []
    for path in sources:
        relative = path.relative_to(REPO).as_posix()
        if relative == "lambda/download_and_predict/scaling.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"(?<![.\w])(decide|plan_tasks|follow_tasks)\(", line) and " def " not in f" {line}":
                found.append(f"{relative}:{number}: {line.strip()}")
    assert found == []
    for user in ("lambda/download_and_predict/control.py", "cnsq/local/pipeline.py"):
        assert re.search(r"\bstep\(", (REPO / user).read_text()), user
    # The simulation runs the stack's controller itself, through its own loop.
    simulated = (REPO / "simulation" / "__init__.py").read_text()
    assert re.search(r"\bController\(", simulated) and re.search(r"controller\.run\(", simulated)
