"""`cnsq` commands: setup, download, convert-geojson and tiles: the results and the tile lists.

Each parses its options and delegates."""

from __future__ import annotations

import collections.abc
import sys
from pathlib import Path

import click

from cnsq.cli.app import (
    Settings,
    _admin,
    _database_url,
    _finite,
    _one_output,
    _print_json,
    _row_progress,
    config_options,
    json_option,
    main,
)
from download_and_predict.tiles import MAX_ZOOM


@main.command()
@click.argument("db_string", required=False)
@click.option("--database-url", envvar="DATABASE_URL",
              help="The same as DB_STRING [default: DATABASE_URL, else the stack's].")
@config_options
def setup(settings: Settings, db_string: str | None, database_url: str | None) -> None:
    """Create the results table (versioned migrations; running it twice is harmless).

    DB_STRING is a database URL (postgresql://user:pass@host:5432/ResultsDB or
    sqlite:///results.db). Without it, the deployed stack's private database is migrated by the
    stack's admin function, inside the VPC (deploy does this once the stack is complete).

    \b
    Examples:
      cnsq setup --config config/config.yml
      cnsq setup postgresql://postgres:secret@localhost:5432/results
    """
    from cnsq.results.store import mask, open_store

    db_string = db_string or database_url
    admin = _admin(db_string, settings)
    if admin is not None:
        answer = admin.call("migrate")
        names = ", ".join(answer["applied"])
        click.echo(f"Applied migration(s) {names} through {admin.name}." if names
                   else f"The results table is up to date; nothing to migrate ({admin.name}).")
        return
    url = _database_url(db_string, settings)
    store = open_store(url)
    try:
        applied = store.migrate()
    finally:
        store.close()
    if applied:
        names = ", ".join(f"{m.version} ({m.name})" for m in applied)
        click.echo(f"Applied migration(s) {names} to {mask(url)}.")
    else:
        click.echo(f"{mask(url)} is up to date; nothing to migrate.")


@main.command()
@click.argument("out", metavar="[OUT.csv]", required=False)
@click.option("--output", "-o", "output", help="The CSV to write ('-': stdout); or as OUT.csv.")
@click.option("--database-url", envvar="DATABASE_URL",
              help="postgresql://… or sqlite:///… [default: DATABASE_URL, else the stack's].")
@config_options
@json_option
def download(settings: Settings, out: str | None, output: str | None,
             database_url: str | None, as_json: bool) -> None:
    """Stream the results to a CSV file (tile,output with the output as JSON); '-' for stdout.

    Memory stays flat at any row count, and an interrupted download never leaves a partial file
    under the final name. A deployed stack's private database is exported to
    s3://<buckets.internal>/<stackName>/exports/ by its admin function, then copied here.

    \b
    Examples:
      cnsq download results.csv --config config/config.yml
      DATABASE_URL=postgresql://user:pass@host:5432/ResultsDB cnsq download results.csv
      cnsq download - --database-url sqlite:///results.db | head
    """
    from cnsq.results.download import download as run_download
    from cnsq.results.store import open_store

    out = _one_output(out, output, "OUT.csv")
    if as_json and out == "-":
        raise click.UsageError("--json prints to stdout: write the CSV to a file")
    admin = _admin(database_url, settings) if out != "-" else None
    if admin is not None:
        from cnsq.files import writable_target

        writable_target(out)
        show: collections.abc.Callable[[int], None] | None = None
        if sys.stderr.isatty():
            def show(done: int) -> None:
                click.echo(f"\rCopying the export to {out}: {done / 1e6:,.1f} MB", nl=False, err=True)
        export = admin.download_export(out, show)
        if show is not None:
            click.echo("", err=True)
        click.echo(f"Wrote {export['rows']:,} rows to {out} (exported to "
                   f"s3://{export['bucket']}/{export['key']}).", err=True)
        if as_json:
            _print_json({"output": out, "rows": export["rows"],
                         "export": f"s3://{export['bucket']}/{export['key']}"})
        return
    from cnsq.files import writable_target

    if out != "-":
        writable_target(out)  # before an export that may take minutes
    store = open_store(_database_url(database_url, settings), create=False)
    progress = _row_progress(f"Downloading to {out}") if out != "-" else None
    try:
        rows = run_download(store, out, sys.stdout.buffer, progress)
    finally:
        store.close()
    if progress:
        click.echo("", err=True)
    click.echo(f"Wrote {rows:,} rows to {out if out != '-' else 'stdout'}.", err=True)
    if as_json:
        _print_json({"output": out, "rows": rows})


