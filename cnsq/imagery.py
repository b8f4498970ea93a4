"""COG imagery from the command line: the source from options or the config's ``imagery:``, its
footprint for `cnsq tiles --imagery`, and one tile's image for `cnsq imagery`. The reading is
the worker's own (:mod:`download_and_predict.cog`): what is written is what the model is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cnsq.errors import CnsqError, option
from download_and_predict.cog import Cog, geographic_bounds, read_tile
from download_and_predict.errors import SettingsError
from download_and_predict.tiles import parse_tile_id

INSTALL = "pip install 'cnsq[cog]' (rio-tiler, whose rasterio wheels carry GDAL)"


def source(urls: Sequence[str], bands: str | None = None, rescale: str | None = None,
           tile_size: str | None = None, values: dict | None = None) -> Cog:
    """The COG source: ``urls`` with the options, else the config's ``imagery`` (``values``).

    Raises:
        CnsqError: no source, or a bad band list, range or size (naming the option or key).
    """
    raw: dict = dict((values or {}).get("imagery") or {}) if not urls else {"cog": list(urls)}
    # The config's key, or the command's option, in what an error says.
    named = {"imagery.cog": option("imagery"), "imagery.bands": option("bands"),
             "imagery.rescale": option("rescale"), "imagery.tileSize": option("tile_size")}
    if not raw.get("cog"):
        raise CnsqError(f"no imagery: pass {option('imagery')}, or set imagery.cog in the config")
    try:
        if bands is not None:
            raw["bands"] = [b.strip() for b in bands.split(",")]
        if rescale is not None:
            low, _, high = rescale.partition(",")
            raw["rescale"] = [float(low), float(high)]
        if tile_size is not None:
            raw["tileSize"] = int(tile_size)
        return Cog.from_values(raw, "imagery")
    except SettingsError as exc:
        key, _, rest = str(exc).partition(": ")
        raise CnsqError(f"{named.get(key, key) if urls else key}: {rest}") from None
    except ValueError:
        raise CnsqError(f"{option('rescale')}: expected MIN,MAX, got {rescale!r}") from None


def _raster_libraries() -> None:
    try:
        import rio_tiler  # noqa: F401
    except ImportError:
        raise CnsqError(f"reading COG imagery needs rio-tiler: {INSTALL}") from None


def footprint(urls: Sequence[str]) -> list[tuple[float, float, float, float]]:
    """Each COG's bounds in longitude and latitude.

    Raises:
        CnsqError: a COG that cannot be opened (naming it).
    """
    _raster_libraries()
    cog = source(urls)
    found: list[tuple[float, float, float, float]] = []
    for url in cog.urls:
        try:
            found += geographic_bounds(Cog((url,)))
        except Exception as exc:  # noqa: BLE001 - rasterio's errors, said with the URL
            raise CnsqError(f"{url}: cannot read its bounds ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
    return list(found)


def write_tile_image(tile: str, out: Path, urls: Sequence[str], bands: str | None,
                     rescale: str | None, tile_size: str | None, values: dict | None) -> int:
    """Write the PNG the worker would send the model for ``tile`` (x-y-z) to ``out``; the
    bytes written, 0 when the imagery has no valid pixel there (nothing written).

    Raises:
        CnsqError: a bad tile, source or file, or an unreadable COG.
    """
    from cnsq.files import atomic_write

    try:
        x, y, z = parse_tile_id(tile)
    except ValueError as exc:
        raise CnsqError(f"tile {tile!r}: {exc}") from None
    cog = source(urls, bands, rescale, tile_size, values)
    _raster_libraries()
    try:
        image = read_tile(cog, x, y, z)
    except Exception as exc:  # noqa: BLE001 - rasterio's errors and the stretch's
        raise CnsqError(f"tile {tile}: {type(exc).__name__}: {str(exc)[:300]}") from None
    if image is None:
        return 0
    with atomic_write(out, "wb") as handle:
        handle.write(image)
    return len(image)
