"""Where ``cnsq view`` gets its base layer: a tile endpoint (the Lambda's URL template, its token
filled in here, on the server), a local folder of ``z/x/y`` images or MBTiles file, or COG or
STAC imagery read here as the worker reads it (``imagery:``).

The page only ever asks ``/imagery/{z}/{x}/{y}`` of the local server: the token never reaches
the browser, its history, its cache or a screenshot of its network panel.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from cnsq.errors import CnsqError, option
from cnsq.local.tileserver import FolderTiles, MBTiles, open_source
from download_and_predict.errors import HttpError, HttpTimeout, HttpTooLarge, SettingsError
from download_and_predict.http import Http
from download_and_predict.masking import mask, register_secret
from download_and_predict.settings import DEFAULT_MAX_TILE_BYTES
from download_and_predict.tiles import Tile, check_tile_endpoint, imagery_url, raster_type


class ImageryError(CnsqError):
    """The tile endpoint could not answer a tile (the message is masked)."""


@dataclass
class Image:
    data: bytes
    kind: str


class RemoteImagery:
    """Tiles from an XYZ endpoint, fetched with the token the page never sees, through the
    worker's HTTP client: the same total deadline (``timeout``, whatever the server does) and
    the same size bound (``max_bytes``)."""

    def __init__(self, template: str, token: str | None, timeout: float = 15.0,
                 max_bytes: int = DEFAULT_MAX_TILE_BYTES):
        try:
            check_tile_endpoint(template)
        except SettingsError as exc:
            raise CnsqError(f"{option('tile_endpoint')}: {exc}") from None
        register_secret(token)
        self.template, self.token, self.timeout = template, token, timeout
        self.max_bytes = max_bytes
        self.http = Http(16)
        self.zooms = (0, 22)
        self.name = mask(template.split("?", 1)[0])

    def get(self, z: int, x: int, y: int) -> Image | None:
        url = imagery_url(self.template, Tile(x, y, z), self.token)
        try:
            response = self.http.get(url, read_timeout=self.timeout,
                                     deadline=time.monotonic() + self.timeout,
                                     max_bytes=self.max_bytes)
        except HttpTooLarge:
            raise ImageryError(f"tile {x}-{y}-{z}: the tile endpoint answered a body over the "
                               f"{self.max_bytes:,} bytes allowed") from None
        except HttpTimeout:
            raise ImageryError(f"tile {x}-{y}-{z}: the tile endpoint did not answer within "
                               f"{self.timeout:g} s") from None
        except HttpError as exc:
            # The tile, never the URL: a URL carries the token, in forms no mask can foresee.
            # (The client's message starts with requests' exception name.)
            raise ImageryError(f"tile {x}-{y}-{z}: the tile endpoint did not answer "
                               f"({str(exc).split(':', 1)[0]})") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ImageryError(f"tile {x}-{y}-{z}: the tile endpoint answered "
                               f"{response.status_code}")
        # Only a raster image is passed on, typed from its bytes: an HTML page or an SVG served
        # as a tile would run in the view's origin. What the bytes are decides, not the endpoint.
        kind = raster_type(response.content)
        if kind is None:
            raise ImageryError(f"tile {x}-{y}-{z}: the tile endpoint answered "
                               f"{_kind(response.headers.get('Content-Type'))}, not a raster "
                               "image")
        return Image(response.content, kind)


def _kind(header: str | None) -> str:
    """A Content-Type fit to name in a message (its media type, at most 60 characters)."""
    return (header or "no content type").split(";")[0].strip()[:60] or "no content type"


class LocalImagery:
    """Tiles from a folder of ``z/x/y.{png,jpg,webp}`` or an MBTiles file (as ``cnsq tileserver``
    serves them): the demo's imagery after the demo has stopped serving it."""

    def __init__(self, path: Path):
        self.source: FolderTiles | MBTiles = open_source(path)
        self.name = str(path)
        self.zooms = self._zooms(path)

    @staticmethod
    def _zooms(path: Path) -> tuple[int, int]:
        if path.is_dir():
            found = [int(p.name) for p in path.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name)]
        else:
            import sqlite3

            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                found = [z for (z,) in conn.execute("SELECT DISTINCT zoom_level FROM tiles")]
        return (min(found), max(found)) if found else (0, 22)

    def get(self, z: int, x: int, y: int) -> Image | None:
        data = self.source.get(z, x, y, "png")
        if data is None:
            return None
        kind = raster_type(data)
        if kind is None:
            raise ImageryError(f"tile {x}-{y}-{z}: {self.name} holds no raster image for it")
        return Image(data, kind)


class RasterImagery:
    """Tiles read from COGs or a STAC source by the worker's own code
    (:func:`download_and_predict.cog.read_tile`): the image the model was sent, under its
    prediction."""

    def __init__(self, imagery, fetch=None):
        from cnsq.imagery import source_name, stac_fetch

        self.imagery = imagery
        self.fetch = fetch or (stac_fetch() if imagery.stac is not None else None)
        self.name = source_name(imagery)
        self.zooms = (0, 22)

    def get(self, z: int, x: int, y: int) -> Image | None:
        from cnsq.imagery import read_image

        try:
            data = read_image(self.imagery, x, y, z, self.fetch)
        except CnsqError as exc:
            raise ImageryError(str(exc)) from None
        return None if data is None else Image(data, raster_type(data) or "image/png")


def open_imagery(endpoint: str | None, token: str | None, raster=None
                 ) -> RemoteImagery | LocalImagery | RasterImagery | None:
    """The base layer: ``raster`` (an :class:`~download_and_predict.cog.Imagery`), else for
    ``--tile-endpoint`` a URL template, or a folder or MBTiles file."""
    if raster is not None:
        return RasterImagery(raster)
    if not endpoint:
        return None
    if "://" in endpoint:
        return RemoteImagery(endpoint, token)
    return LocalImagery(Path(endpoint))
