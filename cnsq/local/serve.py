"""``cnsq serve``: TF Serving's REST API in front of an ONNX model, on the CPU.

``GET /v1/models/NAME`` answers the version status; ``POST /v1/models/NAME:predict`` takes
``{"instances": [{"image_bytes": {"b64": …}}, …]}`` (or plain numeric instances) and answers
``{"predictions": […]}``. Images are decoded (JPEG/PNG) and resized to the model's input.
Concurrent requests are merged into one inference call of up to ``max_batch`` instances, waiting
at most ``batch_timeout_ms`` for company: that is what keeps a CPU (or GPU) busy when many
Lambdas or workers each send a few tiles. ``batch_threads`` batches run at once (TF Serving's
``num_batch_threads``), each on ``cores // batch_threads`` ONNX Runtime threads.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from cnsq.errors import CnsqError, option

# The largest image an instance may be (a tile is 256 to 1024 pixels a side): a compressed
# image of a few hundred kilobytes can decode to gigabytes.
MAX_PIXELS = 4096 * 4096


# Not TF Serving's API: what `cnsq run --concurrency auto` reads to know how busy the model is.
STATS_PATH = "/cnsq/stats"


class BadInstance(ValueError):
    """An instance that cannot be turned into the model's input (HTTP 400)."""


