"""Real servers on 127.0.0.1 for tests: an XYZ tile server, a TF Serving-style model server, and
a TCP proxy that can refuse or drop database connections."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def tile_image(x: int, y: int, z: int) -> bytes:
    """Deterministic 'image' bytes for a tile (a JPEG's first bytes, as the handler checks)."""
    return b"\xff\xd8\xff" + f"image-{z}-{x}-{y}".encode() * 3


def score(image: bytes) -> list[float]:
    """What the test model predicts for an image: two class scores derived from its bytes."""
    p = int(hashlib.sha256(image).hexdigest()[:4], 16) / 65535
    return [round(1 - p, 6), round(p, 6)]


class _Server:
    def __init__(self, handler_class, tls=None):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.scheme = "http"
        if tls is not None:  # an ssl.SSLContext: the handshake happens at accept
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def self_signed_tls(directory: Path, names: tuple[str, ...] = ()):
    """A certificate for 127.0.0.1 (and DNS ``names``) made by the openssl command, and a server
    context using it.

    Returns (server ssl.SSLContext, path of the certificate a client must trust).
    """
    import ssl

    cert, key = directory / "cert.pem", directory / "key.pem"
    alt = ",".join(["IP:127.0.0.1", *(f"DNS:{name}" for name in names)])
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", f"subjectAltName={alt}"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle holds the body until the
    # client's delayed ACK (~40 ms) on a kept-alive connection. Real servers set it too.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TileServer(_Server):
    """GET /{z}/{x}/{y}.jpg → tile_image(); per-tile faults: missing (404), fail N times with
    500, or slow (sleeps). ``delay`` applies to every request."""

    def __init__(self, delay: float = 0.0, content: dict[str, bytes] | None = None, tls=None,
                 only_content: bool = False, close_connections: bool = False):
        # Connection: close on every answer (as Python's http.server and HTTP/1.0 servers do):
        # http.client hands the socket to the response and forgets it on the connection.
        self.close_connections = close_connections
        self.chunked: set[str] = set()  # x-y-z answered with Transfer-Encoding: chunked
        self.content = content or {}  # real images by x-y-z, instead of tile_image()
        self.only_content = only_content  # 404 for a tile not in content
        self.missing: set[str] = set()
        self.failures: Counter[str] = Counter()
        self.slow: dict[str, float] = {}
        self.trickle: dict[str, float] = {}  # x-y-z → seconds between the body's bytes
        self.trickle_headers: dict[str, float] = {}  # x-y-z → seconds between the headers' bytes
        self.delay = delay
        self.requests: Counter[str] = Counter()
        self.tokens: list[str] = []
        self.in_flight = 0  # requests being answered now, and the most at once
        self.most_in_flight = 0
        self._count = threading.Lock()
        super().__init__(self._Handler, tls)

    class _Handler(_Quiet):
        def do_GET(self) -> None:
            server: TileServer = self.server.owner
            match = re.match(r"^/(\d+)/(\d+)/(\d+)\.\w+(?:\?access_token=(.*))?$", self.path)
            if not match:
                return self.send(400, b"bad path")
            z, x, y = (int(v) for v in match.groups()[:3])
            key = f"{x}-{y}-{z}"
            server.requests[key] += 1
            if match.group(4) is not None:
                server.tokens.append(match.group(4))
            if server.delay:
                with server._count:
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                time.sleep(server.delay)
                with server._count:
                    server.in_flight -= 1
            if key in server.slow:
                time.sleep(server.slow[key])
            if key in server.missing or (server.only_content and key not in server.content):
                return self.send(404, b"no tile")
            if server.failures[key] > 0:
                server.failures[key] -= 1
                return self.send(500, b"busy")
            body = server.content.get(key) or tile_image(x, y, z)
            if key in server.trickle_headers:  # the status line and headers a byte at a time
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: {'x' * 200}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                try:
                    for byte in head:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(server.trickle_headers[key])
                    self.wfile.write(body)
                except OSError:
                    pass
                self.close_connection = True
                return None
            if key in server.trickle:  # one byte at a time: each read is quick, the whole is not
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                if server.close_connections:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                try:
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(server.trickle[key])
                except OSError:
                    pass
                return None
            if key in server.chunked:  # no Content-Length: the size is known only once read
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for start in range(0, len(body), 65536):
                        part = body[start:start + 65536]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                return None
            if server.close_connections:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True
                return None
            self.send(200, body, "image/jpeg")


class ModelServer(_Server):
    """POST /v1/models/m:predict with TF Serving's base64 instances → {"predictions": [...]}.

    ``mode``: ok, error (500), wrong_count (one prediction too few), fail_times (500 that many
    times, then ok), nan_first / inf_first / nul_first / surrogate_first (the first prediction
    holds NaN, Infinity, a NUL character or half an emoji), deep (an answer nested 100,000
    deep). Every request's instance count is recorded.
    """

    def __init__(self, mode: str = "ok", delay: float = 0.0, fail_times: int = 0):
        self.mode = mode
        self.delay = delay
        self.fail_times = fail_times
        self.batches: list[int] = []
        super().__init__(self._Handler)

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v1/models/m:predict"

    class _Handler(_Quiet):
        def do_GET(self) -> None:
            server: ModelServer = self.server.owner
            if server.mode == "error":
                return self.send(500, b'{"error": "model failure"}')
            status = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                                 "status": {"error_code": "OK"}}]}
            self.send(200, json.dumps(status).encode())

        def do_POST(self) -> None:
            server: ModelServer = self.server.owner
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            instances = body["instances"]
            server.batches.append(len(instances))
            if server.delay:
                time.sleep(server.delay)
            if server.mode == "error" or server.fail_times > 0:
                server.fail_times -= 1
                return self.send(500, b'{"error": "model failure"}')
            predictions = [score(base64.b64decode(i["image_bytes"]["b64"])) for i in instances]
            if server.mode == "wrong_count":
                predictions = predictions[:-1]
            if server.mode in ("nan_first", "inf_first", "nul_first", "surrogate_first") and predictions:
                predictions[0] = {"nan_first": [float("nan"), 1.0], "inf_first": [float("inf"), 0.0],
                                  "nul_first": {"label": "wa\u0000ter"},
                                  "surrogate_first": {"label": "wave \ud83c"}}[server.mode]
            if server.mode == "deep":  # nested 100,000 deep: no JSON parser of Python's recursion
                depth = 100_000
                return self.send(200, b'{"predictions": ' + b"[" * depth + b"]" * depth + b"}")
            self.send(200, json.dumps({"predictions": predictions}).encode())


