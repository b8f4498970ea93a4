"""COG and STAC imagery from the command line: the source from options or the config's
``imagery:``, its footprint for `cnsq tiles --imagery`, and one tile's image for `cnsq imagery`.
The reading is the worker's own (:mod:`download_and_predict.cog`, :mod:`download_and_predict.stac`):
what is written is what the model is sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import mercantile

from cnsq.errors import CnsqError, option
from download_and_predict.cog import Imagery, geographic_bounds, read_tile
from download_and_predict.errors import SettingsError
from download_and_predict.stac import (
    Fetch,
    Item,
    catalog_items,
    chosen,
    fetcher,
    intersects,
    search,
)
from download_and_predict.tiles import parse_tile_id

INSTALL = "pip install 'cnsq[cog]' (rio-tiler, whose rasterio wheels carry GDAL)"
COG_SUFFIXES = (".tif", ".tiff")
DOCUMENT_TIMEOUT = 30.0  # seconds for each STAC document, from the command line


def kind_of(url: str) -> str:
    """``cog`` (a .tif/.tiff, or anything in s3://), ``catalog`` (a .json: a static STAC
    catalog) or ``api`` (any other URL: a STAC API's root)."""
    path = url.split("?", 1)[0].lower()
    if url.startswith("s3://") or path.endswith(COG_SUFFIXES):
        return "cog"
    return "catalog" if path.endswith(".json") else "api"


def source(urls: Sequence[str], bands: str | None = None, rescale: str | None = None,
           tile_size: str | None = None, values: dict | None = None, *,
           assets: str | None = None, collections: Sequence[str] = (),
           datetime: str | None = None, stretch: str | None = None,
           image_format: str | None = None, requester_pays: bool = False,
           alternate: str | None = None) -> Imagery:
    """The imagery: ``urls`` (COGs, or one STAC catalog or API) with the options, else the
    config's ``imagery`` (``values``).

    Raises:
        CnsqError: no source, a mix of kinds, or a bad band list, range or size (naming the
            option or key).
    """
    raw: dict = dict((values or {}).get("imagery") or {})
    if urls:
        kinds = {kind_of(u) for u in urls}
        if kinds == {"cog"}:
            raw = {"cog": list(urls)}
        elif len(urls) == 1:
            raw = {"stac": {kinds.pop(): urls[0]}}
        else:
            raise CnsqError(f"{option('imagery')}: COGs (.tif) may be repeated for a mosaic; a "
                            "STAC catalog (.json) or API is given once, alone")
    # The config's key, or the command's option, in what an error says.
    named = {"imagery.cog": option("imagery"), "imagery.bands": option("bands"),
             "imagery.rescale": option("rescale"), "imagery.tileSize": option("tile_size"),
             "imagery.stretch": option("stretch"), "imagery.stac.assets": option("assets"),
             "imagery.stac.datetime": option("datetime_"), "imagery.format": option("image_format"),
             "imagery.requesterPays": option("requester_pays"),
             "imagery.stac.alternate": option("alternate")}
    if not raw.get("cog") and not raw.get("stac"):
        raise CnsqError(f"no imagery: pass {option('imagery')}, or set imagery.cog or "
                        "imagery.stac in the config")
    if not raw.get("stac"):
        for name, value in (("assets", assets), ("collections", collections),
                            ("datetime_", datetime), ("alternate", alternate)):
            if value:
                raise CnsqError(f"{option(name)}: applies to a STAC source (a catalog or API), "
                                "not to COGs")
    try:
        if raw.get("stac"):
            stac = raw["stac"] = dict(raw["stac"])
            if assets is not None:
                stac["assets"] = [a.strip() for a in assets.split(",") if a.strip()]
            if collections:
                stac["collections"] = list(collections)
            if datetime is not None:
                stac["datetime"] = datetime
            if alternate is not None:
                stac["alternate"] = alternate
        if bands is not None:
            raw["bands"] = [b.strip() for b in bands.split(",")]
        if rescale is not None:
            raw["rescale"] = _pair(rescale, "rescale")
        if stretch is not None:
            raw["stretch"] = _pair(stretch, "stretch")
        if tile_size is not None:
            raw["tileSize"] = int(tile_size)
        if image_format is not None:
            raw["format"] = image_format
        if requester_pays:
            raw["requesterPays"] = True
        chosen = Imagery.from_values(raw, "imagery")
    except SettingsError as exc:
        key, _, rest = str(exc).partition(": ")
        if not urls:
            raise CnsqError(f"{key}: {rest}") from None
        for name in sorted(named, key=len, reverse=True):  # keys the message names too
            rest = rest.replace(name, named[name])
        raise CnsqError(f"{named.get(key, key)}: {rest}") from None
    if urls and chosen.stac is not None:
        # Read here with the user's credentials: the buckets the stack's role may read
        # (imagery.stac.s3Buckets) do not bound a catalog given on the command line.
        chosen = dataclasses.replace(chosen, stac=dataclasses.replace(chosen.stac,
                                                                      s3_buckets=None))
    return chosen


def _pair(text: str, name: str) -> list[float]:
    low, _, high = text.partition(",")
    try:
        return [float(low), float(high)]
    except ValueError:
        said = "MIN,MAX" if name == "rescale" else "LOW,HIGH"
        raise CnsqError(f"{option(name)}: expected {said}, got {text!r}") from None


def raster_libraries() -> None:
    try:
        import rio_tiler  # noqa: F401
    except ImportError:
        raise CnsqError(f"reading COG imagery needs rio-tiler: {INSTALL}") from None


def stac_fetch() -> Fetch:
    from download_and_predict.http import Http

    return fetcher(Http(pool_size=4), DOCUMENT_TIMEOUT)


MAX_FOOTPRINT_ITEMS = 10_000  # a STAC API's items read for one footprint


def footprint(imagery: Imagery, fetch: Fetch | None = None,
              within: tuple[float, float, float, float] | None = None
              ) -> list[tuple[tuple[float, float, float, float], Item | None]]:
    """Where the imagery is: each COG's bounds in longitude and latitude, or each item of a
    STAC source that it chooses (its bbox, and the item for its polygon): a static catalog's
    all, a STAC API's over ``within`` (an area's bounds; at most :data:`MAX_FOOTPRINT_ITEMS`).

    Raises:
        CnsqError: a COG, catalog or API that cannot be read (naming it); a STAC API without
            an area, whose footprint is its whole collection.
    """
    if imagery.stac is not None:
        stac = imagery.stac
        if stac.api and within is None:
            raise CnsqError(f"{stac.api} is a STAC API: its footprint is its whole collection; "
                            "give an area as well (`cnsq tiles AOI.geojson --imagery …`: the "
                            "area's tiles the items cover), or a static catalog (a .json)")
        try:
            if stac.api:
                assert within is not None
                items = search(stac, within, fetch or stac_fetch(), MAX_FOOTPRINT_ITEMS)
            else:
                items = catalog_items(stac, fetch or stac_fetch())
        except Exception as exc:  # noqa: BLE001 - the fetch's and the catalog's, with the URL
            raise CnsqError(f"{stac.api or stac.catalog}: cannot read the items "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from None
        return [(i.bbox, i) for i in items if chosen(stac, i, i.properties.get("collection"))]
    raster_libraries()
    found: list[tuple[tuple[float, float, float, float], Item | None]] = []
    for url in imagery.urls:
        try:
            found += [(b, None) for b in geographic_bounds(Imagery((url,)))]
        except Exception as exc:  # noqa: BLE001 - rasterio's errors, said with the URL
            raise CnsqError(f"{url}: cannot read its bounds ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
    return found


def cover(places: Sequence[tuple[tuple[float, float, float, float], Item | None]], zoom: int
          ) -> Iterator[mercantile.Tile]:
    """The tiles at ``zoom`` over a footprint: over each box, and for a STAC item only those
    its polygon meets; each once, north to south and west to east."""
    from cnsq.tiles import cover_bounds

    kept: set[mercantile.Tile] = set()
    for box, item in places:
        for tile in cover_bounds([box], zoom):
            b = mercantile.bounds(tile)
            if item is None or intersects(item, (b.west, b.south, b.east, b.north)):
                kept.add(tile)
    yield from sorted(kept, key=lambda t: (t.y, t.x))


def source_name(imagery: Imagery) -> str:
    """What the imagery is, in a line: its COGs, or its STAC API or catalog."""
    if imagery.stac is not None:
        return f"STAC {imagery.stac.api or imagery.stac.catalog}"
    return ", ".join(imagery.urls)


def read_image(imagery: Imagery, x: int, y: int, z: int, fetch: Fetch | None = None
               ) -> bytes | None:
    """The image the worker sends the model for tile ``x``-``y``-``z`` (None: no valid pixel).

    Raises:
        CnsqError: no raster libraries; an unreadable COG or STAC document (naming the tile).
    """
    raster_libraries()
    try:
        return read_tile(imagery, x, y, z, fetch=fetch or (stac_fetch() if imagery.stac else None))
    except Exception as exc:  # noqa: BLE001 - rasterio's errors, the stretch's, STAC's
        raise CnsqError(f"tile {x}-{y}-{z}: {type(exc).__name__}: {str(exc)[:300]}") from None


def write_tile_image(tile: str, out: Path, imagery: Imagery, fetch: Fetch | None = None) -> int:
    """Write the image the worker would send the model for ``tile`` (x-y-z) to ``out``; the
    bytes written, 0 when the imagery has no valid pixel there (nothing written).

    Raises:
        CnsqError: a bad tile or file, or an unreadable COG or STAC document.
    """
    from cnsq.files import atomic_write

    try:
        x, y, z = parse_tile_id(tile)
    except ValueError as exc:
        raise CnsqError(f"tile {tile!r}: {exc}") from None
    image = read_image(imagery, x, y, z, fetch)
    if image is None:
        return 0
    with atomic_write(out, "wb") as handle:
        handle.write(image)
    return len(image)
