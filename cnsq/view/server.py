"""The local server behind ``cnsq view``: the page, its static files, a small JSON API over the
index, the GeoJSON download and the imagery proxy. It listens on 127.0.0.1 only.

Endpoints (all GET):

- ``/`` the page; ``/static/…`` its scripts, styles and the vendored Leaflet
- ``/api/summary`` totals, bounds, zooms, the histogram, the starting threshold
- ``/api/features?zoom=Z&west=…&south=…&east=…&north=…`` what the map shows there
  (see :func:`cnsq.view.index.features`)
- ``/api/count?thresh=T`` tiles scoring T or more
- ``/api/tile?id=x-y-z`` one tile's id and every score
- ``/api/geojson?thresh=T`` those tiles as GeoJSON, the same bytes as ``cnsq convert-geojson``
- ``/imagery/{z}/{x}/{y}`` the base layer, fetched here with the token
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, urlsplit

from cnsq.errors import CnsqError
from cnsq.results.geojson import write_features
from cnsq.view import index as view_index
from cnsq.view.imagery import ImageryError, LocalImagery, RemoteImagery
from download_and_predict.masking import mask
from download_and_predict.tiles import MAX_ZOOM

STATIC = resources.files("cnsq.view") / "static"
# The page runs its own scripts only and talks to this server only; Leaflet sets styles.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
               "frame-ancestors 'none'; form-action 'none'")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
IMAGERY_PATH = re.compile(r"^/imagery/(\d{1,2})/(\d+)/(\d+)(?:\.\w+)?$")
STATIC_PATH = re.compile(r"^/static/([\w.-]+(?:/[\w.-]+)*)$")


@dataclass
class Viewed:
    """What one ``cnsq view`` shows."""

    index: view_index.Index  # what the map shows, and what its GeoJSON download holds
    name: str  # what the page calls the results
    thresh: float
    imagery: RemoteImagery | LocalImagery | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def _number(query: dict, name: str) -> float:
    try:
        value = float(query[name][0])
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"{name} must be a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite")
    return value


def make_handler(viewed: Viewed) -> type[BaseHTTPRequestHandler]:
    index = viewed.index

    def conn(tiles: bool = True) -> contextlib.closing:
        """A connection for one request; ``tiles``: it reads the tiles table (which a large
        file's view may still be writing: the request waits for it)."""
        return contextlib.closing(index.connect(tiles))

    class Handler(BaseHTTPRequestHandler):
        server_version = "cnsq-view"

        def log_message(self, *args: Any) -> None:
            pass

        def send(self, status: int, body: bytes, kind: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")  # a body is what it says
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, data: Any, status: int = 200) -> None:
            # allow_nan=False: NaN or Infinity is not JSON, and the page could not read it.
            self.send(status, json.dumps(data, separators=(",", ":"), allow_nan=False).encode(),
                      "application/json",
                      {"Cache-Control": "no-store"})

        def host_allowed(self) -> bool:
            # A page from elsewhere that rebinds its name to 127.0.0.1 must not use this server
            # (it proxies imagery with the token): only our own host names are answered.
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            return host in ("127.0.0.1", "localhost", "[::1]")

        def from_elsewhere(self, path: str) -> bool:
            """A request another site's page made (an <img>, a fetch): it could make this server
            fetch imagery with the token. Browsers say where a request comes from
            (Sec-Fetch-Site, Origin); only a navigation to the page itself may come from
            elsewhere (a link)."""
            site = self.headers.get("Sec-Fetch-Site")
            if path in ("/", "/index.html") and self.headers.get("Sec-Fetch-Mode") == "navigate":
                return False
            if site in ("cross-site", "same-site"):
                return True
            origin = self.headers.get("Origin")
            host = self.headers.get("Host") or ""
            return origin is not None and origin != f"http://{host}"

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if not self.host_allowed():
                self.send(403, b"unknown host", "text/plain")
                return
            parts = urlsplit(self.path)
            if self.from_elsewhere(parts.path):
                self.send(403, b"requests from other sites are refused", "text/plain")
                return
            query = parse_qs(parts.query)
            try:
                self.route(parts.path, query)
            except ValueError as exc:
                self.send_json({"error": str(exc)}, 400)
            except CnsqError as exc:  # the index could not be finished
                self.send_json({"error": str(exc)}, 503)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def route(self, path: str, query: dict) -> None:
            if path in ("/", "/index.html"):
                self.static("index.html")
            elif match := STATIC_PATH.match(path):
                self.static(match.group(1))
            elif match := IMAGERY_PATH.match(path):
                self.imagery(*(int(v) for v in match.groups()))
            elif path == "/api/summary":
                self.send_json(summary(viewed))
            elif path == "/api/features":
                bbox = view_index.Bbox(*(_number(query, k) for k in ("west", "south", "east",
                                                                      "north")))
                zoom = int(_number(query, "zoom"))
                if not 0 <= zoom <= MAX_ZOOM:
                    raise ValueError(f"zoom must be between 0 and {MAX_ZOOM}")
                with conn(view_index.needs_tiles(index, zoom)) as c:
                    self.send_json(view_index.features(index, c, zoom, bbox))
            elif path == "/api/count":
                thresh = _number(query, "thresh")
                self.send_json({"thresh": thresh, "above": viewed.index.above(thresh),
                                "total": viewed.index.total})
            elif path == "/api/tile":
                with conn() as c:
                    found = view_index.tile_scores(c, (query.get("id") or [""])[0])
                if found is None:
                    self.send_json({"error": "no result for that tile"}, 404)
                else:
                    self.send_json(found)
            elif path == "/api/geojson":
                self.geojson(_number(query, "thresh"))
            else:
                self.send(404, b"not found", "text/plain")

        def static(self, name: str) -> None:
            target = STATIC.joinpath(*name.split("/"))
            if ".." in name.split("/") or not target.is_file():
                self.send(404, b"not found", "text/plain")
                return
            headers = {"Cache-Control": "no-cache"}
            if name == "index.html":
                headers["Content-Security-Policy"] = PAGE_POLICY
            self.send(200, target.read_bytes(), TYPES.get(Path(name).suffix, "application/octet-stream"),
                      headers)

        def imagery(self, z: int, x: int, y: int) -> None:
            if viewed.imagery is None or z > 30 or x >= 2**z or y >= 2**z:
                self.send(404, b"no imagery", "text/plain")
                return
            # Whatever comes back through the proxy runs nothing if opened as a page.
            guarded = {"Content-Security-Policy": "default-src 'none'"}
            try:
                image = viewed.imagery.get(z, x, y)
            except ImageryError as exc:
                self.send(502, str(exc).encode(), "text/plain", guarded)
                return
            if image is None:
                self.send(404, b"no such tile", "text/plain", guarded)
                return
            self.send(200, image.data, image.kind,
                      {"Cache-Control": "private, max-age=3600", **guarded})

        def geojson(self, thresh: float) -> None:
            # Streamed, without a length: HTTP/1.0 ends the body by closing the connection.
            self.send_response(200)
            self.send_header("Content-Type", "application/geo+json")
            self.send_header("Content-Disposition",
                             f'attachment; filename="cnsq-above-{thresh:g}.geojson"')
            self.end_headers()
            out = io.TextIOWrapper(cast(BinaryIO, self.wfile), encoding="utf-8", newline="",
                                   write_through=True)
            with conn() as c:
                write_features(view_index.features_above(c, thresh), out)
            out.flush()
            out.detach()

    return Handler


def summary(viewed: Viewed) -> dict:
    index = viewed.index
    bounds = index.bounds
    return {
        "name": viewed.name,
        "total": index.total,
        "above": index.above(viewed.thresh),
        "thresh": viewed.thresh,
        # -1 (the last) said as the index it is, as the tile's scores are numbered
        "threshInd": index.thresh_ind % index.classes if index.classes else index.thresh_ind,
        "classes": index.classes,
        "zooms": index.zooms,
        "detail": view_index.DETAIL,
        "bounds": [bounds.west, bounds.south, bounds.east, bounds.north] if bounds else None,
        "histogram": index.histogram(),
        "skipped": index.report.bad_count,
        "imagery": None if viewed.imagery is None else {
            "name": viewed.imagery.name, "local": isinstance(viewed.imagery, LocalImagery),
            "minZoom": viewed.imagery.zooms[0],
            "maxZoom": viewed.imagery.zooms[1]},
    }


@dataclass
class Running:
    httpd: ThreadingHTTPServer
    serving: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def serve(self, viewed: Viewed) -> None:
        """Answer requests about ``viewed`` from now on, in a background thread."""
        self.httpd.RequestHandlerClass = make_handler(viewed)
        self.serving = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.1,), daemon=True).start()

    def close(self) -> None:
        if self.serving:  # shutdown() waits for a serve_forever() that must have started
            self.httpd.shutdown()
        self.httpd.server_close()


def bind(port: int) -> Running:
    """Take 127.0.0.1:``port`` (0: a free port) before the results are read, so that a taken
    port fails at once rather than after minutes of reading; :meth:`Running.serve` starts it.

    Raises:
        CnsqError: the port is taken or cannot be bound.
    """
    try:
        httpd = _Server(("127.0.0.1", port), BaseHTTPRequestHandler)
    except OSError as exc:
        hint = " (pass another --port, or --port 0 for a free one)" if port else ""
        raise CnsqError(f"cannot listen on 127.0.0.1:{port}: {mask(exc.strerror or str(exc))}"
                        f"{hint}") from None
    return Running(httpd)


def start(viewed: Viewed, port: int) -> Running:
    """Bind and serve ``viewed`` at once (tests, the benchmark)."""
    running = bind(port)
    running.serve(viewed)
    return running