class Redirector(_Server):
    """Answers every GET with ``status`` and ``Location: <target><path>``."""

    def __init__(self, target: str, status: int = 302):
        self.target = target
        self.status = status
        super().__init__(self._Handler)

    class _Handler(_Quiet):
        def do_GET(self) -> None:
            server: Redirector = self.server.owner
            self.send_response(server.status)
            self.send_header("Location", server.target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()


class ForwardProxy(_Server):
    """An HTTP forward proxy: takes absolute-form requests (``GET http://host/path``) and relays
    them, and ``CONNECT host:port`` tunnels for HTTPS. It records each target (``seen``: the URL,
    or ``CONNECT host:port``) and each request's Proxy-Authorization header. ``hosts`` maps
    names only the proxy knows (``tiles.test``) to the addresses it connects to, as a proxy's own
    DNS would."""

    def __init__(self, hosts: dict[str, str] | None = None):
        self.seen: list[str] = []
        self.authorizations: list[str | None] = []
        self.hosts = hosts or {}
        super().__init__(self._Handler)

    class _Handler(_Quiet):
        def relay(self) -> None:
            import http.client
            from urllib.parse import urlsplit

            server: ForwardProxy = self.server.owner
            server.seen.append(self.path)
            server.authorizations.append(self.headers.get("Proxy-Authorization"))
            target = urlsplit(self.path)
            if target.scheme != "http":
                return self.send(400, b"only absolute http:// URLs")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            address = server.hosts.get(target.hostname, target.hostname)
            upstream = http.client.HTTPConnection(address, target.port or 80, timeout=30)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("proxy-connection", "connection", "host",
                                            "proxy-authorization")}
            upstream.request(self.command, target.path + (f"?{target.query}" if target.query else ""),
                             body=body or None, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            upstream.close()
            self.send(answer.status, data, answer.getheader("Content-Type") or "application/octet-stream")

        do_GET = relay
        do_POST = relay

        def do_CONNECT(self) -> None:
            server: ForwardProxy = self.server.owner
            server.seen.append(f"CONNECT {self.path}")
            server.authorizations.append(self.headers.get("Proxy-Authorization"))
            host, _, port = self.path.rpartition(":")
            try:
                upstream = socket.create_connection((server.hosts.get(host, host), int(port)), 5)
            except OSError:
                return self.send(502, b"cannot reach " + self.path.encode())
            self.send_response(200, "Connection established")
            self.end_headers()
            self.wfile.flush()
            pumps = [threading.Thread(target=_pump, args=(self.connection, upstream), daemon=True),
                     threading.Thread(target=_pump, args=(upstream, self.connection), daemon=True)]
            for pump in pumps:
                pump.start()
            for pump in pumps:
                pump.join()
            upstream.close()
            self.close_connection = True


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes one way until either side closes."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for side in (sink, source):
        try:
            side.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; can refuse new connections and drop open ones."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.listener: socket.socket | None = None
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self.listener:
            self.listener.close()
            self.listener = None
        self.drop_all()

    def drop_all(self) -> None:
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def fresh_database(server_url: str, prefix: str = "t") -> str:
    """A new, empty database on the PostgreSQL server of ``server_url``; returns its URL."""
    import uuid

    import psycopg2

    admin = psycopg2.connect(server_url)
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise RuntimeError(f"{name} not found: install the PostgreSQL server binaries")


class PostgresCluster:
    """A throwaway PostgreSQL cluster on a free port (initdb refuses root: run as 'postgres')."""

    def __init__(self, base: Path, password: str | None = None):
        self.base = base
        self.data = base / "data"
        self.port = free_port()
        # With a password, every login is checked with scram-sha-256 (as RDS does); without one,
        # trust.
        self.password = password
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(base, "postgres")
            os.chmod(base, 0o755)
            for parent in base.parents:  # the postgres user must reach its folder
                if parent == Path("/"):
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o005)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        login = f"cnsq:{self.password}" if self.password else "cnsq"
        return f"postgresql://{login}@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresCluster:
        auth = ["-A", "trust"]
        if self.password:
            pwfile = self.base / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self.as_user:
                shutil.chown(pwfile, "postgres")
            auth = ["-A", "scram-sha-256", f"--pwfile={pwfile}"]
        subprocess.run(self.as_user + [_pg_bin("initdb"), "-D", str(self.data), "-U", "cnsq",
                                       *auth, "--no-sync"], check=True, capture_output=True)
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(self.as_user + [_pg_bin("pg_ctl"), "-D", str(self.data), "-l",
                                       str(self.base / "log"), "-w", "-o", options, "start"],
                       check=True, capture_output=True)
        return self

    def stop(self) -> None:
        subprocess.run(self.as_user + [_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate",
                                       "stop"], check=False, capture_output=True)


