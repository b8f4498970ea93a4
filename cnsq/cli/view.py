"""`cnsq view`: the predictions on a map over their imagery. Parses its options and delegates."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import click

from cnsq.cli.app import (
    Settings,
    _admin,
    _database_url,
    _finite,
    _row_progress,
    _wait_forever,
    config_options,
    main,
)
from cnsq.cli.data import raster_options, requester_pays_option, stac_options


@main.command()
@click.argument("results", required=False)
@click.option("--database-url", envvar="DATABASE_URL",
              help="postgresql://… or sqlite:///… [default: DATABASE_URL, else the stack's].")
@click.option("--tile-endpoint", envvar="TILE_ENDPOINT",
              help="The imagery: a URL template (…/{z}/{x}/{y}.jpg?access_token={token}, the "
                   "token from TILE_ACCESS_TOKEN), or a folder of z/x/y images or an MBTiles "
                   "file [default: TILE_ENDPOINT, else the config's].")
@click.option("--imagery", "imagery_sources", multiple=True, metavar="SOURCE",
              help="Instead of --tile-endpoint: COG or STAC imagery, read here as the worker "
                   "reads it (a .tif, repeatable; a STAC catalog's .json; a STAC API's root) "
                   "[default: the config's imagery: when it has one].")
@stac_options
@raster_options
@requester_pays_option
@click.option("--thresh_ind", "--thresh-ind", "thresh_ind", type=int, default=-1,
              show_default=True, help="Index of the class score to colour and threshold by "
                                      "(-1: the last).")
@click.option("--thresh", type=float, default=0.5, show_default=True,
              callback=lambda ctx, param, value: _finite(value),
              help="The threshold the slider starts at.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--open/--no-open", "open_browser", default=False, show_default=True,
              help="Open the page in the default browser.")
@config_options
def view(settings: Settings, results: str | None, database_url: str | None,
         tile_endpoint: str | None, imagery_sources: tuple[str, ...], assets: str | None,
         alternate: str | None, collections: tuple[str, ...], datetime_: str | None,
         bands: str | None, rescale: str | None, stretch: str | None, requester_pays: bool,
         thresh_ind: int, thresh: float, port: int, open_browser: bool) -> None:
    """Look at the predictions on a map, over the imagery they came from.

    RESULTS is a results CSV (tile,output, as run and download write it), a SQLite results
    database, or a database URL; without it, --database-url, else the deployed stack's database
    (exported as download does), else ./results.csv (over ./tiles/ when there is one: a folder
    that demo or run wrote). Serves one page on 127.0.0.1 until Ctrl-C: the tiles coloured
    by score, a threshold slider with the count above it, a histogram, a click for a tile's
    scores and a GeoJSON download (what convert-geojson writes). Imagery is fetched by this
    command, so the token never reaches the browser. A million results stay smooth: the page
    gets only what is in view, as parent squares (max, mean, count) when zoomed out.

    \b
    Examples:
      cnsq view cnsq-demo/results.csv --tile-endpoint cnsq-demo/tiles --open
      TILE_ACCESS_TOKEN=… cnsq view results.csv \\
        --tile-endpoint 'https://tiles.example.com/{z}/{x}/{y}.jpg?access_token={token}'
      cnsq view results.csv --imagery https://example.com/scene.tif
      cnsq view results.csv --imagery https://earth-search.aws.element84.com/v1 \\
        --collection sentinel-2-l2a --datetime 2024-07-01/2024-07-31 \\
        --assets red,green,blue --stretch 2,98
      cnsq view --config config/config.yml --thresh_ind 1 --thresh 0.9
    """
    from cnsq.view import prepare, results_csv
    from cnsq.view.imagery import open_imagery
    from cnsq.view.index import default_cache
    from cnsq.view.server import bind

    token = os.environ.get("TILE_ACCESS_TOKEN") or None
    if not (results or database_url or settings.config.exists()) and Path("results.csv").is_file():
        # A folder `cnsq demo` or `cnsq run` wrote: its results, over its imagery if it has it.
        results = "results.csv"
        if tile_endpoint is None and Path("tiles").is_dir():
            tile_endpoint = "tiles"
        click.echo(f"Viewing results.csv{' over tiles/' if tile_endpoint == 'tiles' else ''} "
                   "(found here).", err=True)
    from cnsq.config import raster_imagery
    from cnsq.imagery import source as imagery_source

    # COG or STAC imagery chosen and scaled as `cnsq imagery` takes it.
    chosen = partial(imagery_source, bands=bands, rescale=rescale, assets=assets,
                     alternate=alternate, collections=collections, datetime=datetime_,
                     stretch=stretch, requester_pays=requester_pays)
    raster = None
    values = None
    if imagery_sources:
        raster = chosen(imagery_sources)
    elif tile_endpoint is None and settings.config.exists():
        values = settings.load().values
        if raster_imagery(values):
            raster = chosen((), values=values)
    unused = [flag for flag, value in (
        ("--assets", assets), ("--alternate", alternate), ("--collection", collections),
        ("--datetime", datetime_), ("--bands", bands), ("--rescale", rescale),
        ("--stretch", stretch), ("--requester-pays", requester_pays)) if value]
    if raster is None and unused:
        raise click.UsageError(f"{unused[0]}: applies to COG or STAC imagery (--imagery, or the "
                               "config's imagery:), not to XYZ tiles")
    if raster is None and values is not None:  # the config's XYZ imagery, as deployed
        tile_endpoint, config_token = settings.deployed().tile_endpoint
        token = token or config_token
    imagery = open_imagery(tile_endpoint, token, raster)
    running = bind(port)
    workdir = Path(tempfile.mkdtemp(prefix="cnsq-view-"))
    viewed = None
    try:
        admin = None if results or database_url else _admin(None, settings)
        if not (results or database_url or admin) and settings.config.exists():
            database_url = _database_url(None, settings)  # a stack without an admin function
        source, name = results_csv(results, database_url, workdir, admin,
                                   _row_progress("Exporting the results"))
        progress = _row_progress(f"Reading {name}")
        began = time.monotonic()
        viewed, cached = prepare(source, name, workdir, thresh_ind, thresh, imagery,
                                 default_cache(), progress, early=True)
        if progress:
            click.echo("", err=True)
        index = viewed.index
        report = index.report
        if report.bad_count:
            line, reason = report.bad[0]
            click.echo(f"warning: {report.bad_count:,} unreadable row(s) skipped (first: line "
                       f"{line}: {reason})", err=True)
        running.serve(viewed)
        how = " (its index, cached)" if cached else ""
        if not index.tiles_ready:
            how = " (its tiles are still being indexed: the closest zooms wait for them)"
        click.echo(f"Read {index.total:,} tiles from {name}{how} in "
                   f"{time.monotonic() - began:.1f}s "
                   f"({index.above(thresh):,} scoring ≥ {thresh:g}); imagery: "
                   f"{imagery.name if imagery else 'none (pass --tile-endpoint)'}.", err=True)

        def announce() -> None:
            click.echo(f"Viewing at {running.url} (Ctrl-C to stop)", err=True)
            click.echo(running.url)
            sys.stdout.flush()
            if open_browser:
                import webbrowser

                if not webbrowser.open(running.url):
                    click.echo("warning: no browser to open; open the URL above", err=True)

        _wait_forever("cnsq view", announce)
    finally:
        running.close()
        if viewed is not None:
            viewed.index.close()  # stops writing its tiles, if it still was
        shutil.rmtree(workdir, ignore_errors=True)