@main.command("convert-geojson")
@click.argument("source", metavar="IN.csv", type=click.Path(path_type=Path))
@click.argument("target", metavar="[OUT.geojson]", required=False)
@click.option("--output", "-o", "output", help="The GeoJSON to write ('-': stdout); or as OUT.geojson.")
@click.option("--thresh_ind", "--thresh-ind", "thresh_ind", type=int, required=True,
              help="Index of the class score to threshold on.")
@click.option("--thresh", type=float, required=True, callback=lambda ctx, param, value: _finite(value),
              help="Keep tiles whose score is >= this.")
@click.option("--tms", is_flag=True, help="The CSV's tile ids are TMS (y flipped), not XYZ.")
@click.option("--seq", is_flag=True, help="Write one Feature per line (newline-delimited).")
def convert_geojson(source: Path, target: str | None, output: str | None, thresh_ind: int,
                    thresh: float, tms: bool, seq: bool) -> None:
    """Convert a results CSV (tile,output) to GeoJSON polygons of the tiles that pass a threshold.

    Streams at any size. Properties: the tile and its class scores p0, p1, … unrounded.
    Bad rows are reported with their line numbers and skipped ('-' writes to stdout).

    \b
    Example (keep tiles whose class-1 score is at least 0.95):
      cnsq convert-geojson results.csv buildings.geojson --thresh_ind 1 --thresh 0.95
    """
    from cnsq.results.geojson import convert_file

    target = _one_output(target, output, "OUT.geojson")

    def progress(report) -> None:
        click.echo(f"\rread {report.read:,} rows, kept {report.kept:,}", nl=False, err=True)

    on_tty = sys.stderr.isatty()
    report = convert_file(source, target, sys.stdout, thresh_ind=thresh_ind, thresh=thresh,
                          tms=tms, seq=seq, progress=progress if on_tty else None)
    if on_tty and report.read >= 50_000:
        click.echo("", err=True)
    _say_rows(report, source, "" if target == "-" else f"; wrote {target}")


@main.command("export")
@click.argument("paths", metavar="[IN.csv] OUT", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["geoparquet", "flatgeobuf", "geojson", "csv"]),
              help="The format [default: from OUT's extension: .parquet, .fgb, .geojson, .csv].")
@click.option("--thresh_ind", "--thresh-ind", "thresh_ind", type=int,
              help="Index of the class score to threshold on (with --thresh; neither: every tile).")
@click.option("--thresh", type=float, callback=lambda ctx, param, value: _finite(value)
              if value is not None else None, help="Keep tiles whose score is >= this.")
@click.option("--compression", type=click.Choice(["snappy", "zstd", "none"]),
              help="GeoParquet's codec [default: snappy, as GeoPandas and GDAL write; zstd: "
                   "about 40% smaller, slower to write].")
@click.option("--database-url", envvar="DATABASE_URL",
              help="Without IN.csv: the results table to read (SQLite or PostgreSQL) "
                   "[default: DATABASE_URL, else the stack's, as download reads it].")
