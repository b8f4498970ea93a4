"""``cnsq tileserver``: XYZ tiles over HTTP from a folder tree or an MBTiles file.

``GET /{z}/{x}/{y}.{png|jpg|jpeg|webp}`` answers the tile or 404. A folder holds ``z/x/y.ext``
(any of those extensions); an MBTiles file stores rows in the TMS scheme, flipped here.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cnsq.errors import CnsqError
from download_and_predict.tiles import raster_type

EXTENSIONS = ("png", "jpg", "jpeg", "webp")
PATH = re.compile(r"^/(\d+)/(\d+)/(\d+)\.(png|jpg|jpeg|webp)(?:\?.*)?$")


def content_type(data: bytes) -> str:
    """The media type a browser is told: a raster image's, decided from its bytes."""
    return raster_type(data) or "application/octet-stream"


class FolderTiles:
    def __init__(self, root: Path):
        self.root = str(root)

    def get(self, z: int, x: int, y: int, ext: str) -> bytes | None:
        for candidate in (ext, *EXTENSIONS):
            try:  # open straight away: one failed open costs less than a stat then an open
                with open(os.path.join(self.root, str(z), str(x), f"{y}.{candidate}"), "rb") as f:
                    return f.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                continue
        return None


class MBTiles:
    def __init__(self, path: Path):
        self.path = path
        self.local = threading.local()
        try:
            self._conn().execute("SELECT 1 FROM tiles LIMIT 1")
        except sqlite3.Error as exc:
            raise CnsqError(f"{path}: not an MBTiles file ({exc})") from None

    def _conn(self) -> sqlite3.Connection:
        if not hasattr(self.local, "conn"):
            self.local.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        return self.local.conn

    def get(self, z: int, x: int, y: int, ext: str) -> bytes | None:
        row = self._conn().execute(
            "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
            (z, x, 2**z - 1 - y)).fetchone()
        return row[0] if row else None


def open_source(source: Path) -> FolderTiles | MBTiles:
    if source.is_dir():
        return FolderTiles(source)
    if source.is_file():
        return MBTiles(source)
    raise CnsqError(f"{source}: no such folder or MBTiles file")


@dataclass
class TileServer:
    httpd: ThreadingHTTPServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def template(self) -> str:
        return self.url + "/{z}/{x}/{y}.png"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) resets connections when dozens of clients connect at once.
    request_queue_size = 256
    daemon_threads = True


def start(source: Path, port: int = 8000, host: str = "127.0.0.1") -> TileServer:
    tiles = open_source(Path(source))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            match = PATH.match(self.path)
            data = None
            if match:
                z, x, y = (int(v) for v in match.groups()[:3])
                data = tiles.get(z, x, y, match.group(4))
            if data is None:
                status, kind, data = "404 Not Found", "text/plain", b"no such tile"
            else:
                status, kind = "200 OK", content_type(data)
            # One write for the status line, headers and body: the tile server answers as many
            # requests as the pipeline downloads tiles, and every syscall and header it formats
            # is CPU taken from the model server on one machine.
            head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\n"
            if self.close_connection:  # HTTP/1.0 or "Connection: close" from the client
                head += "Connection: close\r\n"
            self.wfile.write((head + "\r\n").encode("latin-1") + data)

    httpd = _Server((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return TileServer(httpd)


RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def serve_file(path: Path, port: int = 0, host: str = "127.0.0.1") -> TileServer:
    """``GET /{name}`` of one file, honouring ``Range: bytes=a-b`` with 206 as S3 and CDNs do:
    a COG read by range requests, as the worker reads one on AWS (``cnsq demo --imagery cog``).
    Its URL is ``{server.url}/{path.name}``."""
    name, size = path.name, path.stat().st_size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _answer(self, body: bool) -> None:
            if self.path.split("?", 1)[0].lstrip("/") != name:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end, status = 0, size - 1, 200
            wanted = RANGE.match(self.headers.get("Range", ""))
            if wanted:
                first, last = wanted.groups()
                if first:
                    start, end = int(first), min(int(last) if last else size - 1, size - 1)
                else:  # the last N bytes
                    start = max(0, size - int(last or 0))
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "image/tiff")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                with path.open("rb") as handle:
                    handle.seek(start)
                    self.wfile.write(handle.read(end - start + 1))

        def do_GET(self) -> None:
            self._answer(True)

        def do_HEAD(self) -> None:
            self._answer(False)

    httpd = _Server((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return TileServer(httpd)