class OnnxModel:
    """An ONNX Runtime session and how to feed it images."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        spec = self.session.get_inputs()[0]
        self.input_name = spec.name
        self.dtype = np.uint8 if spec.type == "tensor(uint8)" else np.float32
        shape = list(spec.shape)
        if len(shape) != 4:
            raise ValueError(f"{path}: expected an image input [N, H, W, C] or [N, C, H, W], "
                             f"got {shape}")
        self.channels_last = isinstance(shape[3], int) and shape[3] in (1, 3, 4)
        h, w = (shape[1], shape[2]) if self.channels_last else (shape[2], shape[3])
        self.channels = shape[3] if self.channels_last else shape[1]
        self.height = h if isinstance(h, int) else 256
        self.width = w if isinstance(w, int) else 256
        if not isinstance(self.channels, int):
            self.channels = 3

    @property
    def item_shape(self) -> tuple[int, ...]:
        if self.channels_last:
            return (self.height, self.width, self.channels)
        return (self.channels, self.height, self.width)

    def decode(self, instance: object, number: int) -> np.ndarray:
        """One instance → one input array of :attr:`item_shape`."""
        from PIL import Image, UnidentifiedImageError

        # The size is checked here, from the header, before anything is decoded (MAX_PIXELS);
        # Pillow's own guard would refuse the largest images without saying their size.
        Image.MAX_IMAGE_PIXELS = None
        if isinstance(instance, dict):
            holder = instance.get("image_bytes", instance)  # {"image_bytes": {"b64"}} or {"b64"}
            b64 = holder.get("b64") if isinstance(holder, dict) else None
            if not isinstance(b64, str):
                raise BadInstance(f"instance {number}: expected {{\"image_bytes\": {{\"b64\": …}}}}")
            try:
                raw = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise BadInstance(f"instance {number}: image_bytes.b64 is not base64") from None
            try:
                image: Image.Image = Image.open(io.BytesIO(raw))  # reads the header only
                width, height = image.size
                if width * height > MAX_PIXELS:  # a few hundred KB can claim gigabytes
                    raise BadInstance(f"instance {number}: {width}x{height} pixels is more than "
                                      f"the {MAX_PIXELS:,} an instance may have")
                image = image.convert("RGB" if self.channels == 3 else "L")
            except (UnidentifiedImageError, OSError):
                raise BadInstance(f"instance {number}: not a JPEG or PNG image") from None
            if image.size != (self.width, self.height):
                image = image.resize((self.width, self.height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=self.dtype)
            if array.ndim == 2:
                array = array[:, :, None]
            return array if self.channels_last else array.transpose(2, 0, 1)
        try:
            array = np.asarray(instance, dtype=self.dtype)
        except (TypeError, ValueError):
            raise BadInstance(f"instance {number}: not numbers") from None
        if array.shape != self.item_shape:
            raise BadInstance(f"instance {number}: shape {list(array.shape)} does not match the "
                              f"model's {list(self.item_shape)}")
        return array

    def predict(self, batch: np.ndarray) -> list:
        return self.session.run(None, {self.input_name: batch})[0].tolist()


_STOP = object()


class Batcher:
    """Merges concurrent requests into inference calls of up to ``max_batch`` instances.

    ``threads`` loops each form and run their own batch, so that many run at once (ONNX Runtime
    sessions may be run from several threads).
    """

    def __init__(self, model: OnnxModel, max_batch: int = 32, timeout_ms: float = 5.0,
                 threads: int = 1):
        self.model = model
        self.max_batch = max(1, max_batch)
        self.timeout = timeout_ms / 1000
        self.requests: queue.Queue = queue.Queue()
        self.calls = 0
        self.instances = 0
        self.running = 0
        self.peak = 0  # most batches that ran at once
        self.busy = 0.0  # seconds the batch threads spent running the model, summed
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True)
                        for _ in range(max(1, threads))]
        for thread in self.threads:
            thread.start()

    def submit(self, arrays: list[np.ndarray]) -> Future:
        future: Future = Future()
        self.requests.put((arrays, future, time.monotonic()))
        return future

    def _loop(self) -> None:
        held = None  # a request that did not fit the last batch: it opens the next one
        while True:
            first = held if held is not None else self.requests.get()
            held = None
            if first is _STOP:
                return
            group = [first]
            size = len(first[0])
            # From the first request's arrival, as TF Serving's batch_timeout_micros: requests
            # that queued while the last batch ran have waited already, and waiting the whole
            # timeout again left the model idle between batches.
            deadline = first[2] + self.timeout
            while size < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    item = self.requests.get(timeout=left) if left > 0 else self.requests.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP or size + len(item[0]) > self.max_batch:
                    held = item
                    break
                group.append(item)
                size += len(item[0])
            self._run(group)

    def _run(self, group: list) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        began = time.monotonic()
        try:
            batch = np.stack([a for arrays, _, _ in group for a in arrays])
            predictions = self.model.predict(batch)
        except Exception as exc:  # noqa: BLE001 - every request of the group gets the error
            for _, future, _ in group:
                future.set_exception(exc)
            return
        finally:
            with self.lock:
                self.running -= 1
                self.busy += time.monotonic() - began
        with self.lock:
            self.calls += 1
            self.instances += len(batch)
        start = 0
        for arrays, future, _ in group:
            future.set_result(predictions[start:start + len(arrays)])
            start += len(arrays)

    def warm_up(self, sample: np.ndarray, rounds: int = 2) -> None:
        """Run ``rounds`` full batches of ``sample`` (one instance) on every batch thread at once,
        then reset the counters.

        Why: a fresh ONNX Runtime session's first runs allocate its buffers (and, for each batch
        thread, its own); the requests that arrive first would wait for that. TF Serving warms
        a model up from recorded requests for the same reason.
        """
        for _ in range(max(0, rounds)):
            batches = [self.submit([sample] * self.max_batch) for _ in self.threads]
            for future in batches:
                future.result()
        with self.lock:
            self.calls = self.instances = self.peak = 0
            self.busy = 0.0

    def close(self, wait: float = 2.0) -> None:
        """Stop the batch threads, and wait (up to ``wait`` seconds) for a batch in progress:
        an interpreter that exits while a thread is inside the ONNX Runtime session can crash
        (a rare segfault on Ctrl-C in the demo)."""
        import time

        for _ in self.threads:
            self.requests.put(_STOP)
        deadline = time.monotonic() + wait
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


class _Addresses:
    """The URLs of a model server on 127.0.0.1 that has a ``port`` and a model ``name``."""

    port: int
    name: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v1/models/{self.name}:predict"


@dataclass
class Server(_Addresses):
    """A running model server (see :func:`start`)."""

    httpd: ThreadingHTTPServer
    batcher: Batcher
    name: str

    @property
    def port(self) -> int:  # type: ignore[override]  # read from the bound socket
        return self.httpd.server_address[1]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()


def _handler(model: OnnxModel, batcher: Batcher, name: str):
    status_path = f"/v1/models/{name}"
    predict_path = re.compile(rf"^/v1/models/{re.escape(name)}(/versions/\d+)?:predict$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # answer in one go on kept-alive connections

        def log_message(self, *args) -> None:
            pass

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == STATS_PATH:  # cnsq's own: how busy the model was (run's controller)
                with batcher.lock:
                    return self.reply(200, {"busy_seconds": round(batcher.busy, 6),
                                            "batch_threads": len(batcher.threads),
                                            "calls": batcher.calls, "instances": batcher.instances})
            if self.path.rstrip("/") in (status_path, f"{status_path}/versions/1"):
                return self.reply(200, {"model_version_status": [{
                    "version": "1", "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""}}]})
            self.reply(404, {"error": f"no model at {self.path} (this server has '{name}')"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if not predict_path.match(self.path):
                return self.reply(404, {"error": f"POST {status_path}:predict, not {self.path}"})
            try:
                request = json.loads(body)
                instances = request["instances"]
                if not isinstance(instances, list) or not instances:
                    raise BadInstance("'instances' must be a non-empty list")
                arrays = [model.decode(instance, i) for i, instance in enumerate(instances)]
            except (ValueError, KeyError, TypeError) as exc:
                message = str(exc) if isinstance(exc, BadInstance) else \
                    f"expected JSON {{\"instances\": […]}}: {exc}"
                return self.reply(400, {"error": message})
            try:
                predictions = batcher.submit(arrays).result(timeout=300)
            except Exception as exc:  # noqa: BLE001 - the model failed
                return self.reply(500, {"error": f"model failure: {exc}"})
            self.reply(200, {"predictions": predictions})

    return Handler


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) resets connections when dozens of clients connect at once.
    request_queue_size = 256
    daemon_threads = True


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# How soon a thread waiting for the GIL gets it (Python's default: 5 ms). The batch threads need
# it only briefly, between inference calls, but queue behind the request threads decoding JSON and
# images; sooner, they start the next batch sooner (docs/performance.md). Set for `cnsq serve`'s
# own process only.
SWITCH_INTERVAL = 0.001


def start(model_path: Path, port: int = 8501, name: str = "model", max_batch: int = 32,
          batch_timeout_ms: float = 5.0, host: str = "127.0.0.1", batch_threads: int = 1,
          switch_interval: float | None = None, warmup: bool = True) -> Server:
    """Load the model and serve it in a background thread.

    With one batch thread ONNX Runtime picks its own thread count (all cores); with more, each
    batch gets an equal share of the cores. ``switch_interval`` (seconds), when given, is set for
    the whole process (see :data:`SWITCH_INTERVAL`). With ``warmup``, every batch thread runs
    full batches of a blank image through the decoder and the model before the port opens (see
    :meth:`Batcher.warm_up`).
    """
    die_with_parent()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    threads = 0 if batch_threads <= 1 else max(1, cores() // batch_threads)
    model = OnnxModel(Path(model_path), threads)
    batcher = Batcher(model, max_batch, batch_timeout_ms, batch_threads)
    if warmup:
        _warm_up(model, batcher)
    httpd = _Server((host, port), _handler(model, batcher, name))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return Server(httpd, batcher, name)


def _warm_up(model: OnnxModel, batcher: Batcher) -> None:
    """Warm the decoder and every batch thread; a model that fails here would fail every batch.

    Raises:
        CnsqError: the model cannot run a full batch of its own input shape.
    """

    try:
        sample = model.decode(_blank_image(model), 0)
    except BadInstance:
        sample = None
    if sample is None or sample.shape != model.item_shape:
        # No image decodes to this model's input (2 channels, say): warm the model alone.
        sample = np.zeros(model.item_shape, model.dtype)
    try:
        batcher.warm_up(sample)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
        batcher.close()
        raise CnsqError(f"warming up the model failed on a batch of {batcher.max_batch} blank "
                        f"inputs of shape {list(model.item_shape)}: {' '.join(str(exc).split())[:300]} "
                        f"({option('no_warmup')} skips the warm-up)") from None


def _blank_image(model: OnnxModel) -> dict:
    """A grey PNG of the model's input size as a TF Serving instance: warms the decoder too."""
    from PIL import Image

    buffer = io.BytesIO()
    mode = "RGB" if model.channels == 3 else "L"
    Image.new(mode, (model.width, model.height), 128 if mode == "L" else (128,) * 3).save(buffer, "PNG")
    return {"image_bytes": {"b64": base64.b64encode(buffer.getvalue()).decode("ascii")}}


