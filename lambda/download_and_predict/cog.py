"""Imagery read by the worker itself: Cloud-Optimized GeoTIFFs, one or a list read as a mosaic,
through rio-tiler over rasterio and GDAL (what TiTiler uses), reprojected from the COG's CRS to
the Web Mercator tile in the read. No tile server in between.

The worker's environment carries the source as JSON (``IMAGERY``, written by the template from
the config's ``imagery:``): :meth:`Cog.from_json` checks it at cold start. rio-tiler is imported
only when a tile is read, so the package builds without the raster libraries for XYZ imagery.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SettingsError

# GDAL's configuration options that make a COG read over HTTP cheap (GDAL's "Configuration
# options" and its /vsicurl/ documentation):
GDAL_OPTIONS: dict[str, str | int] = {
    # Opening a file lists no directory (one request for the header, not a listing of the
    # folder looking for sidecar files).
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # Only these are opened over /vsicurl/ (a URL without them is not probed for overviews).
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    # The header in the first request; blocks read stay cached in this process (warm calls).
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(32 * 2**20),
    "GDAL_CACHEMAX": 64,  # MB (rasterio takes this one as a number)
    # Neighbouring blocks in one range request.
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    # Block reads one after another through vsicurl's cache (parallel multi-range reads skip it:
    # a tile read the same blocks again, six requests where one does).
    "GDAL_HTTP_MULTIRANGE": "SERIAL",
    "GDAL_HTTP_MAX_RETRY": "2",
    "GDAL_HTTP_RETRY_DELAY": "0.2",
}
TILE_SIZES = (256, 512)


@dataclass(frozen=True)
class Cog:
    """``urls``: https:// or s3:// COGs, the first valid pixel of them in this order;
    ``bands``: 1-based band indexes (None: all); ``rescale``: each band's (min, max) to 0–255,
    one pair for every band or one per band (None: the data are 8-bit already);
    ``tile_size``: the model's image, 256 or 512 pixels."""

    urls: tuple[str, ...]
    bands: tuple[int, ...] | None = None
    rescale: tuple[tuple[float, float], ...] | None = None
    tile_size: int = 256

    @classmethod
    def from_json(cls, text: str) -> Cog:
        """The source the environment's ``IMAGERY`` holds.

        Raises:
            SettingsError: naming what is wrong (not JSON, no URL, a bad band or range).
        """
        try:
            raw = json.loads(text)
        except ValueError:
            raise SettingsError("IMAGERY is not JSON") from None
        if not isinstance(raw, dict):
            raise SettingsError("IMAGERY must be a JSON object")
        return cls.from_values(raw, "IMAGERY")

    @classmethod
    def from_values(cls, raw: dict, where: str = "imagery") -> Cog:
        """From a mapping (``cog``, ``bands``, ``rescale``, ``tileSize``), checked; ``where``
        prefixes each error (a config key or the environment variable)."""
        urls = raw.get("cog")
        urls = [urls] if isinstance(urls, str) else urls
        if not urls or not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise SettingsError(f"{where}.cog: expected a COG's URL or a list of them")
        for url in urls:
            if not url.startswith(("https://", "http://", "s3://")):
                raise SettingsError(f"{where}.cog: {url!r} is not an https:// or s3:// URL")
        bands = raw.get("bands")
        if bands is not None:
            if not isinstance(bands, list) or not bands or not all(
                    _integer(b) and int(b) >= 1 for b in bands):
                raise SettingsError(f"{where}.bands: expected a list of band numbers from 1, "
                                    f"got {bands!r}")
            bands = tuple(int(b) for b in bands)
        rescale = raw.get("rescale")
        if rescale is not None:
            rescale = _ranges(rescale, f"{where}.rescale", len(bands) if bands else None)
        size = raw.get("tileSize", 256)
        if not _integer(size) or int(size) not in TILE_SIZES:
            raise SettingsError(f"{where}.tileSize: expected 256 or 512, got {size!r}")
        return cls(tuple(urls), bands, rescale, int(size))

    def as_values(self) -> dict:
        values: dict = {"cog": list(self.urls), "tileSize": self.tile_size}
        if self.bands:
            values["bands"] = list(self.bands)
        if self.rescale:
            values["rescale"] = [list(r) for r in self.rescale]
        return values

    def to_json(self) -> str:
        return json.dumps(self.as_values(), separators=(",", ":"))


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or (
        isinstance(value, str) and value.strip().isdigit())


