"""Imagery read by the worker itself: Cloud-Optimized GeoTIFFs, one or a list read as a mosaic,
through rio-tiler over rasterio and GDAL (what TiTiler uses), reprojected from the COG's CRS to
the Web Mercator tile in the read. No tile server in between.

The worker's environment carries the source as JSON (``IMAGERY``, written by the template from
the config's ``imagery:``): :meth:`Imagery.from_json` checks it at cold start. A STAC source's
items over each tile are found by :mod:`download_and_predict.stac`, then read like a list of
COGs. rio-tiler is imported only when a tile is read, so the package builds without the raster
libraries for XYZ imagery.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import SettingsError
from .stac import Fetch, Stac, items_for

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
# zlib's fastest level for the PNG the model is sent: on the benchmark's 256-pixel tiles 4.5 ms
# of CPU where GDAL's default (6) takes 15.8 ms, for 17 % more bytes (95 KB against 81 KB). The
# CPU was half of a tile's read; the bytes cross the load balancer once.
PNG_ZLEVEL = 1
# The image the model is sent (``imagery.format``): GDAL's driver and its creation options.
# PNG by default (lossless); JPEG at quality 90 for a model trained on JPEG tiles, as most XYZ
# imagery is served: a tenth of the bytes to send and for the server to parse and decode.
FORMATS: dict[str, tuple[str, dict[str, int]]] = {
    "png": ("PNG", {"ZLEVEL": PNG_ZLEVEL}),
    "jpeg": ("JPEG", {"QUALITY": 90}),
}
JPEG_BANDS = (1, 3)  # grey or RGB: what a model's JPEG decoder reads


def s3_options(env: Mapping[str, str]) -> dict[str, str]:
    """GDAL's settings for an S3 endpoint other than AWS's, from the one boto3 takes
    (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``): an s3:// COG is read where the rest
    of the AWS calls go (a MinIO, an emulator), path-style. None set: GDAL's defaults (AWS, the
    function's credentials and region from the environment Lambda gives it)."""
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    parts = urlsplit(endpoint)
    return {"AWS_S3_ENDPOINT": parts.netloc, "AWS_VIRTUAL_HOSTING": "FALSE",
            "AWS_HTTPS": "YES" if parts.scheme == "https" else "NO"}


@dataclass(frozen=True)
class Imagery:
    """What the worker reads: ``urls``, https:// or s3:// COGs, the first valid pixel of them
    in this order, or ``stac``, a STAC source whose items over each tile are that list
    (:mod:`download_and_predict.stac`); ``bands``: 1-based band indexes of each COG, or of a
    STAC item's assets stacked in order (None: all); ``rescale``: each band's (min, max) to
    0–255, one pair for every band or one per band; ``stretch``: instead, the (low, high)
    percentiles of each COG's own values (read once from its smallest overview) to 0–255, so
    scenes of different brightness meet at their seams (None for both: the data are 8-bit
    already); ``tile_size``: the model's image, 256 or 512 pixels; ``format``: its encoding,
    ``png`` or ``jpeg`` (:data:`FORMATS`); ``requester_pays``: s3:// reads are billed to this
    account, as requester-pays buckets (USGS's Landsat) demand."""

    urls: tuple[str, ...] = ()
    bands: tuple[int, ...] | None = None
    rescale: tuple[tuple[float, float], ...] | None = None
    tile_size: int = 256
    stac: Stac | None = None
    stretch: tuple[float, float] | None = None
    format: str = "png"
    requester_pays: bool = False

    @classmethod
    def from_json(cls, text: str) -> Imagery:
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
    def from_values(cls, raw: dict, where: str = "imagery") -> Imagery:
        """From a mapping (``cog`` or ``stac``, ``bands``, ``rescale`` or ``stretch``,
        ``tileSize``, ``format``, ``requesterPays``), checked; ``where`` prefixes each error (a
        config key or the environment variable)."""
        urls = raw.get("cog")
        stac = None
        if raw.get("stac") is not None:
            if urls:
                raise SettingsError(f"{where}: give cog or stac, not both")
            stac = Stac.from_values(raw["stac"], f"{where}.stac")
            urls = []
        else:
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
        stretch = raw.get("stretch")
        if stretch is not None:
            if rescale is not None:
                raise SettingsError(f"{where}: give rescale or stretch, not both")
            [stretch] = _ranges(stretch, f"{where}.stretch", None)
            if not 0 <= stretch[0] < stretch[1] <= 100:
                raise SettingsError(f"{where}.stretch: expected [low, high] percentiles "
                                    f"within 0–100, got {raw['stretch']!r}")
        size = raw.get("tileSize", 256)
        if not _integer(size) or int(size) not in TILE_SIZES:
            raise SettingsError(f"{where}.tileSize: expected 256 or 512, got {size!r}")
        encoding = raw.get("format", "png")
        if encoding not in FORMATS:
            raise SettingsError(f"{where}.format: expected png or jpeg, got {encoding!r}")
        if encoding == "jpeg" and bands and len(bands) not in JPEG_BANDS:
            raise SettingsError(f"{where}.format: a JPEG has 1 or 3 bands, {where}.bands names "
                                f"{len(bands)}")
        pays = raw.get("requesterPays", False)
        if not isinstance(pays, bool):
            raise SettingsError(f"{where}.requesterPays: expected true or false, got {pays!r}")
        return cls(tuple(urls), bands, rescale, int(size), stac, stretch, encoding, pays)

    def as_values(self) -> dict:
        values: dict = {"stac": self.stac.as_values()} if self.stac else {"cog": list(self.urls)}
        values["tileSize"] = self.tile_size
        if self.bands:
            values["bands"] = list(self.bands)
        if self.rescale:
            values["rescale"] = [list(r) for r in self.rescale]
        if self.stretch:
            values["stretch"] = list(self.stretch)
        if self.format != "png":
            values["format"] = self.format
        if self.requester_pays:
            values["requesterPays"] = True
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