@config_options
def export_cmd(settings: Settings, paths: tuple[Path, ...], fmt: str | None,
               thresh_ind: int | None, thresh: float | None, compression: str | None,
               database_url: str | None) -> None:
    """Export a results CSV (tile,output) as GeoParquet, FlatGeobuf, GeoJSON or CSV.

    Each tile is a polygon of its bounds (lon/lat, WGS 84) with its id, x, y, z and every
    score as a typed column p0, p1, …. GeoParquet 1.1 (WKB, a bbox covering column, rows in
    quadkey order) loads in GeoPandas, DuckDB and QGIS; FlatGeobuf carries a spatial index. Those
    two need the extra: pip install 'cnsq[geo]'. Bad rows are reported with their line numbers and
    skipped; the file appears whole or not at all.

    Without IN.csv the results are read from the database, as `cnsq download` reads them
    (--database-url, DATABASE_URL, or the deployed stack with --config), into a temporary CSV
    beside OUT that is removed afterwards.

    \b
    Examples:
      cnsq export results.csv buildings.parquet --thresh_ind 1 --thresh 0.95
      cnsq export results.csv all-tiles.fgb
      cnsq export results.csv small.parquet --compression zstd
      cnsq export buildings.fgb --config config/config.yml --thresh_ind 1 --thresh 0.95
      cnsq export water.parquet --database-url sqlite:///results.db
    """
    import tempfile

    if len(paths) > 2:
        raise click.UsageError("expected [IN.csv] OUT")
    target = paths[-1]
    from cnsq.files import writable_target

    writable_target(str(target))  # before a download that may take minutes
    if len(paths) == 2:
        _export_file(paths[0], target, fmt, thresh_ind, thresh, compression)
        return
    folder = Path(tempfile.mkdtemp(prefix=".cnsq-export-", dir=target.parent or Path(".")))
    try:
        staged = folder / "results.csv"
        from cnsq.results.download import database_file, table_csv

        admin = _admin(database_url, settings)  # else the URL given, or the stack's
        url = None if admin else _database_url(database_url, settings)
        writable_target(str(target), database_file(url))
        rows, _ = table_csv(staged, url, admin)
        click.echo(f"Read {rows:,} rows from the results table.", err=True)
        _export_file(staged, target, fmt, thresh_ind, thresh, compression,
                     label="the results table")
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _export_file(source: Path, target: Path, fmt: str | None, thresh_ind: int | None,
                 thresh: float | None, compression: str | None,
                 label: str | None = None) -> None:
    from cnsq.errors import CnsqError
    from cnsq.results.export import NothingValid, export
    from cnsq.results.reader import PROGRESS_EVERY

    by_suffix = {".parquet": "geoparquet", ".geoparquet": "geoparquet", ".fgb": "flatgeobuf",
                 ".geojson": "geojson", ".json": "geojson", ".csv": "csv"}
    fmt = fmt or by_suffix.get(target.suffix.lower())
    if fmt is None:
        raise CnsqError(f"{target}: say --format (geoparquet, flatgeobuf, geojson or csv), or "
                        "name the file .parquet, .fgb, .geojson or .csv")

    def progress(report) -> None:
        click.echo(f"\rread {report.read:,} rows", nl=False, err=True)

    on_tty = sys.stderr.isatty()
    try:
        report = export(source, target, fmt, thresh_ind, thresh, progress if on_tty else None,
                        compression)
    except NothingValid as exc:
        kept = " (it keeps what it held)" if target.exists() else ""
        _say_rows(exc.report, label or source, f"; nothing valid, {target} not written{kept}")
        raise
    if on_tty and report.read >= PROGRESS_EVERY:
        click.echo("", err=True)
    _say_rows(report, label or source, f"; wrote {target} ({fmt})")


def _say_rows(report, where, wrote: str) -> None:
    """The bad rows (the first 20, with their lines), the counts; exit 1 when a row was bad."""
    for line, reason in report.bad[:20]:
        click.echo(f"{where}:{line}: {reason}", err=True)
    if report.bad_count > 20:
        click.echo(f"… and {report.bad_count - 20:,} more bad rows", err=True)
    click.echo(f"Read {report.read:,} rows, kept {report.kept:,}, bad {report.bad_count:,}"
               f"{wrote}.", err=True)
    if report.bad_count:
        sys.exit(1)