def _ranges(value: object, where: str, bands: int | None) -> tuple[tuple[float, float], ...]:
    """``[min, max]`` (every band) or ``[[min, max], …]`` (one per band), as float pairs."""
    def pair(item: object) -> tuple[float, float]:
        if (not isinstance(item, list | tuple) or len(item) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool)
                           and math.isfinite(v) for v in item) or not item[0] < item[1]):
            raise SettingsError(f"{where}: expected [min, max] with min < max, or one such "
                                f"pair per band, got {value!r}")
        return float(item[0]), float(item[1])

    if isinstance(value, list | tuple) and value and all(isinstance(v, list | tuple)
                                                         for v in value):
        pairs = tuple(pair(v) for v in value)
        if bands is not None and len(pairs) not in (1, bands):
            raise SettingsError(f"{where}: {len(pairs)} ranges for {bands} bands")
        return pairs
    return (pair(value),)


def read_tile(cog: Cog, x: int, y: int, z: int, timeout: float = 10.0) -> bytes | None:
    """The PNG image of tile ``x``-``y``-``z`` the model is sent (8-bit, ``cog.tile_size``
    pixels, no alpha band); None where no COG has a valid pixel of it (outside the imagery, or
    all nodata: the MISSING_TILES policy decides).

    ``timeout`` bounds each HTTP request GDAL makes (connect and transfer).

    Raises:
        ValueError: data that are not 8-bit and no ``rescale`` was given.
        rasterio's and rio-tiler's errors: an unreadable file, a URL that answers an error.
    """
    from rasterio import Env
    from rio_tiler.errors import EmptyMosaicError, TileOutsideBounds
    from rio_tiler.io import Reader
    from rio_tiler.mosaic import mosaic_reader

    def one(url: str, x: int, y: int, z: int):
        with Reader(url, dataset=_opened(url)) as source:
            return source.tile(x, y, z, tilesize=cog.tile_size,
                               indexes=list(cog.bands) if cog.bands else None)

    seconds = str(max(1, math.ceil(timeout)))
    with Env(**GDAL_OPTIONS, GDAL_HTTP_TIMEOUT=seconds, GDAL_HTTP_CONNECTTIMEOUT=seconds):
        try:
            image, _ = mosaic_reader(list(cog.urls), one, x, y, z, threads=0)
        except (EmptyMosaicError, TileOutsideBounds):
            return None
    if not image.mask.any():
        return None
    if cog.rescale:
        ranges = cog.rescale * image.count if len(cog.rescale) == 1 else cog.rescale
        image = image.rescale(in_range=ranges)
    elif str(image.data.dtype) != "uint8":
        raise ValueError(f"the imagery is {image.data.dtype}, not 8-bit: give imagery.rescale")
    return image.render(img_format="PNG", add_mask=False)


# Each thread keeps its COGs open (a rasterio dataset is not shared between threads): a warm
# worker reads a tile's blocks, not the header again, and GDAL's block cache serves blocks a
# neighbouring tile read. Bounded: a mosaic of many files keeps the last MAX_OPEN.
_THREAD = threading.local()
MAX_OPEN = 16


def _opened(url: str):
    import rasterio

    datasets: dict = _THREAD.__dict__.setdefault("datasets", {})
    dataset = datasets.pop(url, None)
    if dataset is None or dataset.closed:
        dataset = rasterio.open(url)
    datasets[url] = dataset  # the most recent last
    while len(datasets) > MAX_OPEN:
        datasets.pop(next(iter(datasets))).close()
    return dataset


def geographic_bounds(cog: Cog) -> Sequence[tuple[float, float, float, float]]:
    """Each COG's bounds in longitude and latitude (west, south, east, north)."""
    from rasterio import Env
    from rio_tiler.io import Reader

    found = []
    with Env(**GDAL_OPTIONS):
        for url in cog.urls:
            with Reader(url) as source:
                found.append(tuple(source.get_geographic_bounds("EPSG:4326")))
    return found