@dataclass
class Process(_Addresses):
    """``cnsq serve`` running as a process of its own (see :func:`spawn`)."""

    popen: subprocess.Popen
    port: int
    name: str

    def close(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


# Set by spawn() for the server it starts: the process id it must die with.
PARENT_ENV = "CNSQ_SERVE_PARENT"


def die_with_parent(environ: Mapping[str, str] = os.environ) -> None:
    """In a server spawn() started: ask Linux to send SIGTERM when the process that started it
    dies (even killed with SIGKILL), so that no orphan keeps the port.

    The server asks for itself once it runs, not in a function run between fork and exec
    (``preexec_fn``): Python runs its at-fork hooks around such a function, and a Ctrl-C that
    landed in one (logging's, which releases its lock) was lost with the lock still held: the
    demo hung. If the parent died before the request, the server stops at once.
    """
    expected = environ.get(PARENT_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(expected):
        raise SystemExit(1)  # the parent is already gone: nothing would stop this server


def spawn(model_path: Path, name: str = "model", max_batch: int = 32,
          batch_timeout_ms: float = 5.0, timeout: float = 60.0, batch_threads: int = 1,
          warmup: bool = True) -> Process:
    """Start ``cnsq serve`` in its own process and wait until it answers.

    Its own process, not a thread: decoding images and JSON holds Python's GIL, and on the same
    interpreter it would take turns with the handler's downloads instead of using another core —
    as on AWS, where the model servers are other machines.
    """
    import socket

    import requests


    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # -P: the current folder stays off sys.path, or a clone named "cnsq" beside the user's work
    # would shadow the installed package (python -m puts the current folder first).
    popen = subprocess.Popen(
        [sys.executable, "-P", "-m", "cnsq.cli", "serve", str(model_path), "--port", str(port),
         "--name", name, "--max-batch", str(max_batch), "--batch-timeout-ms",
         str(batch_timeout_ms), "--batch-threads", str(batch_threads),
         "--warmup" if warmup else "--no-warmup"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # Its own session: a Ctrl-C at the terminal reaches cnsq, which finishes the calls in
        # flight and then stops the server, instead of the server dying under them. And it
        # dies with its parent, even one killed with SIGKILL (die_with_parent).
        start_new_session=True, env={**os.environ, PARENT_ENV: str(os.getpid())})
    handle = Process(popen, port, name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            said = popen.stderr.read() if popen.stderr else ""
            lines = said.strip().splitlines() or ["(no message)"]
            raise CnsqError(f"the model server stopped: {lines[-1].removeprefix('Error: ')}")
        try:
            if requests.get(f"{handle.url}/v1/models/{name}", timeout=1).status_code == 200:
                return handle
        except requests.RequestException:
            pass
        time.sleep(0.1)
    handle.close()
    raise CnsqError(f"the model server did not start within {timeout:.0f}s")