class SqsServer(_Server):
    """SQS's JSON protocol (what botocore speaks) for GetQueueAttributes and SendMessageBatch,
    with faults: throttle every Nth call, answer 500 every Mth, mark every Kth new entry Failed
    once, and a fixed latency per call. Queue URL: <url>/123456789012/<name>."""

    def __init__(self, queues=("tiles",), delay: float = 0.0, throttle_every: int = 0,
                 error_every: int = 0, fail_every: int = 0):
        self.queues = {name: [] for name in queues}
        self.delay = delay
        self.throttle_every = throttle_every
        self.error_every = error_every
        self.fail_every = fail_every
        self.calls = 0
        self.entries_seen = 0
        self.failed_once: set[str] = set()
        self.lock = threading.Lock()
        super().__init__(self._Handler)

    def queue_url(self, name: str = "tiles") -> str:
        return f"{self.url}/123456789012/{name}"

    def bodies(self, name: str = "tiles") -> list[str]:
        return list(self.queues[name])

    class _Handler(_Quiet):
        def error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-amz-json-1.0")
            self.send_header("x-amzn-query-error", f"{code};Sender")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            server: SqsServer = self.server.owner
            try:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            except ValueError:  # not SQS's JSON protocol (cnsq's first call asks STS who it is)
                return self.error(400, "InvalidAction", "this server speaks SQS's JSON only")
            action = self.headers.get("X-Amz-Target", "").split(".")[-1]
            if server.delay:
                time.sleep(server.delay)
            name = request.get("QueueUrl", "").rsplit("/", 1)[-1]
            with server.lock:
                server.calls += 1
                call = server.calls
            if name not in server.queues:
                return self.error(400, "QueueDoesNotExist", "The specified queue does not exist.")
            if action == "GetQueueAttributes":
                attrs = {"QueueArn": f"arn:aws:sqs:us-east-1:123456789012:{name}",
                         "ApproximateNumberOfMessages": str(len(server.queues[name]))}
                return self.send(200, json.dumps({"Attributes": attrs}).encode())
            if action != "SendMessageBatch":
                return self.error(400, "InvalidAction", action)
            if server.throttle_every and call % server.throttle_every == 0:
                return self.error(400, "RequestThrottled", "Rate exceeded")
            if server.error_every and call % server.error_every == 0:
                return self.error(500, "InternalError", "We encountered an internal error.")
            successful, failed = [], []
            with server.lock:
                for entry in request["Entries"]:
                    body = entry["MessageBody"]
                    server.entries_seen += 1
                    if (server.fail_every and server.entries_seen % server.fail_every == 0
                            and body not in server.failed_once):
                        server.failed_once.add(body)
                        failed.append({"Id": entry["Id"], "SenderFault": False,
                                       "Code": "InternalError", "Message": "try again"})
                        continue
                    server.queues[name].append(body)
                    successful.append({"Id": entry["Id"], "MessageId": str(server.entries_seen),
                                       "MD5OfMessageBody": hashlib.md5(body.encode()).hexdigest()})
            self.send(200, json.dumps({"Successful": successful, "Failed": failed}).encode())


