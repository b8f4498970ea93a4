"""Every reader of results CSV accepts and reports what convert-geojson does, row by row: export's
(each format), convert-geojson's and `cnsq view`'s index, fed the same corpus of odd files.
(The columnar readers aborted the whole export on rows the row reader accepted, and refused ids
and rows it accepted.)"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cnsq.results.export import export
from cnsq.results.geojson import convert
from cnsq.results.reader import open_results

GOOD = '1-2-3,"[0.1, 0.9]"\n4-5-6,"[0.8, 0.2]"\n'
CORPUS = {
    "good": "tile,output\n" + GOOD,
    "padded to 1 MB": 'tile,output\n1-2-3,"[0.1, 0.9' + " " * (1 << 20) + ']"\n4-5-6,"[0.8, 0.2]"\n',
    "25,000 scores": "tile,output\n" + "".join(
        f'{x}-8-9,"[' + ", ".join(["0.5"] * 25_000) + ']"\n' for x in range(3)),
    "a byte not UTF-8": "tile,output\n" + GOOD + '7-8-9,"[0.5, 0.\udcff]"\n8-8-9,"[0.5, 0.5]"\n',
    "braced ids": 'tile,output\n"{1,2,3}","[0.1, 0.9]"\n"{4-5-6}","[0.8, 0.2]"\n',
    "a leading space": 'tile,output\n 1-2-3,"[0.1, 0.9]"\n4-5-6 ,"[0.8, 0.2]"\n',
    "a header mid-file": "tile,output\n" + GOOD + "tile,output\n" + '7-8-9,"[0.5, 0.5]"\n',
    "non-finite scores": "tile,output\n" + GOOD + '7-8-9,"[NaN, 0.5]"\n8-8-9,"[0.5, Infinity]"\n',
    "a score that is text": "tile,output\n" + GOOD + '7-8-9,"[0.5, ""a""]"\n',
    "blank and short lines": "tile,output\n" + GOOD + "\n" + "7-8-9\n" + '8-8-9,"[0.5, 0.5]",x\n',
    "no header": GOOD,
    # Typed columns hold one score count: GeoParquet and FlatGeobuf report the other rows.
    "score counts that differ": "tile,output\n" + GOOD + '7-8-9,"[0.1, 0.2, 0.7]"\n',
}
TYPED = ("geoparquet", "flatgeobuf")


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))


def converted(source: Path):
    with open_results(source) as handle:
        report = convert(handle, io.StringIO(), thresh_ind=1, thresh=0.0)
    return report.kept, report.bad_count, [line for line, _ in report.bad]


def exported(source: Path, fmt: str, tmp_path: Path):
    report = export(source, tmp_path / f"out.{fmt}", fmt, 1, 0.0)
    return report.kept, report.bad_count, [line for line, _ in report.bad]


def indexed(source: Path, tmp_path: Path):
    from cnsq.view import index as ix

    built = ix.build(source, tmp_path / "index.db", 1)
    report = built.report
    return report.kept, report.bad_count, [line for line, _ in report.bad]


@pytest.mark.parametrize("name", list(CORPUS))
def test_every_reader_accepts_and_reports_what_convert_geojson_does(tmp_path, name):
    pytest.importorskip("pyarrow")
    source = tmp_path / "results.csv"
    _write(source, CORPUS[name])
    expected = converted(source)
    found = {fmt: exported(source, fmt, tmp_path) for fmt in (
        "csv", "geojson", "geoparquet", "flatgeobuf")}
    found["view"] = indexed(source, tmp_path)
    if name == "score counts that differ":  # the one difference a typed table must make
        assert {fmt: found.pop(fmt) for fmt in TYPED} == {fmt: (2, 1, [4]) for fmt in TYPED}
    assert found == {reader: expected for reader in found}, expected


def test_the_corpus_is_odd_where_it_should_be(tmp_path):
    """The corpus holds bad rows where it means to (a test of readers that all accept
    everything would pass too)."""
    source = tmp_path / "results.csv"
    for name, bad in (("a header mid-file", [4]), ("non-finite scores", [4, 5]),
                      ("a byte not UTF-8", [4]), ("blank and short lines", [4, 5, 6])):
        _write(source, CORPUS[name])
        assert converted(source)[2] == bad, name
    _write(source, CORPUS["braced ids"])
    assert converted(source) == (2, 0, [])
