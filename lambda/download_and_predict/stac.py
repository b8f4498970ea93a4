"""Imagery found through STAC: the items over a tile, from a STAC API's search or a static
catalog, in the order the user chose, each with the hrefs of the assets the model's image is
made of (read by :mod:`download_and_predict.cog` as a mosaic, first valid pixel first).

A STAC API is asked once for a block of 64 tiles (``POST {api}/search``: collections, the
block's bbox, the datetime, the ``query`` extension's property filter, ``sortby``; see
:data:`SEARCH_LEVELS`); a static catalog is read once per process (its children and items
followed from ``catalog.json``) and filtered here with the same rules, so both give the same
items for the same imagery. Every document is fetched with a deadline and a size bound (the
caller's ``fetch``).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urljoin

from .errors import SettingsError
from .tiles import lonlat_bounds

# fetch(url, payload) → the JSON document (GET without a payload, POST with one).
Fetch = Callable[[str, dict | None], Any]
MAX_DOCUMENTS = 5000  # a static catalog larger than this wants a STAC API
MAX_DOCUMENT_BYTES = 8 * 2**20
# S3's bucket naming rules (its user guide): 3-63 characters, lowercase letters, digits, dots and
# hyphens, beginning and ending with a letter or digit.
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
PAGE_LIMIT = 250  # items a search page asks for (APIs cap it; earth-search at 10,000)
OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "in")
Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class Stac:
    """``api``: a STAC API's root (its ``/search`` is asked); ``catalog``: a static catalog's
    ``catalog.json`` (one of the two). ``collections``, ``datetime`` (RFC 3339, or a
    ``start/end`` interval, ``..`` open) and ``query`` (``{property: {operator: value}}``, the
    query extension's operators) choose the items; ``sortby``: properties, ``-`` before a name
    for descending, the mosaic's order (its first item's valid pixels win); ``assets``: the
    asset keys stacked into the image, in band order; ``max_items``: the mosaic's depth;
    ``s3_buckets``: the S3 buckets the items' s3:// assets may be read from (the stack grants
    its worker GetObject in them; an asset elsewhere fails its tile, naming the bucket);
    ``alternate``: read each asset from its alternate of this name (STAC's alternate-assets
    extension: ``assets.KEY.alternate.NAME.href``, the same file elsewhere) when it has one —
    USGS's Landsat items point ``href`` at a server that wants a login and give the file in S3
    as ``alternate.s3``."""

    api: str | None = None
    catalog: str | None = None
    collections: tuple[str, ...] = ()
    datetime: str | None = None
    query: tuple[tuple[str, str, Any], ...] = ()
    sortby: tuple[str, ...] = ()
    assets: tuple[str, ...] = ("visual",)
    max_items: int = 10
    # None: any bucket (a source given on cnsq's command line is read with the user's own
    # credentials, not the stack's role).
    s3_buckets: tuple[str, ...] | None = ()
    alternate: str | None = None

    @classmethod
    def from_values(cls, raw: object, where: str = "imagery.stac") -> Stac:
        """Checked, from the config's mapping.

        Raises:
            SettingsError: naming the key (``where``.key) and what is wrong.
        """
        if not isinstance(raw, dict):
            raise SettingsError(f"{where}: expected a mapping with api or catalog")
        known = {"api", "catalog", "collections", "datetime", "query", "sortby", "assets",
                 "maxItems", "s3Buckets", "alternate"}
        for key in raw:
            if key not in known:
                raise SettingsError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        api, catalog = raw.get("api"), raw.get("catalog")
        if bool(api) == bool(catalog):
            raise SettingsError(f"{where}: give one of api (a STAC API's root URL) or catalog "
                                "(a static catalog's catalog.json)")
        for key, url in (("api", api), ("catalog", catalog)):
            if url is not None and (not isinstance(url, str) or not url.startswith(
                    ("https://", "http://"))):
                raise SettingsError(f"{where}.{key}: {url!r} is not an https:// URL")
        collections = _strings(raw.get("collections", []), f"{where}.collections")
        assets = _strings(raw.get("assets", ["visual"]), f"{where}.assets")
        if not assets:
            raise SettingsError(f"{where}.assets: name at least one asset")
        sortby = _strings(raw.get("sortby", []), f"{where}.sortby")
        when = raw.get("datetime")
        if when is not None:
            if not isinstance(when, str):
                raise SettingsError(f"{where}.datetime: expected a date or start/end, got {when!r}")
            try:
                _interval(when)
            except ValueError as exc:
                raise SettingsError(f"{where}.datetime: {exc}") from None
        query = _query(raw.get("query") or {}, f"{where}.query")
        depth = raw.get("maxItems", 10)
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 100:
            raise SettingsError(f"{where}.maxItems: expected 1 to 100, got {depth!r}")
        buckets = _strings(raw.get("s3Buckets", []), f"{where}.s3Buckets")
        for bucket in buckets:
            if not BUCKET_NAME.fullmatch(bucket):
                raise SettingsError(f"{where}.s3Buckets: {bucket!r} is not an S3 bucket's name "
                                    "(3-63 lowercase letters, digits, dots and hyphens)")
        alternate = raw.get("alternate")
        if alternate is not None and (not isinstance(alternate, str) or not alternate.strip()):
            raise SettingsError(f"{where}.alternate: expected the name of an asset's alternate "
                                f"(such as s3), got {alternate!r}")
        return cls(api.rstrip("/") if api else None, catalog or None, collections, when, query,
                   sortby, assets, depth, buckets, alternate.strip() if alternate else None)

    def as_values(self) -> dict:
        values: dict = {"api": self.api} if self.api else {"catalog": self.catalog}
        if self.collections:
            values["collections"] = list(self.collections)
        if self.datetime:
            values["datetime"] = self.datetime
        if self.query:
            query: dict = {}
            for name, op, value in self.query:
                query.setdefault(name, {})[op] = value
            values["query"] = query
        if self.sortby:
            values["sortby"] = list(self.sortby)
        values["assets"] = list(self.assets)
        values["maxItems"] = self.max_items
        if self.s3_buckets:
            values["s3Buckets"] = list(self.s3_buckets)
        if self.alternate:
            values["alternate"] = self.alternate
        return values

    def check_href(self, href: str, item: str) -> None:
        """Refuse an s3:// asset outside :attr:`s3_buckets`: the worker's role may not read it,
        and S3's answer (403) would not say why.

        Raises:
            ValueError: naming the item, the asset and the key to set.
        """
        if not href.startswith("s3://") or self.s3_buckets is None:
            return
        bucket = href[5:].split("/", 1)[0]
        if bucket not in self.s3_buckets:
            raise ValueError(f"STAC item {item!r}: its asset {href} is in S3 bucket {bucket!r}, "
                             "not in imagery.stac.s3Buckets (the buckets the stack lets its "
                             "worker read): add it there and deploy")


@dataclass(frozen=True)
class Item:
    """One STAC item: its id, bbox (longitude/latitude), footprint polygon's outer ring, the
    properties the filter and the order read, and the chosen assets' absolute hrefs."""

    id: str
    bbox: Bounds
    ring: tuple[tuple[float, float], ...] | None
    properties: dict = field(compare=False)
    hrefs: tuple[str, ...]