class PricingServer(_Server):
    """The AWS Price List API's GetProducts (JSON 1.1), answering from ``products``: a list of
    (service code, attributes, USD price per unit). A product matches when every TERM_MATCH filter
    names one of its attributes with that value; each answer is the product as the API writes it
    (a JSON string with ``product.attributes`` and ``terms.OnDemand…pricePerUnit.USD``), with a
    free first tier as SQS and Lambda have. ``page`` products per page (NextToken)."""

    def __init__(self, products: list[tuple[str, dict[str, str], float]], page: int = 2,
                 hostile: str = ""):
        # hostile: "growing-token" (a NextToken twice as long on every page, without end),
        # "trickle" (a byte a second), "infinity" (every price "Infinity").
        self.products, self.page, self.calls, self.hostile = products, page, [], hostile
        super().__init__(self._Handler)

    class _Handler(_Quiet):
        def do_POST(self) -> None:
            server: PricingServer = self.server.owner
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            server.calls.append(request)
            wanted = {f["Field"]: f["Value"] for f in request.get("Filters", [])}
            found = [json.dumps({
                "product": {"productFamily": attrs.get("productFamily", ""), "attributes": attrs},
                "terms": {"OnDemand": {"SKU.TERM": {"priceDimensions": {
                    "SKU.TERM.FREE": {"beginRange": "0", "endRange": "1000000",
                                      "pricePerUnit": {"USD": "0.0000000000"}},
                    "SKU.TERM.PAID": {"beginRange": "1000000", "endRange": "Inf",
                                      "pricePerUnit": {"USD": f"{price:.10f}"}}}}}}})
                for code, attrs, price in server.products
                if code == request.get("ServiceCode") and all(
                    attrs.get(k) == v for k, v in wanted.items())]
            if server.hostile == "infinity":
                found = [text.replace('"0.0000000000"', '"Infinity"').replace(
                    '"USD": "0.', '"USD": "Infinity", "x": "0.') for text in found]
            if server.hostile == "growing-token":
                token = request.get("NextToken") or "t"
                body = {"FormatVersion": "aws_v1", "PriceList": [], "NextToken": token * 2}
                return self.send(200, json.dumps(body).encode(), "application/x-amz-json-1.1")
            start = int(request.get("NextToken") or 0)
            body = {"FormatVersion": "aws_v1", "PriceList": found[start:start + server.page]}
            if start + server.page < len(found):
                body["NextToken"] = str(start + server.page)
            data = json.dumps(body).encode()
            if server.hostile == "trickle":  # each read quick, the whole answer never
                self.send_response(200)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for byte in data:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(1)
                except OSError:
                    pass
                return None
            self.send(200, data, "application/x-amz-json-1.1")


def wait_for(check, timeout: float = 30.0, what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout}s")


class RangeServer(_Server):
    """GET and HEAD of files by name (``/name.tif``), honouring ``Range: bytes=a-b`` with 206 as
    S3 and CDNs do; every request is recorded (method, path, range) for counting reads.

    ``required``: headers a request must carry, else 403 with S3's AccessDenied (a requester-pays
    bucket's rule: a request without ``x-amz-request-payer: requester`` is refused; moto does
    not model it). Served path-style (``/bucket/key``), it stands in for S3's endpoint."""

    def __init__(self, files: dict[str, bytes], required: dict[str, str] | None = None):
        self.files = files
        self.required = {k.lower(): v for k, v in (required or {}).items()}
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        super().__init__(self._Handler)

    class _Handler(_Quiet):
        def _answer(self, head: bool) -> None:
            server: RangeServer = self.server.owner
            name = self.path.split("?", 1)[0].lstrip("/")
            wanted = self.headers.get("Range", "")
            with server._lock:
                server.requests.append((self.command, name, wanted))
            if any(self.headers.get(k) != v for k, v in server.required.items()):
                return self.send(403, b"<Error><Code>AccessDenied</Code><Message>Access Denied"
                                      b"</Message></Error>", "application/xml")
            body = server.files.get(name)
            if body is None:
                return self.send(404, b"no such file", "text/plain")
            status, start, end = 200, 0, len(body) - 1
            match = re.match(r"^bytes=(\d*)-(\d*)$", wanted)
            if match:
                first, last = match.groups()
                if first:
                    start, end = int(first), min(int(last) if last else len(body) - 1,
                                                 len(body) - 1)
                else:  # the last N bytes
                    start = max(0, len(body) - int(last))
                if start >= len(body):
                    return self.send(416, b"", "text/plain")
                status = 206
            part = body[start:end + 1]
            self.send_response(status)
            self.send_header("Content-Type", "image/tiff")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(part)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
            self.end_headers()
            if not head:
                self.wfile.write(part)

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)
