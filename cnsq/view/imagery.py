"""Where ``cnsq view`` gets its base layer: a tile endpoint (the Lambda's URL template, its token
filled in here, on the server) or a local folder of ``z/x/y`` images or MBTiles file.

The page only ever asks ``/imagery/{z}/{x}/{y}`` of the local server: the token never reaches
the browser, its history, its cache or a screenshot of its network panel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from download_and_predict.errors import SettingsError
from download_and_predict.masking import mask, register_secret
from download_and_predict.tiles import Tile, check_tile_endpoint, imagery_url, is_image

from ..errors import CnsqError
from ..local.tileserver import FolderTiles, MBTiles, content_type, open_source


class ImageryError(CnsqError):
    """The tile endpoint could not answer a tile (the message is masked)."""


@dataclass
class Image:
    data: bytes
    kind: str


class RemoteImagery:
    """Tiles from an XYZ endpoint, fetched with the token the page never sees."""

    def __init__(self, template: str, token: str | None, timeout: float = 15.0):
        import requests

        try:
            check_tile_endpoint(template)
        except SettingsError as exc:
            raise CnsqError(f"--tile-endpoint: {exc}") from None
        register_secret(token)
        self.template, self.token, self.timeout = template, token, timeout
        self.session = requests.Session()
        self.zooms = (0, 22)
        self.name = mask(template.split("?", 1)[0])

    def get(self, z: int, x: int, y: int) -> Image | None:
        import requests

        url = imagery_url(self.template, Tile(x, y, z), self.token)
        try:
            response = self.session.get(url, timeout=self.timeout)
        except requests.RequestException as exc:
            # The tile, never the URL: a URL carries the token, in forms no mask can foresee.
            raise ImageryError(f"tile {x}-{y}-{z}: the tile endpoint did not answer "
                               f"({type(exc).__name__})") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ImageryError(f"tile {x}-{y}-{z}: the tile endpoint answered "
                               f"{response.status_code}")
        # Only an image is passed on: an HTML page served as a tile would run in the view's
        # origin. What the bytes are decides, not what the endpoint says.
        if not is_image(response.content):
            raise ImageryError(f"tile {x}-{y}-{z}: the tile endpoint answered "
                               f"{_kind(response.headers.get('Content-Type'))}, not an image")
        kind = response.headers.get("Content-Type", "")
        return Image(response.content, kind if kind.startswith("image/")
                     else content_type(response.content))


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
        return Image(data, content_type(data)) if data is not None else None


def open_imagery(endpoint: str | None, token: str | None) -> RemoteImagery | LocalImagery | None:
    """The base layer for ``--tile-endpoint``: a URL template, or a folder or MBTiles file."""
    if not endpoint:
        return None
    if "://" in endpoint:
        return RemoteImagery(endpoint, token)
    return LocalImagery(Path(endpoint))
