"""The Lambda's HTTP client against real servers on 127.0.0.1: what it must do that a library
used to do for it — reuse and replace keep-alive connections, follow redirects, read chunked and
compressed bodies, tunnel HTTPS through a proxy, and say what failed and where."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from servers import ForwardProxy, Redirector, TileServer, _Quiet, _Server, self_signed_tls, tile_image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lambda"))

from download_and_predict.transport import (  # noqa: E402
    Base64Text,
    Transport,
    TransportError,
    TransportTimeout,
    encode_json,
    proxies_from_env,
)


class OneShotServer:
    """Answers one request per connection, kept alive by its headers, then closes the socket
    while the client holds it idle — what a CDN does to idle keep-alive connections."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with client:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += client.recv(65536)
                body = f"answer {self.connections}".encode()
                client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.listener.close()


class Encoded(_Server):
    """GET /chunked answers in chunks; /gzip and /deflate compressed; POST /form answers 303 to
    /done; /loop redirects to itself; /slow sleeps 2 s."""

    def __init__(self):
        self.methods: list[str] = []
        super().__init__(self._Handler)

    class _Handler(_Quiet):
        def do_GET(self) -> None:
            self.server.owner.methods.append(f"GET {self.path}")
            payload = tile_image(1, 2, 3) * 100
            if self.path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(payload), 1000):
                    piece = payload[start:start + 1000]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            elif self.path in ("/gzip", "/deflate"):
                data = gzip.compress(payload) if self.path == "/gzip" else zlib.compress(payload)
                self.send_response(200)
                self.send_header("Content-Encoding", self.path[1:])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/slow":
                time.sleep(2)
                try:
                    self.send(200, b"late")
                except OSError:  # the client gave up waiting, as it should
                    pass
            else:
                self.send(200, b"done")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.server.owner.methods.append(f"POST {self.path}")
            self.send_response(303)
            self.send_header("Location", "/done")
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture
def encoded():
    server = Encoded()
    yield server
    server.close()


def test_a_connection_the_server_closed_while_idle_is_replaced(tmp_path):
    server = OneShotServer()
    http = Transport(4)
    try:
        answers = [http.get(f"http://127.0.0.1:{server.port}/{i}").data for i in range(3)]
    finally:
        server.close()
    assert answers == [b"answer 1", b"answer 2", b"answer 3"]
    assert server.connections == 3


def test_a_kept_alive_connection_is_reused():
    tiles = TileServer()
    connections = []
    original = tiles.httpd.process_request

    def counting(request, address):
        connections.append(address)
        return original(request, address)

    tiles.httpd.process_request = counting
    http = Transport(4)
    try:
        for x in range(5):
            assert http.get(f"{tiles.url}/3/{x}/2.jpg").data == tile_image(x, 2, 3)
    finally:
        tiles.close()
    assert len(connections) == 1


def test_chunked_and_compressed_bodies_are_read_whole(encoded):
    http = Transport(4)
    expected = tile_image(1, 2, 3) * 100
    for path in ("/chunked", "/gzip", "/deflate"):
        answer = http.get(encoded.url + path)
        assert (answer.status, answer.data) == (200, expected), path


def test_a_post_answered_303_is_followed_with_a_get(encoded):
    answer = Transport(4).post_json(encoded.url + "/form", {"instances": [1]})
    assert (answer.status, answer.data) == (200, b"done")
    assert encoded.methods == ["POST /form", "GET /done"]


def test_a_redirect_loop_is_an_error_that_says_so(encoded):
    with pytest.raises(TransportError, match=r"too many redirects \(more than 5\)"):
        Transport(4).get(encoded.url + "/loop")
    assert encoded.methods.count("GET /loop") == 6


def test_a_redirect_to_another_host_is_followed():
    tiles = TileServer()
    moved = Redirector(tiles.url, status=301)
    try:
        assert Transport(4).get(moved.url + "/3/1/2.jpg").data == tile_image(1, 2, 3)
    finally:
        moved.close()
        tiles.close()


def test_a_read_timeout_names_the_host_and_the_limit(encoded):
    port = encoded.httpd.server_address[1]
    with pytest.raises(TransportTimeout, match=rf"no answer from 127.0.0.1:{port} within 0.3 s"):
        Transport(4).get(encoded.url + "/slow", read_timeout=0.3)