def read_tile(imagery: Imagery, x: int, y: int, z: int, timeout: float = 10.0,
              fetch: Fetch | None = None) -> bytes | None:
    """The image of tile ``x``-``y``-``z`` the model is sent (8-bit, ``imagery.tile_size``
    pixels, no alpha band, encoded as ``imagery.format``); None where no COG has a valid pixel
    of it (outside the imagery, no STAC item over it, or all nodata: the MISSING_TILES policy
    decides).

    ``timeout`` bounds each HTTP request GDAL makes (connect and transfer); ``fetch`` reads
    a STAC source's documents (:func:`download_and_predict.stac.fetcher`).

    Raises:
        ValueError: data that are not 8-bit and no ``rescale`` or ``stretch`` was given; a
            JPEG asked of other than 1 or 3 bands; a STAC document that is not one.
        rasterio's and rio-tiler's errors: an unreadable file, a URL that answers an error.
        The fetch's errors: a STAC API or catalog that does not answer.
    """
    from rasterio.errors import NotGeoreferencedWarning
    from rio_tiler.errors import EmptyMosaicError, TileOutsideBounds
    from rio_tiler.models import ImageData
    from rio_tiler.mosaic import mosaic_reader

    # The PNG is written without a geotransform on purpose (the model wants pixels): rasterio's
    # NotGeoreferencedWarning is no news. Filtered for the process (warnings.catch_warnings is
    # not thread-safe, and the worker reads tiles in threads).
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)

    if imagery.stac is not None:
        if fetch is None:
            raise ValueError("a STAC source is read with a fetch (stac.fetcher)")
        items = items_for(imagery.stac, x, y, z, fetch)
        for item in items:
            for href in item.hrefs:
                imagery.stac.check_href(href, item.id)
        sources = [item.hrefs for item in items]
    else:
        sources = [(url,) for url in imagery.urls]
    if not sources:
        return None
    bands = list(imagery.bands) if imagery.bands else None

    def one(hrefs: tuple[str, ...], x: int, y: int, z: int) -> ImageData:
        if len(hrefs) == 1:
            return _read(hrefs[0], x, y, z, imagery, bands)
        # A STAC item's assets, each a COG, stacked in the order named; bands index the stack.
        image = ImageData.create_from_list([_read(h, x, y, z, imagery, None) for h in hrefs])
        if bands:
            if max(bands) > image.count:
                raise ValueError(f"imagery.bands: band {max(bands)} of {image.count}")
            image = ImageData(image.array[[b - 1 for b in bands]], bounds=image.bounds,
                              crs=image.crs)
        return image

    with gdal_env(imagery, timeout):
        try:
            image, _ = mosaic_reader(sources, one, x, y, z, threads=0)
        except (EmptyMosaicError, TileOutsideBounds):
            return None
    if not image.mask.any():
        return None
    if imagery.rescale:
        ranges = imagery.rescale * image.count if len(imagery.rescale) == 1 else imagery.rescale
        image = image.rescale(in_range=ranges)
    elif str(image.data.dtype) != "uint8":
        raise ValueError(f"the imagery is {image.data.dtype}, not 8-bit: give imagery.rescale "
                         "or imagery.stretch")
    driver, options = FORMATS[imagery.format]
    if driver == "JPEG" and image.count not in JPEG_BANDS:
        raise ValueError(f"imagery.format: a JPEG has 1 or 3 bands, the imagery {image.count}: "
                         "choose them with imagery.bands")
    return image.render(add_mask=False, img_format=driver, colormap=None, **options)