def stac_options(command):
    """The options that choose a STAC source's items and assets (for --imagery)."""
    command = click.option("--datetime", "datetime_", default=None, metavar="START/END",
                           help="STAC: items of this date or interval (RFC 3339, '..' open).")(command)
    command = click.option("--collection", "collections", multiple=True, metavar="NAME",
                           help="STAC: items of this collection (repeat for several).")(command)
    command = click.option("--alternate", default=None, metavar="NAME",
                           help="STAC: read each asset from its alternate of this name (such "
                                "as s3: USGS's Landsat items) when it has one.")(command)
    return click.option("--assets", default=None, metavar="KEY,KEY",
                        help="STAC: the assets stacked into the image, in band order "
                             "[default: visual].")(command)


def raster_options(command):
    """The options that make the 8-bit image of COG or STAC imagery: bands and their scaling."""
    command = click.option("--stretch", default=None, metavar="LOW,HIGH",
                           help="Instead of --rescale: each COG's LOW and HIGH percentiles "
                                "mapped to 0-255.")(command)
    command = click.option("--rescale", default=None, metavar="MIN,MAX",
                           help="The values mapped to 0-255 (data that are not 8-bit need it, "
                                "or --stretch).")(command)
    return click.option("--bands", default=None, metavar="1,2,3",
                        help="Band numbers to read, in order (of a STAC item's stacked "
                             "assets).")(command)


def requester_pays_option(command):
    """``--requester-pays``, for the commands that read imagery from S3."""
    return click.option("--requester-pays", is_flag=True, default=False,
                        help="s3:// reads billed to you, as a requester-pays bucket (USGS's "
                             "Landsat) demands (the config's imagery.requesterPays, for a "
                             "source given here).")(command)


IMAGERY_HELP = ("A COG (a .tif, https:// or s3://; repeat for a mosaic, the first valid pixel "
                "in this order), a static STAC catalog (a .json) or a STAC API's root URL")


@main.command("tiles")
@click.argument("aoi", metavar="[AOI.geojson]", type=click.Path(path_type=Path), required=False)
@click.option("--zoom", "-z", type=click.IntRange(0, MAX_ZOOM), required=True,
              help="Tile zoom level.")
@click.option("--imagery", "imagery", multiple=True, metavar="SOURCE",
              help=IMAGERY_HELP + ": list the tiles over its footprint (with an AOI: the "
                                  "AOI's tiles it covers).")