@pytest.mark.parametrize("url, reason", [
    ("ftp://127.0.0.1/1/2/3.png", "the scheme must be http or https"),
    ("http:///1/2/3.png", "no host"),
    ("http://127.0.0.1:99999/1/2/3.png", "Port out of range"),
])
def test_a_malformed_url_is_an_error_that_quotes_it(url, reason):
    with pytest.raises(TransportError, match=f"bad URL '{url}': .*{reason}"):
        Transport(4).get(url)


def test_https_goes_through_a_proxy_in_a_connect_tunnel_with_its_credentials(tmp_path):
    context, cert = self_signed_tls(tmp_path, names=("tiles.test",))
    secure = TileServer(tls=context)
    proxy = ForwardProxy(hosts={"tiles.test": "127.0.0.1"})
    port = secure.httpd.server_address[1]
    user_proxy = proxy.url.replace("http://", "http://ana:s%40cret@")
    http = Transport(4, proxies_from_env({"HTTPS_PROXY": user_proxy}), str(cert))
    try:
        for x in range(3):  # one tunnel, kept alive for all three
            assert http.get(f"https://tiles.test:{port}/3/{x}/2.jpg").data == tile_image(x, 2, 3)
    finally:
        proxy.close()
        secure.close()
    assert proxy.seen == [f"CONNECT tiles.test:{port}"]
    assert proxy.authorizations == ["Basic YW5hOnNAY3JldA=="]  # ana:s@cret


def test_plain_http_through_a_proxy_carries_its_credentials():
    tiles = TileServer()
    proxy = ForwardProxy(hosts={"tiles.test": "127.0.0.1"})
    port = tiles.httpd.server_address[1]
    http = Transport(4, proxies_from_env({"http_proxy": proxy.url.replace("//", "//ana:pw@")}))
    try:
        assert http.get(f"http://tiles.test:{port}/3/1/2.jpg").data == tile_image(1, 2, 3)
    finally:
        proxy.close()
        tiles.close()
    assert proxy.seen == [f"http://tiles.test:{port}/3/1/2.jpg"]
    assert proxy.authorizations == ["Basic YW5hOnB3"]


def test_a_proxy_refusing_the_tunnel_is_a_proxy_error(tmp_path):
    proxy = ForwardProxy()  # cannot resolve tiles.test: answers 502 to the CONNECT
    http = Transport(4, proxies_from_env({"HTTPS_PROXY": proxy.url}))
    try:
        with pytest.raises(TransportError, match=r"proxy error: .* refused to tunnel to "
                                                 r"tiles.test:8443: .*502"):
            http.get("https://tiles.test:8443/3/1/2.jpg")
    finally:
        proxy.close()


def test_an_untrusted_certificate_is_refused_with_the_reason(tmp_path):
    context, _ = self_signed_tls(tmp_path)
    secure = TileServer(tls=context)
    try:
        with pytest.raises(TransportError, match=r"TLS with 127.0.0.1:\d+ failed: .*certificate"):
            Transport(4).get(secure.url + "/3/1/2.jpg")
    finally:
        secure.close()


def test_the_image_payload_is_encoded_exactly_as_json_dumps_would():
    from download_and_predict.base import DownloadAndPredict, Settings

    app = DownloadAndPredict(Settings("http://t/{z}/{x}/{y}", "http://m", "sqlite:///r.db"))
    images = [tile_image(x, 2, 3) * 50 for x in range(7)] + [b"", bytes(range(256))]
    payload = app.build_payload(images)
    assert encode_json(payload) == json.dumps(payload).encode()
    assert json.loads(encode_json(payload)) == {"instances": [
        {"image_bytes": {"b64": base64.b64encode(image).decode()}} for image in images]}


@pytest.mark.parametrize("payload", [
    {"instances": [[1.5, 2], [3, 4]]},
    {"instances": [{"image_bytes": {"b64": 'plain "text" \\ \n not marked'}}]},
    {"instances": [{"image_bytes": {"b64": Base64Text.of(b"x")}, "key": "k1"}]},
    {"instances": [], "signature_name": "serving_default"},
    {"inputs": {"image_bytes": {"b64": Base64Text.of(b"x")}}},
])
def test_any_other_payload_is_plain_json(payload):
    assert encode_json(payload) == json.dumps(payload).encode()