def _strings(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SettingsError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


def _query(value: object, where: str) -> tuple[tuple[str, str, Any], ...]:
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: expected {{property: {{operator: value}}}}, got {value!r}")
    found = []
    for name, tests in value.items():
        if not isinstance(tests, dict) or not tests:
            raise SettingsError(f"{where}.{name}: expected {{operator: value}} "
                                f"({', '.join(OPERATORS)}), got {tests!r}")
        for op, expected in tests.items():
            if op not in OPERATORS:
                raise SettingsError(f"{where}.{name}.{op}: unknown operator (known: "
                                    f"{', '.join(OPERATORS)})")
            if op == "in" and not isinstance(expected, list):
                raise SettingsError(f"{where}.{name}.in: expected a list, got {expected!r}")
            found.append((str(name), str(op), expected))
    return tuple(found)


def _instant(text: str) -> datetime | None:
    if text in ("", ".."):
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 date or time") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def _interval(text: str) -> tuple[datetime | None, datetime | None]:
    """``start/end`` (either ``..``), or one instant: its own interval (a date: that day)."""
    if "/" in text:
        start, _, end = text.partition("/")
        return _instant(start), _instant(end)
    moment = _instant(text)
    if moment is not None and len(text) == 10:  # a date: the whole day
        return moment, moment + timedelta(days=1) - timedelta(microseconds=1)
    return moment, moment


# -- choosing items -------------------------------------------------------------------------

def _matches(properties: dict, name: str, op: str, expected: Any) -> bool:
    value = properties.get(name)
    if value is None:
        return False
    try:
        if op == "eq":
            return bool(value == expected)
        if op == "neq":
            return bool(value != expected)
        if op == "in":
            return value in expected
        return bool({"lt": value < expected, "lte": value <= expected,
                     "gt": value > expected, "gte": value >= expected}[op])
    except TypeError:
        return False  # a property of another type than the filter's: not a match


def _in_time(properties: dict, interval: tuple[datetime | None, datetime | None]) -> bool:
    start, end = interval
    try:
        moment = properties.get("datetime")
        first = _instant(properties.get("start_datetime") or moment or "")
        last = _instant(properties.get("end_datetime") or moment or "")
    except (ValueError, TypeError, AttributeError):
        return False
    if first is None or last is None:
        return False
    return (end is None or first <= end) and (start is None or last >= start)


def chosen(stac: Stac, item: Item, collection: str | None) -> bool:
    """Whether ``item`` passes the source's collections, datetime and property filter (what a
    STAC API's search applies on its side)."""
    if stac.collections and collection not in stac.collections:
        return False
    if stac.datetime and not _in_time(item.properties, _interval(stac.datetime)):
        return False
    return all(_matches(item.properties, name, op, value) for name, op, value in stac.query)


def ordered(stac: Stac, items: Sequence[Item]) -> list[Item]:
    """``items`` in the source's ``sortby`` order (stable; an item without a property comes
    after those with it), the first ``max_items``."""
    result = list(items)
    for key in reversed(stac.sortby):
        name, descending = key.lstrip("-+"), key.startswith("-")
        present = [i for i in result if _sortable(i.properties.get(name))]
        absent = [i for i in result if not _sortable(i.properties.get(name))]
        present.sort(key=lambda i: i.properties[name], reverse=descending)
        result = present + absent
    return result[:stac.max_items]


def _sortable(value: object) -> bool:
    return isinstance(value, int | float | str) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def intersects(item: Item, bounds: Bounds) -> bool:
    """Whether ``item``'s footprint meets the longitude/latitude rectangle ``bounds``: its
    bbox, then its polygon (a corner of either inside the other, or two edges crossing)."""
    w, s, e, n = bounds
    iw, is_, ie, in_ = item.bbox
    if iw > e or ie < w or is_ > n or in_ < s:
        return False
    ring = item.ring
    if not ring or len(ring) < 3:
        return True
    if any(w <= x <= e and s <= y <= n for x, y in ring):
        return True
    corners = ((w, s), (e, s), (e, n), (w, n))
    if any(_inside(ring, x, y) for x, y in corners):
        return True
    edges = list(zip(corners, corners[1:] + corners[:1], strict=True))
    return any(_cross(a, b, c, d) for a, b in zip(ring, ring[1:] + ring[:1], strict=True)
               for c, d in edges)


def _inside(ring: Sequence[tuple[float, float]], x: float, y: float) -> bool:
    """Even-odd rule: a ray to the east crosses the ring an odd number of times."""
    inside = False
    for (x1, y1), (x2, y2) in zip(ring, list(ring[1:]) + [ring[0]], strict=True):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _cross(a, b, c, d) -> bool:
    def turn(p, q, r) -> float:
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    return (turn(a, b, c) * turn(a, b, d) < 0) and (turn(c, d, a) * turn(c, d, b) < 0)


# -- reading documents ----------------------------------------------------------------------

def item_from(document: dict, base: str, assets: Sequence[str],
              alternate: str | None = None) -> Item | None:
    """The item a STAC Item document describes (relative hrefs resolved against ``base``, its
    own URL), or None when it lacks a bbox, or one of ``assets``. ``alternate``: an asset's
    alternate of this name is read instead of its href, when it has one."""
    if not isinstance(document, dict) or document.get("type") != "Feature":
        return None
    bbox = document.get("bbox")
    if not isinstance(bbox, list) or len(bbox) not in (4, 6) or not all(
            isinstance(v, int | float) for v in bbox):
        return None
    w, s, e, n = (bbox[0], bbox[1], bbox[2], bbox[3]) if len(bbox) == 4 else (
        bbox[0], bbox[1], bbox[3], bbox[4])
    found = document.get("assets") or {}
    hrefs = []
    for key in assets:
        asset = found.get(key) if isinstance(found, dict) else None
        href = asset.get("href") if isinstance(asset, dict) else None
        if alternate and isinstance(asset, dict):
            others = asset.get("alternate")
            other = others.get(alternate) if isinstance(others, dict) else None
            if isinstance(other, dict) and isinstance(other.get("href"), str):
                href = other["href"]
        if not isinstance(href, str):
            return None
        hrefs.append(urljoin(base, href))
    ring = None
    geometry = document.get("geometry")
    if isinstance(geometry, dict) and geometry.get("type") == "Polygon":
        try:
            ring = tuple((float(p[0]), float(p[1])) for p in geometry["coordinates"][0])
        except (TypeError, ValueError, IndexError, KeyError):
            ring = None
    properties = document.get("properties") if isinstance(document.get("properties"), dict) else {}
    return Item(str(document.get("id", "")), (float(w), float(s), float(e), float(n)), ring,
                dict(properties or {}, collection=document.get("collection")), tuple(hrefs))


def _links(document: dict, rels: Sequence[str]) -> list[dict]:
    return [link for link in document.get("links") or [] if isinstance(link, dict)
            and link.get("rel") in rels and isinstance(link.get("href"), str)]


def catalog_items(stac: Stac, fetch: Fetch) -> list[Item]:
    """Every item of a static catalog with the source's assets, its children followed
    (breadth first, each document once).

    Raises:
        ValueError: a catalog of more than :data:`MAX_DOCUMENTS` documents.
    """
    assert stac.catalog is not None
    queue, seen, items = [stac.catalog], {stac.catalog}, []
    while queue:
        url = queue.pop(0)
        document = fetch(url, None)
        if not isinstance(document, dict):
            continue
        if document.get("type") == "Feature":
            item = item_from(document, url, stac.assets, stac.alternate)
            if item is not None:
                items.append(item)
            continue
        for link in _links(document, ("child", "item")):
            target = urljoin(url, link["href"])
            if target not in seen:
                if len(seen) >= MAX_DOCUMENTS:
                    raise ValueError(f"{stac.catalog}: more than {MAX_DOCUMENTS} documents; "
                                     "a catalog this large wants a STAC API (imagery.stac.api)")
                seen.add(target)
                queue.append(target)
    return items


# A static catalog's items with the assets (and their alternate) asked, read once a process (a
# warm worker reads no catalog again).
_CATALOGS: dict[tuple[str, tuple[str, ...], str | None], list[Item]] = {}
_CATALOG_LOCK = threading.Lock()


# A STAC API is asked once for a tile's ancestor SEARCH_LEVELS zooms up (64 tiles), for up to
# SEARCH_MOST items; the tiles under it are answered from that search while it holds every item
# there (fewer than SEARCH_MOST came back), else each asks for its own. Tiles pushed in
# `cnsq tiles`' order arrive as neighbours: a call's ten tiles mostly share an ancestor.
SEARCH_LEVELS = 3
SEARCH_MOST = 100
SEARCHES_KEPT = 512
_SEARCHES: OrderedDict[tuple[str, int, int, int], tuple[list[Item], bool]] = OrderedDict()
_SEARCH_LOCK = threading.Lock()


def items_for(stac: Stac, x: int, y: int, z: int, fetch: Fetch,
              ancestor_most: int = SEARCH_MOST) -> list[Item]:
    """The items whose footprint meets tile ``x``-``y``-``z``, chosen and ordered as the source
    says, at most ``max_items``. ``ancestor_most``: the items one search for the tile's
    ancestor may bring (:data:`SEARCH_MOST`)."""
    bounds = lonlat_bounds(x, y, z)
    if stac.catalog:
        key = (stac.catalog, stac.assets, stac.alternate)
        with _CATALOG_LOCK:
            every = _CATALOGS.get(key)
            if every is None:
                every = _CATALOGS[key] = catalog_items(stac, fetch)
        return ordered(stac, [i for i in every if intersects(i, bounds)
                              and chosen(stac, i, i.properties.get("collection"))])
    level = max(0, z - SEARCH_LEVELS)
    ax, ay = x >> (z - level), y >> (z - level)
    block = (json.dumps(stac.as_values(), sort_keys=True), ax, ay, level)
    with _SEARCH_LOCK:
        found = _SEARCHES.get(block)
        if found is not None:
            _SEARCHES.move_to_end(block)
    if found is None:
        items = search(stac, lonlat_bounds(ax, ay, level), fetch, ancestor_most)
        found = (items, len(items) < ancestor_most)
        with _SEARCH_LOCK:
            _SEARCHES[block] = found
            while len(_SEARCHES) > SEARCHES_KEPT:
                _SEARCHES.popitem(last=False)
    items, whole = found
    if not whole:  # the ancestor holds more items than one search brought: the tile's own
        return ordered(stac, search(stac, bounds, fetch))
    return ordered(stac, [i for i in items if intersects(i, bounds)])


def search(stac: Stac, bounds: Bounds, fetch: Fetch, most: int | None = None) -> list[Item]:
    """A STAC API's items over ``bounds`` (``POST /search``, its ``next`` links followed up to
    ``most`` items, by default ``max_items``), filtered again here (an API without the query
    extension ignores it)."""
    assert stac.api is not None
    most = stac.max_items if most is None else most
    body: dict = {"bbox": list(bounds), "limit": min(most, PAGE_LIMIT)}
    if stac.collections:
        body["collections"] = list(stac.collections)
    if stac.datetime:
        body["datetime"] = stac.datetime
    if stac.query:
        body["query"] = stac.as_values()["query"]
    if stac.sortby:
        body["sortby"] = [{"field": f"properties.{k.lstrip('-+')}",
                           "direction": "desc" if k.startswith("-") else "asc"}
                          for k in stac.sortby]
    url = f"{stac.api}/search"
    payload: dict | None = body
    found: list[Item] = []
    for _ in range(most):  # pages: each holds at least one item, or the search ends
        page = fetch(url, payload)
        features = page.get("features") if isinstance(page, dict) else None
        if not isinstance(features, list):
            raise ValueError(f"{stac.api}/search answered no feature collection")
        for feature in features:
            item = item_from(feature, url, stac.assets, stac.alternate)
            if item is not None and intersects(item, bounds) and chosen(
                    stac, item, item.properties.get("collection")):
                found.append(item)
        following = next(iter(_links(page, ("next",))), None)
        if following is None or not features or len(found) >= most:
            break
        url = urljoin(url, following["href"])
        payload = following.get("body") if following.get("method", "GET").upper() == "POST" \
            else None
        if payload is not None and following.get("merge"):
            payload = {**body, **payload}
    return found[:most]


def json_document(text: bytes | str, url: str) -> Any:
    """A fetched document as JSON; raises ValueError naming the URL."""
    try:
        return json.loads(text)
    except ValueError:
        raise ValueError(f"{url}: not JSON") from None


def fetcher(http: Any, timeout: float, deadline: float | None = None) -> Fetch:
    """A :data:`Fetch` over the worker's :class:`~.http.Http`: each document within
    ``timeout`` and the call's ``deadline``, at most :data:`MAX_DOCUMENT_BYTES`.

    The fetch raises ValueError for an answer other than 200 or a body that is not JSON
    (naming the URL), and the Http's own errors for no answer."""

    def fetch(url: str, payload: dict | None) -> Any:
        if payload is None:
            response = http.get(url, read_timeout=timeout, deadline=deadline,
                                max_bytes=MAX_DOCUMENT_BYTES)
        else:
            response = http.post_json(url, payload, read_timeout=timeout, deadline=deadline,
                                      max_bytes=MAX_DOCUMENT_BYTES)
        if response.status_code != 200:
            raise ValueError(f"{url}: HTTP {response.status_code}")
        return json_document(response.content, url)

    return fetch