@stac_options
@requester_pays_option
@click.option("--output", "-o", default="-", help="Where to write x-y-z lines [default: stdout].")
def tiles_cmd(aoi: Path | None, zoom: int, imagery: tuple[str, ...], assets: str | None,
              alternate: str | None, collections: tuple[str, ...], datetime_: str | None,
              requester_pays: bool, output: str) -> None:
    """List the XYZ tiles covering the polygons (or lines, points) of a GeoJSON file, or the
    footprint of COG or STAC imagery.

    Accepts a FeatureCollection, a Feature or a bare geometry; writes x-y-z lines without
    duplicates, ready for `cnsq push`. With --imagery, the tiles over each COG's bounds
    (reprojected to longitude and latitude), or over the polygons of a static STAC catalog's
    items that --collection and --datetime choose; with both, the area's tiles the imagery
    covers (a STAC API's items are searched over the area: it needs one).

    \b
    Examples:
      cnsq tiles area.geojson --zoom 17 -o tiles.txt
      cnsq tiles --imagery https://example.com/scene.tif --zoom 16 -o tiles.txt
      cnsq tiles --imagery https://example.com/stac/catalog.json --datetime 2024-06-01/2024-08-31 --zoom 16
      cnsq tiles area.geojson --imagery https://earth-search.aws.element84.com/v1 \\
          --collection sentinel-2-l2a --datetime 2024-07-01/2024-07-31 --zoom 14
    """
    from cnsq.files import atomic_write, writable_target
    from cnsq.tiles import iter_cover, load_geojson, write_tiles

    if aoi is None and not imagery:
        raise click.UsageError("give an AOI.geojson, --imagery, or both")
    if imagery:
        import mercantile

        from cnsq.imagery import cover, footprint, source

        chosen = source(imagery, assets=assets, collections=collections, datetime=datetime_,
                        requester_pays=requester_pays, alternate=alternate)
        area = set(iter_cover(load_geojson(aoi), zoom)) if aoi is not None else None
        within = None
        if area:
            corners = [mercantile.bounds(t) for t in area]
            within = (min(b.west for b in corners), min(b.south for b in corners),
                      max(b.east for b in corners), max(b.north for b in corners))
        found = cover(footprint(chosen, within=within), zoom)
        if area is not None:
            found = (t for t in found if t in area)
    else:
        assert aoi is not None
        found = iter_cover(load_geojson(aoi), zoom)  # checked here; the tiles stream as written
    target = writable_target(output, aoi) if output != "-" else None
    if target is None:
        count = write_tiles(found, sys.stdout)
    else:
        with atomic_write(target) as handle:
            count = write_tiles(found, handle)
    click.echo(f"{count:,} tiles at zoom {zoom}" + ("" if output == "-" else f" written to {output}")
               + ".", err=True)


@main.command("imagery")
@click.argument("tile", metavar="X-Y-Z")
@click.option("--imagery", "imagery", multiple=True, metavar="SOURCE",
              help=IMAGERY_HELP + " [default: the config's imagery].")
@stac_options
@raster_options
@click.option("--tile-size", type=click.Choice(["256", "512"]), default=None,
              help="The model's image size [default: the config's, else 256].")
@click.option("--format", "image_format", type=click.Choice(["png", "jpeg"]), default=None,
              help="The image's encoding: png (lossless) or jpeg (quality 90, a tenth of the "
                   "bytes) [default: the config's, else png].")
@requester_pays_option
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="The image to write (PNG or JPEG, as --format says).")
@config_options
def imagery_cmd(settings: Settings, tile: str, imagery: tuple[str, ...], assets: str | None,
                alternate: str | None, collections: tuple[str, ...], datetime_: str | None,
                bands: str | None,
                rescale: str | None, stretch: str | None, tile_size: str | None,
                image_format: str | None, requester_pays: bool, out: Path) -> None:
    """Write the image the worker would send the model for TILE: what to look at to check the
    bands and the stretch before a run. Exit 1 when the imagery has no valid pixel there.

    \b
    Examples:
      cnsq imagery 8853-6071-14 --imagery https://example.com/scene.tif --out tile.png
      cnsq imagery 8853-6071-14 --imagery s3://bucket/scene.tif --bands 4,3,2 --rescale 0,3000 --out tile.png
      cnsq imagery 8853-6071-14 --imagery https://earth-search.aws.element84.com/v1 \\
          --collection sentinel-2-l2a --datetime 2024-07-01/2024-07-31 \\
          --assets red,green,blue --stretch 2,98 --out tile.png
      cnsq imagery 8853-6071-14 --imagery https://example.com/scene.tif --format jpeg --out tile.jpg
      cnsq imagery 8853-6071-14 --out tile.png   # the config's imagery:
    """
    from cnsq.imagery import source, write_tile_image

    values = None if imagery else settings.load().values
    chosen = source(imagery, bands, rescale, tile_size, values, assets=assets,
                    collections=collections, datetime=datetime_, stretch=stretch,
                    image_format=image_format, requester_pays=requester_pays,
                    alternate=alternate)
    wrote = write_tile_image(tile, out, chosen)
    click.echo(f"Wrote {out} ({wrote:,} bytes)." if wrote else
               f"No imagery for tile {tile}: nothing written.", err=True)
    if not wrote:
        sys.exit(1)