def _read(href: str, x: int, y: int, z: int, imagery: Imagery, bands: list[int] | None):
    """One COG's part of the tile, stretched to 8-bit by its own percentiles when asked."""
    from rio_tiler.io import Reader

    with Reader(href, dataset=_opened(href)) as source:
        image = source.tile(x, y, z, tilesize=imagery.tile_size, indexes=bands,
                            vrt_options=warp_options(source.dataset, source.tms.rasterio_crs))
    if imagery.stretch:
        image = image.rescale(in_range=_percentiles(href, bands, imagery.stretch))
    return image


def warp_options(dataset, tile_crs) -> dict | None:
    """The WarpedVRT options for reading ``dataset`` (with a nodata value, in another CRS than
    the tiles') into a tile: the same pixels and mask as rio-tiler's default, a third of the time.

    Why: rio-tiler gives the warped dataset the source's nodata and reads it masked, and GDAL's
    mask of a nodata band is the band read again — over HTTP each tile warped its blocks four
    times (15 ms a tile in ``bench.py cog``, 5 ms this way). rio-tiler then masks the pixels
    equal to nodata itself, so the warped dataset needs no nodata: only its untouched pixels
    must start at the nodata value (``INIT_DEST``), as they would with one. None: rio-tiler's
    way (no nodata: an alpha band masks; the same CRS: no warp at all; a NaN nodata: GDAL's
    INIT_DEST takes numbers only, and starts the pixels at 0)."""
    nodata = dataset.nodata
    if nodata is None or math.isnan(nodata) or dataset.crs == tile_crs:
        return None
    return {"nodata": None, "init_dest_nodata": False, "INIT_DEST": repr(float(nodata))}


# Each COG's stretch, read once a process from its smallest overview.
_STRETCHES: dict[tuple, list[tuple[float, float]]] = {}


def _percentiles(href: str, bands: list[int] | None, stretch: tuple[float, float]
                 ) -> list[tuple[float, float]]:
    from rio_tiler.io import Reader

    key = (href, tuple(bands or ()), stretch)
    if key not in _STRETCHES:
        low, high = stretch
        with Reader(href, dataset=_opened(href)) as source:
            stats = source.statistics(indexes=bands, max_size=256, percentiles=[low, high])
        ranges = []
        for band in stats.values():
            values = band.model_dump()
            lo, hi = values[f"percentile_{int(low)}"], values[f"percentile_{int(high)}"]
            ranges.append((lo, hi if hi > lo else lo + 1))
        _STRETCHES[key] = ranges
    return _STRETCHES[key]


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


def gdal_env(imagery: Imagery, timeout: float | None = None):
    """GDAL's settings for reading ``imagery``: :data:`GDAL_OPTIONS`, the S3 endpoint boto3 would
    use, who pays for a requester-pays bucket, and ``timeout`` for each HTTP request (connect and
    transfer; None: GDAL's own)."""
    from rasterio import Env

    options: dict[str, str | int] = {**GDAL_OPTIONS, **s3_options(os.environ)}
    if imagery.requester_pays:
        # A requester-pays bucket answers 403 to a read that does not say who pays.
        options["AWS_REQUEST_PAYER"] = "requester"
    if timeout is not None:
        seconds = str(max(1, math.ceil(timeout)))
        options.update(GDAL_HTTP_TIMEOUT=seconds, GDAL_HTTP_CONNECTTIMEOUT=seconds)
    return Env(**options)


def geographic_bounds(imagery: Imagery) -> list[tuple[float, float, float, float]]:
    """Each COG's bounds in longitude and latitude (west, south, east, north)."""
    from rio_tiler.io import Reader

    found = []
    with gdal_env(imagery):
        for url in imagery.urls:
            with Reader(url) as source:
                w, s, e, n = source.get_geographic_bounds("EPSG:4326")
                found.append((float(w), float(s), float(e), float(n)))
    return found
