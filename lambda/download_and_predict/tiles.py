"""The tile vocabulary both sides share: the ``x-y-z`` id, a tile from a record's body or from
an id, the imagery URL template, and what counts as an image. cnsq imports it (its one home)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

from .errors import BadRecord, SettingsError

MAX_ZOOM = 30
# The tile id as a results file holds it, for readers that match many at once with a regular
# expression (Arrow's): x-y-z, digits only, no spaces, no braces. A value not of this form is read
# alone by parse_tile_id, which also takes the original's {x,y,z} and spaces around; the zoom
# still has to be checked against MAX_ZOOM.
TILE_ID_STRICT = r"[0-9]{1,10}-[0-9]{1,10}-[0-9]{1,2}"


# The first bytes of the image formats imagery endpoints serve: PNG, JPEG, WebP (RIFF), TIFF
# (both byte orders), GIF, JPEG 2000, BMP. An HTML "quota exceeded" page served with 200 is none
# of them.
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"II*\x00", b"MM\x00*", b"GIF8",
               b"\x00\x00\x00\x0cjP  ", b"\xffO\xffQ", b"BM")


def is_image(data: bytes) -> bool:
    """Whether ``data`` starts like an image the model server can decode (AVIF and HEIF: an
    ISO media file whose ``ftyp`` box comes first)."""
    return data.startswith(IMAGE_MAGIC) or data[4:8] == b"ftyp"


def raster_type(data: bytes) -> str | None:
    """The media type of a raster image a browser shows, decided from its bytes: PNG, JPEG,
    WebP, GIF or AVIF (an ISO media file whose brand is ``avif``/``avis``, not any ``ftyp``).
    None for anything else: SVG, HTML or a script is never passed on as an image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "image/avif"
    return None


def tile_id(tile: Any) -> str:
    """``x-y-z``, the id of a tile (anything with x, y and z: this Tile, a mercantile Tile) in
    the queue's tiles files, ``results.tile``, CSVs and GeoJSON — its one definition."""
    return f"{tile.x}-{tile.y}-{tile.z}"


class Tile(NamedTuple):
    """An XYZ (slippy map) tile."""

    x: int
    y: int
    z: int

    @property
    def id(self) -> str:
        """The tile as stored in ``results.tile``: ``x-y-z``."""
        return tile_id(self)


def parse_tile(body: str) -> Tile:
    """Read x, y and z by name from a JSON object body.

    Raises:
        BadRecord: not JSON, not an object, a missing or non-integer key, or out of range.
    """
    try:
        data = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise BadRecord(f"body is not JSON: {exc}") from None
    except RecursionError:  # a few KB of nested brackets exhaust the parser's stack
        raise BadRecord("body is nested too deeply to be a tile") from None
    if not isinstance(data, dict):
        raise BadRecord(f"body is not a JSON object: {body[:60]!r}")
    values = {}
    for key in ("x", "y", "z"):
        if key not in data:
            raise BadRecord(f"body has no '{key}': {body[:60]!r}")
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRecord(f"'{key}' is not an integer: {value!r}")
        values[key] = value
    try:
        return checked_tile(values["x"], values["y"], values["z"])
    except ValueError as exc:
        raise BadRecord(str(exc)) from None


def checked_tile(x: int, y: int, z: int) -> Tile:
    """The tile, if XYZ has it: the one range check of a record's body and an id.

    Raises:
        ValueError: z outside 0..MAX_ZOOM, or x or y outside the zoom's grid.
    """
    if not 0 <= z <= MAX_ZOOM:
        raise ValueError(f"z={z} is outside 0..{MAX_ZOOM}")
    limit = 2**z - 1
    for key, value in (("x", x), ("y", y)):
        if not 0 <= value <= limit:
            raise ValueError(f"{key}={value} is outside 0..{limit} at z={z}")
    return Tile(x, y, z)


def lonlat_bounds(x: int, y: int, z: int) -> tuple[float, float, float, float]:
    """Tile ``x``-``y``-``z``'s bounds in longitude and latitude (west, south, east, north)."""
    n = 2.0 ** z

    def lat(row: float) -> float:
        return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * row / n))))

    return x / n * 360.0 - 180.0, lat(y + 1), (x + 1) / n * 360.0 - 180.0, lat(y)


def imagery_url(template: str, tile: Tile, token: str | None) -> str:
    """Fill an imagery URL template.

    Two forms: the original's positional ``https://…/{}/{}/{}.jpg?access_token={}`` (z, x, y,
    token) and a named one, ``https://{s}.tiles…/{z}/{x}/{y}.jpg?access_token={token}``, where
    ``{s}`` spreads tiles over the subdomains a, b and c as XYZ clients do.
    """
    if "{}" in template:
        return template.format(tile.z, tile.x, tile.y, token or "")
    return template.format(z=tile.z, x=tile.x, y=tile.y, token=token or "",
                           s="abc"[(tile.x + tile.y) % 3])


def check_tile_endpoint(template: str) -> None:
    """Refuse, at cold start, a template no tile can be filled into.

    Raises:
        ValueError: an unknown placeholder, or the positional and named forms mixed.
    """
    try:
        imagery_url(template, Tile(0, 0, 0), "token")
    except (KeyError, IndexError, ValueError) as exc:
        reason = f"unknown placeholder {{{exc.args[0]}}}" if isinstance(exc, KeyError) else str(exc)
        raise SettingsError(f"TILE_ENDPOINT cannot be filled in ({reason}): use {{z}}, {{x}}, {{y}}, "
                         "{s} and {token}, or the original's four {} (z, x, y, token)") from None


# ASCII digits only: str.isdigit() and \d would take "²" or Arabic-Indic digits too. One regular
# expression per row is also what lets `cnsq view` read a million ids in seconds.
_TILE_ID = re.compile(r"\s*([0-9]+)-([0-9]+)-([0-9]+)\s*")
_BRACED_TILE_ID = re.compile(r"\s*\{([0-9]+)[-,]([0-9]+)[-,]([0-9]+)\}\s*")  # the original's


def parse_tile_id(text: str) -> Tile:
    """``"x-y-z"`` (or ``"{x,y,z}"``, as the original Lambda stored tiles) → Tile.

    Raises:
        ValueError: not three integers, or out of range for the zoom.
    """
    match = _TILE_ID.fullmatch(text) or _BRACED_TILE_ID.fullmatch(text)
    if match is None:
        raise ValueError(f"expected x-y-z with non-negative integers, got {text.strip()[:40]!r}")
    return checked_tile(int(match[1]), int(match[2]), int(match[3]))
