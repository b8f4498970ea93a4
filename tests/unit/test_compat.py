"""Each private API behind its compatibility module falls back to the public path: run in a
fresh interpreter whose compat modules cannot import the private names (as after a release that
moved them), the same commands give the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

# Loaded before anything else in the child: an import of a private name *from a compat module*
# fails as it would once the library moved it; every other importer is untouched.
BLOCK = """
import builtins, sys
PRIVATE = {"pyarrow._compute", "pyarrow._parquet", "dotenv.parser"}
real = builtins.__import__
def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if importer.startswith("cnsq.compat") and name in PRIVATE:
        raise ImportError(f"{name} is gone (test)")
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = guarded
"""

RUN = """
import sys
from cnsq.cli import main
from cnsq.config import parse_dotenv
from pathlib import Path
import json
out = Path(sys.argv[1])
json.dump(parse_dotenv(out / ".env"), open(out / "env.json", "w"))
codes = []
for name, fmt in (("r.parquet", "geoparquet"), ("r.geojson", "geojson")):
    try:
        main(["export", str(out / "results.csv"), str(out / name), "--format", fmt], standalone_mode=False)
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code)
json.dump(codes, open(out / "codes.json", "w"))
"""


def _results(folder: Path) -> None:
    rows = ["tile,output"] + [f'{x}-{y}-12,"[{x / 100:.2f}, {y / 100:.2f}]"'
                              for x in range(20) for y in range(10)]
    rows.append("not-a-tile,[0.5]")  # a bad row: reported the same way on both paths
    (folder / "results.csv").write_text("\n".join(rows) + "\n")
    (folder / ".env").write_text("RDS_USERNAME=admin\nexport TILE_ACCESS_TOKEN='a b'\n# note\n")


def _run(folder: Path, blocked: bool) -> subprocess.CompletedProcess:
    code = (BLOCK if blocked else "") + RUN
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, timeout=120)


def test_the_public_paths_give_the_same_files(tmp_path):
    folders = []
    for blocked in (False, True):
        folder = tmp_path / ("public" if blocked else "private")
        folder.mkdir()
        _results(folder)
        result = _run(folder, blocked)
        assert result.returncode == 0, result.stderr
        folders.append(folder)
    private, public = folders
    # The bad row is reported (exit 1) and the good ones written, the same on both paths.
    assert json.loads((public / "codes.json").read_text()) == [1, 1]
    assert (private / "codes.json").read_text() == (public / "codes.json").read_text()
    for name in ("r.parquet", "r.geojson"):
        assert (private / name).read_bytes() == (public / name).read_bytes(), name
        assert (public / name).stat().st_size > 1000
    assert json.loads((public / "env.json").read_text()) == {
        "RDS_USERNAME": "admin", "TILE_ACCESS_TOKEN": "a b"}
    assert (private / "env.json").read_text() == (public / "env.json").read_text()


@pytest.mark.parametrize("blocked", [False, True])
def test_each_module_takes_the_path_it_says(tmp_path, blocked):
    """The test above would prove nothing if the hook let the private names through: each
    compat module says which path it took."""
    code = (BLOCK if blocked else "") + """
import sys
import pyarrow as pa
from cnsq.compat import arrow_compute
from cnsq.compat.arrow_parquet import parquet_writer
from cnsq.compat.dotenv_lines import bindings
writer = parquet_writer(sys.argv[1], pa.schema([("a", pa.int64())]))
writer.close()
bad = [b for b in bindings("A=1\\nnot a binding\\n") if b.error]
print(arrow_compute.SOURCE, type(writer).__module__, len(bad))
"""
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.parquet")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    source, writer_module, bad = result.stdout.split()
    if blocked:  # the public paths (the public dotenv reader skips a bad line: no line number)
        assert (source, writer_module.startswith("pyarrow.parquet"), bad) == ("pyarrow.compute", True, "0")
    else:
        assert (source, writer_module, bad) == ("pyarrow._compute", "pyarrow._parquet", "1")
