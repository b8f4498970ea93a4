#!/usr/bin/env python3
"""cnsq benchmarks. Each prints its figure, a baseline measured in the same run, and the ratio.

    python scripts/bench.py                 # every benchmark
    python scripts/bench.py handler         # a named subset
    python scripts/bench.py download --rows 100000

Everything runs on 127.0.0.1: a throwaway PostgreSQL cluster (or CNSQ_BENCH_DATABASE_URL),
HTTP tile and model servers with fixed latencies, and cnsq's own code as a user runs it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "lambda"), str(REPO)]

import psycopg2  # noqa: E402
import requests  # noqa: E402

from support.servers import (  # noqa: E402
    ModelServer,
    PostgresCluster,
    SqsServer,
    TileServer,
    free_port,
    fresh_database,
    tile_image,
)


@dataclass
class Result:
    """One benchmark's figure against its same-run baseline."""

    name: str
    figure: float
    unit: str
    baseline_name: str
    baseline: float
    target: str
    better: str = "lower"  # lower: figure/baseline should be small; higher: large

    @property
    def ratio(self) -> float:
        return self.figure / self.baseline if self.baseline else float("nan")

    def line(self) -> str:
        return (f"{self.name:<34} {self.figure:>12.4g} {self.unit:<8} "
                f"{self.baseline_name:<40} {self.baseline:>12.4g}  ratio {self.ratio:6.2f}  "
                f"(target {self.target})")


def work_dir(prefix: str) -> Path:
    """A temporary folder for one benchmark, removed when the run ends: the export and view
    benches write gigabytes (CSV files, their exports, caches), and runs that left them filled
    this machine's disk."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class Database:
    """A PostgreSQL server for the run: CNSQ_BENCH_DATABASE_URL or a throwaway cluster."""

    def __init__(self):
        self.cluster = None
        self.url = os.environ.get("CNSQ_BENCH_DATABASE_URL")
        if not self.url:
            self.cluster = PostgresCluster(work_dir("cnsq-bench-pg-")).start()
            self.url = self.cluster.url

    def fresh(self) -> str:
        """A new empty database with the results table."""
        from cnsq.results.store import open_store

        url = fresh_database(self.url, "bench")
        store = open_store(url)
        store.migrate()
        store.close()
        return url

    def close(self) -> None:
        if self.cluster:
            self.cluster.stop()


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# handler: one invocation of 10 records, tiles after 50 ms, predictions after 20 ms


def bench_handler(db: Database, args) -> list[Result]:
    from download_and_predict.handler import build

    url = db.fresh()
    tiles, model = TileServer(delay=0.050), ModelServer(delay=0.020)
    template = tiles.url + "/{z}/{x}/{y}.jpg"
    counter = iter(range(10**9))

    def event() -> dict:
        records = []
        for i in range(10):
            n = next(counter)
            records.append({"messageId": f"m{i}", "body": json.dumps(
                {"x": n % 4096, "y": n // 4096, "z": 12})})
        return {"Records": records}

    app = build({"TILE_ENDPOINT": template, "PREDICTION_ENDPOINT": model.endpoint,
                 "DATABASE_URL": url})
    for _ in range(2):
        assert app.run(event()) == {"batchItemFailures": []}  # warm: session and connection
    cnsq = median_seconds(lambda: app.run(event()), args.repeat)

    # The floor: one tile download + one prediction call for the batch, on a warm session.
    session = requests.Session()
    images = [tile_image(i, 0, 12) for i in range(10)]
    payload = app.build_payload(images)
    tile_latency = median_seconds(lambda: session.get(template.format(z=12, x=1, y=0)), args.repeat)
    model_latency = median_seconds(lambda: session.post(model.endpoint, json=payload), args.repeat)
    floor = tile_latency + model_latency

    # The original's way: tiles one after another, a new connection, one INSERT per tile.
    def sequential() -> None:
        body = event()
        tiles_ = [json.loads(r["body"]) for r in body["Records"]]
        contents = [requests.get(template.format(**t)).content for t in tiles_]
        predictions = requests.post(model.endpoint, json=app.build_payload(contents)).json()
        conn = psycopg2.connect(url)
        with conn.cursor() as cur:
            for t, p in zip(tiles_, predictions["predictions"], strict=True):
                cur.execute("INSERT INTO results (tile, output) VALUES (%s, %s) ON CONFLICT (tile) "
                            "DO UPDATE SET output = EXCLUDED.output",
                            (f"{t['x']}-{t['y']}-{t['z']}", json.dumps(p)))
        conn.commit()
        conn.close()

    baseline = median_seconds(sequential, args.repeat)
    tiles.close()
    model.close()
    # What the load balancer processes per tile (it bills by bytes: LCUs): TF Serving's REST
    # body, JSON with each image base64-encoded, against the images' own bytes (imagery-like
    # JPEG tiles, ~25 KB).
    jpegs = _tile_jpegs(10)
    body = len(json.dumps(app.build_payload(jpegs)).encode())
    image_bytes = sum(len(image) for image in jpegs)
    print(f"# handler: a predict body of {len(jpegs)} tiles is {body:,} bytes for {image_bytes:,} "
          f"bytes of images ({body / image_bytes:.3f}×; estimate and the simulation count 4/3)",
          flush=True)
    return [
        Result("handler: body bytes per image byte", body / image_bytes, "×",
               "base64's 4/3 (what the cost model counts)", 4 / 3, "information"),
        Result("handler: 10 records (median s)", cnsq, "s", "floor: 1 tile + 1 model latency",
               floor, "<= 1.5"),
        Result("handler: 10 records (median s)", cnsq, "s",
               "sequential baseline (original's way)", baseline, "<= 0.25 (>= 4x faster)"),
    ]


# ---------------------------------------------------------------------------------------------
# lambda: the worker's CPU and memory per call of 10 tiles, measured in a process of its own, and
# the memory size they choose (Lambda gives CPU in proportion to memory: one vCPU at 1,769 MB)

_LAMBDA_CHILD = """
import json, os, resource, sys, time
sys.path[:0] = [os.environ["LAMBDA_DIR"]]
from download_and_predict.handler import build
calls = int(os.environ["CALLS"])
app = build({k: os.environ[k] for k in ("TILE_ENDPOINT", "PREDICTION_ENDPOINT", "DATABASE_URL")})
# On AWS a cold start also reads the token and the database's password with boto3's clients.
import boto3
clients = [boto3.client(n, region_name="us-east-1") for n in ("secretsmanager", "rds")]
init_cpu = time.process_time()
rest = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def event(c):
    return {"Records": [{"messageId": f"m{i}", "body": json.dumps({"x": c * 10 + i, "y": 7, "z": 12})}
                        for i in range(10)]}
for c in range(2):  # warm: the session, the connection, the imports a first call makes
    assert app.run(event(c)) == {"batchItemFailures": []}
cpu, wall = time.process_time(), time.perf_counter()
for c in range(2, calls + 2):
    assert app.run(event(c)) == {"batchItemFailures": []}
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"cpu": cpu / calls, "wall": wall / calls, "rest_mb": rest, "peak_mb": peak,
                  "init_cpu": init_cpu}))
"""
def lambda_memory(cpu_s: float, wait_s: float, peak_mb: float,
                  sizes=(128, 256, 512, 768, 1024, 1536, 1769)):
    """Per memory size: a call's duration (the waiting, plus the CPU stretched by the share of a
    vCPU the size gets) and its GB-seconds; the choice: the fewest GB-seconds among the sizes
    at least twice the peak RSS (the Lambda runtime's own memory, larger tiles)."""
    from cnsq.ops.estimate import VCPU_MB

    rows = []
    for mb in sizes:
        duration = wait_s + cpu_s * VCPU_MB / min(mb, VCPU_MB)
        rows.append((mb, duration, mb / 1024 * duration))
    fits = [r for r in rows if r[0] >= 2 * peak_mb]
    return rows, min(fits, key=lambda r: r[2]) if fits else rows[-1]


def bench_lambda(db: Database, args) -> list[Result]:
    import simulation
    from cnsq.ops.estimate import VCPU_MB
    from cnsq.ops.pricing import shipped_prices

    jpegs = _tile_jpegs(10)
    calls = max(20, args.repeat * 4)
    content = {f"{c * 10 + i}-7-12": jpegs[i] for c in range(calls + 2) for i in range(10)}
    tiles, model = TileServer(content=content, only_content=True), ModelServer()
    env = {**os.environ, "LAMBDA_DIR": str(REPO / "lambda"), "CALLS": str(calls),
           "TILE_ENDPOINT": tiles.url + "/{z}/{x}/{y}.jpg", "PREDICTION_ENDPOINT": model.endpoint,
           "DATABASE_URL": db.fresh()}
    out = subprocess.run([sys.executable, "-c", _LAMBDA_CHILD], env=env, capture_output=True,
                         text=True, check=True)
    tiles.close()
    model.close()
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # What a call waits for in the reference world (downloads, the model's queue, the write):
    # the simulation's mean call at 1024 MB, less the CPU it takes there.
    setup = simulation.Setup(lambda_memory_mb=1024)
    outcome = simulation.simulate(setup, 200_000, shipped_prices())
    mean_call = outcome.usage.lambda_gb_seconds / outcome.usage.lambda_requests
    wait = max(0.0, mean_call - found["cpu"] * VCPU_MB / 1024)
    rows, (choice, duration, gb_s) = lambda_memory(found["cpu"], wait, found["peak_mb"])
    at_1024 = next(r for r in rows if r[0] == 1024)
    print(f"# lambda: a call of 10 tiles of {sum(map(len, jpegs)) // 10:,} bytes: "
          f"{found['cpu'] * 1000:.1f} ms of CPU, {found['wall'] * 1000:.0f} ms on 127.0.0.1; "
          f"peak RSS {found['peak_mb']:.0f} MB ({found['rest_mb']:.0f} MB after the imports and "
          f"boto3's clients); a cold start's imports take {found['init_cpu']:.2f} s of CPU; the "
          f"reference world's call waits {wait:.2f} s", flush=True)
    for mb, d, g in rows:
        cold = found["init_cpu"] * VCPU_MB / min(mb, VCPU_MB)
        print(f"#   {mb:>5} MB: a call {d:.3f} s, {g:.3f} GB-s, a cold start's imports {cold:.1f} s"
              f"{'  <- chosen' if mb == choice else ''}", flush=True)
    return [
        Result("lambda: CPU per tile (ms)", found["cpu"] / 10 * 1000, "ms",
               "the call's wall time per tile (ms)", found["wall"] / 10 * 1000, "information"),
        Result("lambda: peak RSS (MB)", found["peak_mb"], "MB", "after the imports (MB)",
               found["rest_mb"], "information"),
        Result(f"lambda: GB-s per call at {choice} MB", gb_s, "GB-s", "at 1024 MB (the example's "
               "before)", at_1024[2], "< 1 (the chosen size is cheaper)"),
    ]


# ---------------------------------------------------------------------------------------------
# download: N rows, `cnsq download` vs psql \copy, time and peak RSS


# Runs one command and reports its wall time and peak RSS. It runs in a small process of its own
# because Linux keeps the pre-exec high-water mark in ru_maxrss: a child spawned straight from
# this (by then large) benchmark process would be charged this process's memory.
_MEASURE = """
import json, os, sys, time
argv = json.loads(sys.argv[1])
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"seconds": time.perf_counter() - start, "rss_kb": usage.ru_maxrss,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def _run_measured(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(command)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    if result["code"] != 0:
        raise RuntimeError(f"{command[:3]} failed: {done.stderr[:500]}")
    return result["seconds"], result["rss_kb"] / 1024


def bench_download(db: Database, args) -> list[Result]:
    url = db.fresh()
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO results (tile, output) SELECT (i %% 262144) || '-' || (i / 262144) "
                    "|| '-18', jsonb_build_array(random(), random()) FROM generate_series(0, %s) i",
                    (args.rows - 1,))
    conn.close()
    work = work_dir("cnsq-bench-dl-")
    cnsq_times, psql_times, rss = [], [], []
    for _ in range(args.download_repeat):
        seconds, peak = _run_measured([sys.executable, "-m", "cnsq.cli", "download",
                                       str(work / "cnsq.csv"), "--database-url", url])
        cnsq_times.append(seconds)
        rss.append(peak)
        seconds, _ = _run_measured(["psql", url, "-q", "-c", "\\copy (select tile, output from "
                                    f"results) to '{work / 'psql.csv'}' csv header"])
        psql_times.append(seconds)
    same = (work / "cnsq.csv").read_bytes() == (work / "psql.csv").read_bytes()
    if not same:
        raise RuntimeError("cnsq download and psql \\copy wrote different files")
    return [
        Result(f"download: {args.rows:,} rows (median s)", statistics.median(cnsq_times), "s",
               "psql \\copy to CSV", statistics.median(psql_times), "<= 1.3"),
        Result(f"download: {args.rows:,} rows peak RSS", max(rss), "MB", "limit", 100.0,
               "< 1 (< 100 MB)"),
    ]


# ---------------------------------------------------------------------------------------------
# push: 20,000 tiles to an SQS-protocol endpoint answering each call after 20 ms


def bench_push(db: Database, args) -> list[Result]:
    import boto3
    import botocore.config

    work = work_dir("cnsq-bench-push-")
    tiles = [f"{i % 4096}-{i // 4096}-12" for i in range(args.tiles)]
    (work / "tiles.txt").write_text("\n".join(tiles) + "\n")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_REGION": "us-east-1"}

    server = SqsServer(queues=("cnsq", "loop"), delay=0.020)
    env["AWS_ENDPOINT_URL"] = server.url
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnsq.cli", "push", "tiles.txt", server.queue_url("cnsq"),
                    "--concurrency", str(args.concurrency)], cwd=work, env=env, check=True,
                   capture_output=True)
    cnsq_rate = len(tiles) / (time.perf_counter() - start)
    received = [json.loads(b) for b in server.bodies("cnsq")]
    unique = {(m["x"], m["y"], m["z"]) for m in received}
    if len(received) != len(tiles) or len(unique) != len(tiles):
        raise RuntimeError(f"push delivered {len(received)} messages, {len(unique)} unique")

    # The baseline: the same batches, one send_message_batch call at a time.
    sqs = boto3.client("sqs", endpoint_url=server.url, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x",
                       config=botocore.config.Config(retries={"mode": "standard"}))
    start = time.perf_counter()
    for i in range(0, len(tiles), 10):
        entries = []
        for j, tile in enumerate(tiles[i:i + 10]):
            x, y, z = tile.split("-")
            entries.append({"Id": str(j), "MessageBody": json.dumps({"x": int(x), "y": int(y),
                                                                     "z": int(z)})})
        sqs.send_message_batch(QueueUrl=server.queue_url("loop"), Entries=entries)
    loop_rate = len(tiles) / (time.perf_counter() - start)
    server.close()
    print(f"  push count check: {len(received):,} messages, {len(unique):,} unique "
          f"(expected {len(tiles):,})")
    return [Result(f"push: {len(tiles):,} tiles, {args.concurrency} in flight (tiles/s)",
                   cnsq_rate, "tiles/s", "one call at a time (tiles/s)", loop_rate,
                   ">= 4 (>= 10 reachable)", better="higher")]


# ---------------------------------------------------------------------------------------------
# convert-geojson: N rows; seconds and peak RSS (flat: compared with a tenth of the rows)


def bench_convert(db: Database, args) -> list[Result]:
    import random

    work = work_dir("cnsq-bench-geojson-")
    rng = random.Random(7)

    def make(path: Path, rows: int) -> None:
        with path.open("w") as out:
            out.write("tile,output\n")
            for i in range(rows):
                p = rng.random()
                out.write(f'{i % 262144}-{i // 262144}-18,"[{1 - p}, {p}]"\n')

    big, small = work / "big.csv", work / "small.csv"
    make(big, args.rows)
    make(small, args.rows // 10)
    command = [sys.executable, "-m", "cnsq.cli", "convert-geojson", "IN", str(work / "out.geojson"),
               "--thresh_ind", "1", "--thresh", "0.5"]
    seconds, peak = _run_measured([str(big) if c == "IN" else c for c in command])
    features = (work / "out.geojson").stat().st_size
    _, small_peak = _run_measured([str(small) if c == "IN" else c for c in command])
    floor, _ = _run_measured([sys.executable, "-c", "import csv, sys\nfor row in csv.reader("
                              f"open({str(big)!r})): pass"])
    print(f"  convert-geojson wrote {features / 1e6:.0f} MB of GeoJSON")
    return [
        Result(f"convert-geojson: {args.rows:,} rows (s)", seconds, "s",
               "reading the CSV in Python, nothing else", floor, "(informational)"),
        Result(f"convert-geojson: {args.rows:,} rows peak RSS", peak, "MB",
               f"peak RSS at {args.rows // 10:,} rows", small_peak, "~1 (flat), < 100 MB"),
    ]


_GDAL_ALONE = """
import sys, time
from pathlib import Path
import pyarrow as pa
from pyogrio import write_arrow
from cnsq.results.export import _columns, iter_columns
from cnsq.results.geojson import Report
blocks = [b for b in iter_columns(Path(sys.argv[1]), 1, 0.5, Report()) if len(b)]
batches = []
for block in blocks:
    columns = _columns(block, 2)
    columns.pop("bbox")
    batches.append(pa.record_batch(list(columns.values()), names=list(columns)))
start = time.perf_counter()
write_arrow(pa.RecordBatchReader.from_batches(batches[0].schema, batches), sys.argv[2],
            driver="FlatGeobuf", geometry_name="geometry", geometry_type="Polygon",
            crs="EPSG:4326", layer="tiles", layer_options={"SPATIAL_INDEX": "YES"})
print(time.perf_counter() - start)
"""


def _settled(command: list[str], fresh: Path | None = None) -> tuple[float, float]:
    """:func:`_run_measured` once the disk has taken what earlier runs wrote: an export leaves
    over 100 MB to write back, which slowed the baseline run after it by half (0.34 s against
    0.21 s in one run). ``fresh``: an output removed first, so the command writes a new file
    (as a first export does) rather than replacing the last run's: freeing a 121 MB file's
    pages took the rename 0.06 s."""
    if fresh is not None:
        fresh.unlink(missing_ok=True)
    os.sync()
    return _run_measured(command)


EXPORT_PAIRS = 9  # five left the medians 0.1 s apart from one run of the bench to the next


def bench_export(db: Database, args) -> list[Result]:
    """cnsq export, each format, against reading the same CSV with pyarrow (issue #26's yardstick);
    its peak memory against the same export of three times the rows (flat: ratio ~1).

    Each format's runs alternate with as many of the baseline (:data:`EXPORT_PAIRS`), each
    after the disk has settled, and each ratio is of the two medians: measured once at the
    start, the baseline drifted from 0.18 to 0.23 s between runs of this bench on the same
    machine, moving the ratios more than the exports moved.

    "GDAL alone" is pyogrio writing the same features, already built, to FlatGeobuf with its
    index: the writer export used before its own (:mod:`cnsq.results.flatgeobuf`), for comparison.
    GeoParquet is measured in its default codec (snappy), then with ``--compression zstd``
    (smaller, for information)."""
    import random

    work = work_dir("cnsq-bench-export-")
    rng = random.Random(7)
    big, bigger = work / "big.csv", work / "bigger.csv"
    for path, rows in ((big, args.rows), (bigger, args.rows * 3)):
        with path.open("w") as out:
            out.write("tile,output\n")
            for i in range(rows):
                p = rng.random()
                out.write(f'{i % 262144}-{i // 262144}-18,"[{1 - p}, {p}]"\n')
    baseline = [sys.executable, "-c", f"import pyarrow.csv as c\nc.read_csv({str(big)!r})"]
    _run_measured(baseline)  # the file into the page cache, pyarrow's files too
    results, floors = [], []
    for fmt, suffix, options in (("geojson", "geojson", []), ("geoparquet", "parquet", []),
                                 ("flatgeobuf", "fgb", []),
                                 ("geoparquet", "parquet", ["--compression", "zstd"])):
        out = work / f"out.{suffix}"
        run_big, run_bigger = ([sys.executable, "-m", "cnsq.cli", "export", str(source), str(out),
                                "--thresh_ind", "1", "--thresh", "0.5", *options]
                               for source in (big, bigger))
        name = " ".join([fmt, *options])
        _run_measured(run_big)  # warm, as the baseline is
        pairs = [(_settled(run_big, out), _settled(baseline)) for _ in range(EXPORT_PAIRS)]
        seconds = statistics.median(run[0] for run, _ in pairs)
        floor = statistics.median(base[0] for _, base in pairs)
        floors.append(floor)
        peak = max(run[1] for run, _ in pairs)
        size = out.stat().st_size
        print(f"  export {name}: {size / 1e6:.0f} MB written", flush=True)
        results.append(Result(f"export {name}: {args.rows:,} rows (s)", seconds, "s",
                              "reading the CSV with pyarrow", floor,
                              "(informational)" if options else
                              "≤ 4" if fmt == "geojson" else "≤ 3"))
        _, bigger_peak = _run_measured(run_bigger)
        results.append(Result(f"export {name}: peak RSS, {args.rows * 3:,} rows", bigger_peak,
                              "MB", f"the same at {args.rows:,} rows", peak,
                              "< 200 MB, ~1 (flat)"))
    floor = statistics.median(floors)
    gdal = float(subprocess.run([sys.executable, "-c", _GDAL_ALONE, str(big),
                                 str(work / "alone.fgb")], capture_output=True, text=True,
                                check=True, cwd=REPO).stdout.split()[-1])
    results.append(Result("GDAL alone: the same FlatGeobuf (s)", gdal, "s",
                          "reading the CSV with pyarrow", floor, "(informational)"))
    return results


# ---------------------------------------------------------------------------------------------
# serve and pipeline: a small CNN whose inference costs a few ms per tile on this CPU


def _tile_jpegs(count: int) -> list[bytes]:
    """256² JPEG tiles of textured noise (about 25 KB each, like satellite imagery tiles)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        pixels = np.clip(rng.normal(120, 25, (256, 256, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        images.append(buffer.getvalue())
    return images


def _post_all(endpoint: str, payloads: list[dict], clients: int) -> float:
    """Send every payload with ``clients`` concurrent keep-alive connections; returns seconds.

    The bodies are encoded before the clock starts and sent with ``http.client``: the client
    shares the CPU with the server it measures, and should take as little of it as it can.
    """
    import http.client
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit

    target = urlsplit(endpoint)
    bodies = [json.dumps(payload).encode() for payload in payloads]
    local = threading.local()

    def send(i: int) -> int:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        local.conn.request("POST", target.path, bodies[i], {"Content-Type": "application/json"})
        response = local.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"model server answered {response.status}: {data[:200]!r}")
        return len(json.loads(data)["predictions"])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(send, range(len(bodies))))
    if done != sum(len(p["instances"]) for p in payloads):
        raise RuntimeError("missing predictions")
    return time.perf_counter() - start


def bench_serve(db: Database, args) -> list[Result]:
    import base64

    from cnsq.local import serve
    from cnsq.local.demo_models import benchmark_cnn

    model = benchmark_cnn(work_dir("cnsq-bench-serve-") / "cnn.onnx")
    images = _tile_jpegs(64)
    payloads = [{"instances": [{"image_bytes": {"b64": base64.b64encode(images[i % 64]).decode()}}]}
                for i in range(args.serve_requests)]
    rates: dict[str, list[float]] = {"batched": [], "single": []}
    for _ in range(args.serve_rounds):  # alternating, medians compared (see bench_pipeline)
        for label, max_batch in (("batched", 32), ("single", 1)):
            server = serve.spawn(model, name="m", max_batch=max_batch, batch_timeout_ms=5)
            _post_all(server.endpoint, payloads[:32], 16)  # warm up
            rates[label].append(len(payloads) / _post_all(server.endpoint, payloads, 16))
            server.close()
    print("  serve rounds (pred/s): batched " + ", ".join(f"{r:.0f}" for r in rates["batched"])
          + "; --max-batch 1 " + ", ".join(f"{r:.0f}" for r in rates["single"]))
    label = f"serve: 16 clients, 1 tile each (pred/s, median of {args.serve_rounds})"
    return [Result(label, statistics.median(rates["batched"]), "pred/s",
                   "the same with --max-batch 1", statistics.median(rates["single"]), ">= 2",
                   better="higher")]


def bench_pipeline(db: Database, args) -> list[Result]:
    """cnsq run against the model server it starts, fed the same tiles already downloaded.

    Rounds alternate server-alone and pipeline runs and the medians are compared: on a shared
    machine one run of each can be several per cent apart from the next.
    """
    import base64

    from cnsq.local import pipeline, serve
    from cnsq.local.demo_models import benchmark_cnn

    work = work_dir("cnsq-bench-pipeline-")
    model = benchmark_cnn(work / "cnn.onnx")
    images = _tile_jpegs(args.pipeline_tiles)
    names = []
    for i, data in enumerate(images):
        x, y = 1000 + i % 64, 2000 + i // 64
        path = work / "tiles" / "12" / str(x) / f"{y}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        names.append(f"{x}-{y}-12")
    (work / "tiles.txt").write_text("\n".join(names) + "\n")
    encoded = [{"image_bytes": {"b64": base64.b64encode(d).decode()}} for d in images]
    payloads = [{"instances": encoded[i:i + 10]} for i in range(0, len(encoded), 10)]

    def server_alone(batch_threads: int) -> float:
        """The model server fed the downloaded tiles, 10 per request, warmed up first."""
        server = serve.spawn(model, name="m", max_batch=32, batch_threads=batch_threads)
        try:
            _post_all(server.endpoint, payloads[:16], args.pipeline_concurrency)
            return len(images) / _post_all(server.endpoint, payloads, args.pipeline_concurrency)
        finally:
            server.close()

    # The imagery endpoint is another process, as a real one would be.
    port = free_port()
    tiles = subprocess.Popen([sys.executable, "-m", "cnsq.cli", "tileserver", str(work / "tiles"),
                              "--port", str(port)], stderr=subprocess.DEVNULL)
    template = f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.jpg"
    for _ in range(100):
        try:
            requests.get(template.format(z=12, x=1000, y=2000), timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.1)
    alone, default, runs, autos = [], [], [], []
    try:
        for round_ in range(args.pipeline_rounds):
            alone.append(server_alone(pipeline.MODEL_BATCH_THREADS))
            default.append(server_alone(1))
            for concurrency, rates in ((args.pipeline_concurrency, runs), (None, autos)):
                database = work / f"results-{round_}-{concurrency or 'auto'}.db"
                report = pipeline.run(work / "tiles.txt", template, model, None,
                                      f"sqlite:///{database}", concurrency=concurrency)
                if report.failed or report.written != len(images):
                    raise RuntimeError(f"pipeline wrote {report.written} of {len(images)}: "
                                       f"{report.failed[:3]}")
                rates.append(report.rate)
    finally:
        tiles.terminate()
    print("  pipeline rounds (tiles/s): cnsq run " + ", ".join(f"{r:.0f}" for r in runs)
          + "; --concurrency auto " + ", ".join(f"{r:.0f}" for r in autos)
          + "; server alone " + ", ".join(f"{r:.0f}" for r in alone)
          + "; serve default " + ", ".join(f"{r:.0f}" for r in default))
    rate = statistics.median(runs)
    label = f"pipeline: cnsq run, {len(images)} tiles (tiles/s, median of {len(runs)})"
    return [
        # Information, not a target: here the model shares two cores with the downloads; on
        # AWS it has GPUs of its own (the 0.9 target that once stood here is retired).
        Result(label, rate, "tiles/s", "its model server fed downloaded tiles",
               statistics.median(alone), "(informational)", better="higher"),
        Result(label, rate, "tiles/s", "cnsq serve's default (1 batch thread) fed the same",
               statistics.median(default), "(informational)", better="higher"),
        # The controller, from 4 calls at once, against the fixed setting tuned for this machine.
        Result(f"pipeline: cnsq run --concurrency auto, {len(images)} tiles (tiles/s)",
               statistics.median(autos), "tiles/s",
               f"--concurrency {args.pipeline_concurrency} in the same rounds", rate,
               "(informational)", better="higher"),
    ]


# ---------------------------------------------------------------------------------------------
# view: a million results on the map page


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _view_once(source: Path, cache: Path, viewports: list[dict]) -> dict:
    """Start `cnsq view` with Chromium already open (as a user's browser is, when installed),
    load the page until its first overlay is drawn, then pan and zoom through ``viewports``;
    times from the command's start, and its peak RSS."""
    import contextlib

    try:
        from playwright.sync_api import sync_playwright

        from support.browser import chromium_path, launch
        have_browser = chromium_path() is not None
    except ImportError:
        have_browser = False
    with contextlib.ExitStack() as stack:
        page = None
        if have_browser:
            browser = launch(stack.enter_context(sync_playwright()))
            stack.callback(browser.close)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
        began = time.perf_counter()
        view = subprocess.Popen([sys.executable, "-m", "cnsq.cli", "view", str(source), "--port",
                                 "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "XDG_CACHE_HOME": str(cache)})
        stack.callback(view.wait, 30)
        stack.callback(view.terminate)
        url = view.stdout.readline().strip()
        figures = {"ready": time.perf_counter() - began}
        if page is not None:
            page.goto(url)
            page.wait_for_function("window.cnsqView && cnsqView.painted")
        else:  # no browser: the page's first two answers stand in for it
            requests.get(url + "api/summary", timeout=60)
            requests.get(url + "api/features", params=viewports[0], timeout=60)
        figures["paint"] = time.perf_counter() - began
        session = requests.Session()
        latencies, items = [], []
        for params in viewports:
            start = time.perf_counter()
            answer = session.get(url + "api/features", params=params, timeout=60).json()
            latencies.append(time.perf_counter() - start)
            items.append(len(answer["tiles"]) + len(answer["parents"]))
        start = time.perf_counter()
        for _ in range(len(viewports)):
            session.get(url + "static/view.css", timeout=60)
        figures["static"] = (time.perf_counter() - start) / len(viewports)
        figures["features"] = statistics.median(latencies)
        figures["items"] = max(items)
        figures["rss"] = _peak_rss_mb(view.pid)
    return figures


def bench_view(db: Database, args) -> list[Result]:
    import random

    import mercantile

    work = work_dir("cnsq-bench-view-")
    rng = random.Random(3)
    rows = args.view_rows
    side = int(rows ** 0.5) + 1
    source, small = work / "results.csv", work / "small.csv"
    for path, count in ((source, rows), (small, rows // 10)):
        with path.open("w") as out:
            out.write("tile,output\n")
            for i in range(count):
                p = round(rng.random(), 6)
                out.write(f'{64000 + i % side}-{48000 + i // side}-17,"[{round(1 - p, 6)}, {p}]"\n')
    # The views a user goes through: the whole area, then closer, to the tiles themselves.
    west, north = mercantile.ul(64000, 48000, 17)
    east, south = mercantile.ul(64000 + side, 48000 + side, 17)
    viewports = []
    for zoom in range(6, 18):
        span_x = 1280 / 256 * 360 / 2**zoom
        span_y = 800 / 1280 * span_x
        for _ in range(5):
            x, y = rng.uniform(west, east), rng.uniform(south, north)
            viewports.append({"zoom": zoom, "west": x - span_x / 2, "east": x + span_x / 2,
                              "south": y - span_y / 2, "north": y + span_y / 2})
    cache = work / "cache"
    cold = _view_once(source, cache, viewports)
    warm = _view_once(source, cache, viewports)
    small_run = _view_once(small, work / "cache-small", viewports)
    command = [sys.executable, "-m", "cnsq.cli", "convert-geojson", str(source),
               str(work / "all.geojson"), "--thresh_ind", "1", "--thresh", "0"]
    convert_seconds, _ = _run_measured(command)
    size = (work / "all.geojson").stat().st_size
    print(f"  the GeoJSON of every tile, as a user would load it today: {size / 1e6:.0f} MB; "
          f"the largest answer to a view: {cold['items']:,} squares; "
          f"server ready (cold) after {cold['ready']:.1f}s")
    return [
        Result(f"view: {rows:,} results, first paint (cold)", cold["paint"], "s",
               "convert-geojson of the same rows", convert_seconds, "≤ 3 s"),
        Result(f"view: {rows:,} results, first paint (cached)", warm["paint"], "s",
               "first paint, cold", cold["paint"], "≤ 1 s"),
        Result(f"view: {rows:,} results, peak RSS", cold["rss"], "MB",
               f"peak RSS at {rows // 10:,} results", small_run["rss"], "(informational)"),
        Result("view: one pan/zoom answer (median)", cold["features"] * 1000, "ms",
               "a static file from the same server", cold["static"] * 1000, "(informational)"),
    ]


def bench_tune(db: Database, args) -> list[Result]:
    """The stack's controller judged in the simulation (simulation.evaluation): the baseline
    world and eight it was not tuned on, each against its grid of fixed setups (1..maxInstances
    hosts × concurrency in steps of 5 up to the reserved maximum) and the user's fixed setup
    (best on the baseline, used unchanged). Prints the table of worlds and the goals."""
    from tabulate import tabulate

    from cnsq.ops.pricing import shipped_prices
    from simulation import Setup, World, simulate
    from simulation.evaluation import (
        BEATS_USER_IN,
        DAY_SHARE,
        DOMINATED_BY,
        TIME_WITHIN,
        cases,
        evaluate,
        summary,
        table,
    )

    if args.tune_tiles < 1 or args.tune_hosts < 1 or args.tune_reserved < 5:
        raise SystemExit("bench.py tune: --tune-tiles and --tune-hosts must be 1 or more, "
                         "--tune-reserved 5 or more (the grid's first step)")
    prices = shipped_prices()
    setup = Setup(max_instances=args.tune_hosts, reserved=args.tune_reserved)
    worlds = cases(tiles=args.tune_tiles)
    if args.tune_worlds:
        wanted = {w.strip() for w in args.tune_worlds.split(",")}
        unknown = wanted - {w.name for w in worlds}
        if unknown:
            raise SystemExit(f"bench.py tune: no world named {', '.join(sorted(unknown))}; the "
                             f"worlds: {', '.join(w.name for w in worlds)}")
        worlds = [worlds[0]] + [w for w in worlds[1:] if w.name in wanted]
    started = time.perf_counter()
    judged = evaluate(setup, prices, worlds, workers=os.cpu_count() or 1, full=args.full_grid,
                      progress=lambda line: print(f"# tune: {line} "
                                                  f"({time.perf_counter() - started:.0f} s)",
                                                  flush=True))
    took = time.perf_counter() - started
    runs = sum(len(j.fixed) + 1 for j in judged)
    print(f"# tune: {len(judged)} worlds, {runs} simulated runs in {took:.0f} s; maxInstances "
          f"{setup.max_instances}, reserved concurrency {setup.reserved}, idleMinutes "
          f"{setup.idle_minutes:g}; costs per million tiles with the controller's idle tail")
    print(tabulate(table(judged), headers="firstrow"))
    verdict = summary(judged)
    print(f"# goals (held-out worlds): no fixed setup better by more than {DOMINATED_BY:.0%} on "
          f"both time and cost; time within {TIME_WITHIN:.0%} of the fastest; a lower time × "
          f"cost than the user's setup in {BEATS_USER_IN} of 8 (here "
          f"{verdict['beats_user']} of {verdict['held_out']}); the day of three jobs at most "
          f"{DAY_SHARE} × the cheapest always-on fixed stack as fast on each job")
    for j in judged:
        on = j.always_on() if len(j.case.jobs) > 1 else None
        if len(j.case.jobs) > 1:
            print(f"# {j.case.name}: controller ${j.controller.dollars:.2f} in all, jobs "
                  + ", ".join(f"{m:.1f}" for m in j.controller.job_minutes) + " min; "
                  + (f"cheapest always-on as fast: {on[0][0]}×{on[0][1]} ${on[1].dollars:.2f}, "
                     f"jobs " + ", ".join(f"{m:.1f}" for m in on[1].job_minutes) + " min"
                     if on else "no always-on fixed stack is as fast on each job"))
    missed = list(verdict["failed"])  # type: ignore[call-overload]
    if not verdict["beats_user_goal"]:
        missed.append(("held-out worlds", f"beats the user's setup in {verdict['beats_user']} "
                                          f"of {verdict['held_out']} (goal: 6 of 8)"))
    print(f"# missed: {missed or 'none'}", flush=True)
    heavy = simulate(Setup(max_instances=1, warm_instances=1, concurrency=40, lambda_timeout=60,
                           visibility_timeout=360), 20_000, prices,
                     World(gpu_fixed_s=0.05, gpu_per_tile_s=0.2))
    to_four = next((s.t for s in heavy.samples if s.scenario == 4), float("nan"))
    print(f"# tune: scenario 1 → 4 in {to_four / 60:.0f} min (target ≤ 12: CloudWatch's minutes "
          f"trail by two)", flush=True)
    base = judged[0]
    held = [j for j in judged if not j.case.tuned_on]
    return [
        Result("tune: baseline controller drain", base.controller.minutes, "min",
               "fastest fixed " + "×".join(map(str, base.fastest[0])),
               base.fastest[1].minutes, f"≤ {1 + TIME_WITHIN:.2f}"),
        Result("tune: baseline controller $/M", base.controller.per_million, "$",
               "cheapest fixed " + "×".join(map(str, base.cheapest[0])),
               base.cheapest[1].per_million, "how far"),
        Result("tune: held-out worlds within time", sum(j.goals["time within 10 %"] for j in held),
               "worlds", "held-out worlds", len(held), "= 1.00", better="higher"),
        Result("tune: held-out worlds undominated", sum(j.goals["not dominated"] for j in held),
               "worlds", "held-out worlds", len(held), "= 1.00", better="higher"),
        Result("tune: held-out worlds beating user", verdict["beats_user"], "worlds",
               "held-out worlds", len(held), f"≥ {BEATS_USER_IN / 8:.2f}", better="higher"),
    ]


# ---------------------------------------------------------------------------------------------
# cost: the reference job (a million tiles, up to four GPU hosts) in the simulation, item by
# item: the design before issue 38 and after it, on demand and on Spot; `cnsq estimate`'s lines
# beside the simulation's


def bench_cost(db: Database, args) -> list[Result]:
    import tempfile

    from tabulate import tabulate

    from cnsq.config import load_config
    from cnsq.ops.estimate import estimate
    from cnsq.ops.pricing import Parts, shipped_prices
    from simulation import SPOT_DOCUMENTED, SPOT_PESSIMISTIC, Setup, World, simulate

    prices = shipped_prices()
    before = Setup(lambda_memory_mb=1024, lambda_architecture="x86_64", end_idle_hosts=False)
    after = Setup(parts=Parts(egress="ipv6"))
    runs = {
        "before (NAT, 1024 MB x86, ECS scale-in)": (before, World()),
        "on demand (IPv6, 128 MB arm64)": (after, World()),
        "Spot, documented rate": (replace(after, spot=100),
                                  World(spot_interruptions_per_hour=SPOT_DOCUMENTED)),
    }
    outcomes = {name: simulate(setup, 1_000_000, prices, world)
                for name, (setup, world) in runs.items()}
    # The pessimistic rate over several runs (an interruption is a draw): the worst of them.
    stressed = [simulate(replace(after, spot=100), 1_000_000, prices,
                         World(spot_interruptions_per_hour=SPOT_PESSIMISTIC), seed=seed)
                for seed in range(1, 6)]
    outcomes["Spot, pessimistic (worst of 5)"] = max(
        stressed, key=lambda o: o.bill.total + o.tail.total)
    names = list(dict.fromkeys(i.name for o in outcomes.values() for i in o.bill.items))
    rows = [[n, *(f"{next((i.cost for i in o.bill.items if i.name == n), 0.0):.3f}"
                  for o in outcomes.values())] for n in names]
    rows.append(["idle tail", *(f"{o.tail.total:.3f}" for o in outcomes.values())])
    rows.append(["per million, tail included",
                 *(f"{(o.bill.total + o.tail.total) / o.written * 1e6:.2f}"
                   for o in outcomes.values())])
    rows.append(["drain (min)", *(f"{o.drained_at / 60:.1f}" for o in outcomes.values())])
    rows.append(["lost / dead-lettered / reclaimed", *(
        f"{o.tiles - o.written} / {o.dead_letter} / {o.interruptions}"
        for o in outcomes.values())])
    print(tabulate(rows, headers=["$ (simulation)", *outcomes]), flush=True)
    print(f"# pessimistic Spot over 5 seeds: {[o.interruptions for o in stressed]} reclaims, "
          f"{[round(o.drained_at / 60, 1) for o in stressed]} min, "
          f"{sum(o.tiles - o.written for o in stressed)} lost, "
          f"{sum(o.dead_letter for o in stressed)} dead-lettered", flush=True)
    # `cnsq estimate` beside the simulation, on the example config sized as the reference job.
    folder = Path(tempfile.mkdtemp())
    (folder / "config").mkdir()
    text = (REPO / "config" / "config.example.yml").read_text().replace(
        "    maxInstances: 1\n", "    maxInstances: 4\n", 1)
    (folder / "config" / "config.yml").write_text(text)
    (folder / "config" / ".env").write_text("RDS_USERNAME=admin\nTILE_ACCESS_TOKEN=t\n")
    values = load_config(folder / "config" / "config.yml", environ={}).values
    estimated = estimate(1_000_000, values, prices, egress="ipv6")
    simulated = outcomes["on demand (IPv6, 128 MB arm64)"]
    lines = {i.name: i.cost for i in simulated.bill.items}
    worst = max(abs(i.cost / lines[i.name] - 1) for i in estimated.bill.items if lines.get(i.name))
    print(tabulate([[i.name, f"{i.cost:.3f}", f"{lines.get(i.name, 0.0):.3f}"]
                    for i in estimated.bill.items] +
                   [["idle tail", f"{estimated.idle.total:.3f}", f"{simulated.tail.total:.3f}"]],
                   headers=["$ on demand", "cnsq estimate", "simulation"]), flush=True)
    per = {name: (o.bill.total + o.tail.total) / o.written * 1e6 for name, o in outcomes.items()}
    return [
        Result("cost: on demand $/M", per["on demand (IPv6, 128 MB arm64)"], "$",
               "before issue 38", per["before (NAT, 1024 MB x86, ECS scale-in)"],
               "<= $2.50 per million"),
        Result("cost: Spot $/M", per["Spot, documented rate"], "$", "before issue 38",
               per["before (NAT, 1024 MB x86, ECS scale-in)"], "<= $1.75 per million"),
        Result("cost: drain on demand (min)", simulated.drained_at / 60, "min", "before",
               outcomes["before (NAT, 1024 MB x86, ECS scale-in)"].drained_at / 60, "<= 1.00"),
        Result("cost: estimate's worst line off", worst * 100, "%", "the goal", 10.0, "<= 1.00"),
    ]


# ---------------------------------------------------------------------------------------------
# cog: one worker reading tiles from a COG over HTTP range requests on 127.0.0.1, against the same
# tiles pre-rendered as PNGs served by `cnsq tileserver`


_COG_CHILD = """
import json, os, resource, sys, time
sys.path[:0] = [os.environ["LAMBDA_DIR"]]
start = time.process_time()
from download_and_predict.handler import build
import boto3
worker = time.process_time() - start
import rasterio, rio_tiler.io, rio_tiler.mosaic
raster = time.process_time() - start - worker
from download_and_predict.cog import Imagery, read_tile
tiles = json.loads(os.environ["TILES"])
source = Imagery((os.environ["COG"],))
half = len(tiles) // 2
for tile in tiles[:half]:  # warm: the header, the first blocks
    read_tile(source, *tile)
cpu = time.process_time()
for tile in tiles[half:]:
    read_tile(source, *tile)
cpu = (time.process_time() - cpu) / (len(tiles) - half)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"worker_cpu": worker, "raster_cpu": raster, "cpu_per_tile": cpu,
                  "peak_mb": peak}))
"""


def bench_cog(db: Database, args) -> list[Result]:
    import mercantile
    import numpy as np
    from rasterio.warp import transform_bounds

    from cnsq.local import tileserver
    from download_and_predict.cog import Imagery, read_tile
    from support.cogs import A_ORIGIN, RESOLUTION, UTM_33N, cog_bytes, gradient
    from support.servers import RangeServer

    size = 2048  # a 20 km scene at 10 m, zoom 14's resolution
    # Noise on the gradient, as imagery has: the file does not deflate to a few kilobytes that
    # the first read would fetch whole (12 MB of pixels).
    noisy = gradient(size) + np.random.default_rng(5).integers(0, 16, (3, size, size), "uint8")
    scene = RangeServer({"scene.tif": cog_bytes(noisy, A_ORIGIN)})
    source = Imagery((f"{scene.url}/scene.tif",))
    # Pre-rendered through another URL: GDAL caches by URL, and the timed reads start cold.
    renderer = Imagery((f"{scene.url}/scene.tif?render",))
    west, south, east, north = transform_bounds(
        UTM_33N, "EPSG:4326", A_ORIGIN[0], A_ORIGIN[1] - size * RESOLUTION,
        A_ORIGIN[0] + size * RESOLUTION, A_ORIGIN[1])
    inner = mercantile.tiles(west + 0.02, south + 0.02, east - 0.02, north - 0.02, [14])
    tiles = list(inner)
    rounds = 3
    per_round = max(5, min(args.repeat, len(tiles) // (rounds + 1)))
    folder = work_dir("cog") / "tiles"
    for tile in tiles[:per_round * (rounds + 1)]:
        path = folder / str(tile.z) / str(tile.x) / f"{tile.y}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = read_tile(renderer, *tile)
        assert image is not None, tile
        path.write_bytes(image)
    pngs = tileserver.start(folder, port=0)
    session = requests.Session()
    # The tile server the worker's own reads replace (TiTiler's way): each tile rendered on
    # request from the same COG by the same code, fetched over HTTP. Its own URL: GDAL's cache
    # is per URL, so its reads start cold too.
    served = Imagery((f"{scene.url}/scene.tif?served",))
    renderer_server = _rendering_server(served)
    cog_times, png_times, served_times, requests_per_tile = [], [], [], []
    warp_times: list[float] = []
    jpeg_times: list[float] = []
    # imagery.format jpeg: its own URL, so that its reads start cold as the PNG reads do.
    jpeg_source = Imagery((f"{scene.url}/scene.tif?jpeg",), format="jpeg")
    jpeg_bytes = png_bytes = 0
    read_tile(source, *tiles[0])  # the header, once
    read_tile(jpeg_source, *tiles[0])
    warp_only = _bare_warp(source.urls[0])
    assert session.get(f"{renderer_server.url}/{tiles[0].z}/{tiles[0].x}/{tiles[0].y}.png").ok
    for r in range(1, rounds + 1):
        batch = tiles[r * per_round:(r + 1) * per_round]
        before = len(scene.requests)
        started = time.perf_counter()
        for tile in batch:
            png_bytes += len(read_tile(source, *tile) or b"")
        cog_times.append((time.perf_counter() - started) / len(batch))
        requests_per_tile.append((len(scene.requests) - before) / len(batch))
        started = time.perf_counter()
        for tile in batch:
            jpeg_bytes += len(read_tile(jpeg_source, *tile) or b"")
        jpeg_times.append((time.perf_counter() - started) / len(batch))
        started = time.perf_counter()
        for tile in batch:
            assert session.get(pngs.template.format(z=tile.z, x=tile.x, y=tile.y)).ok
        png_times.append((time.perf_counter() - started) / len(batch))
        started = time.perf_counter()
        for tile in batch:
            assert session.get(f"{renderer_server.url}/{tile.z}/{tile.x}/{tile.y}.png").ok
        served_times.append((time.perf_counter() - started) / len(batch))
        # The least any reader that reprojects pays: GDAL's warp of the tile alone, its blocks
        # cached by the read above, no mask, no image written.
        started = time.perf_counter()
        for tile in batch:
            warp_only(tile)
        warp_times.append((time.perf_counter() - started) / len(batch))
    warp_only.close()  # type: ignore[attr-defined]
    pngs.close()
    renderer_server.close()
    # A cold worker of its own: the raster libraries' imports (a cold start's extra CPU) and
    # the memory and CPU a call of 10 tiles read from the COG takes.
    env = {**os.environ, "LAMBDA_DIR": str(REPO / "lambda"), "COG": source.urls[0],
           "TILES": json.dumps([list(t) for t in tiles[:per_round * 2]])}
    child = json.loads(subprocess.run([sys.executable, "-c", _COG_CHILD], env=env,
                                      capture_output=True, text=True, check=True
                                      ).stdout.strip().splitlines()[-1])
    scene.close()
    rows, (choice, _, gb_s) = lambda_memory(child["cpu_per_tile"] * 10, 0.0, child["peak_mb"])
    print(f"# cog: a cold worker: its own imports {child['worker_cpu']:.2f} s of CPU, the raster "
          f"libraries' {child['raster_cpu']:.2f} s more; {child['cpu_per_tile'] * 1000:.0f} ms "
          f"of CPU a tile read from the COG; peak RSS {child['peak_mb']:.0f} MB: a call of 10 "
          f"tiles is cheapest at {choice} MB ({gb_s:.3f} GB-s of CPU alone; the memory at least "
          f"twice the peak)", flush=True)
    cog_s, png_s = statistics.median(cog_times), statistics.median(png_times)
    served_s = statistics.median(served_times)
    print(f"# cog: the same new tiles rendered on request by a tile server on 127.0.0.1 (the "
          f"same code): {[round(1 / s, 1) for s in served_times]} tiles/s", flush=True)
    print(f"# cog: {len(tiles)} zoom-14 tiles in a {size}-pixel UTM scene; rounds of {per_round} "
          f"new tiles (not read before): {[round(1 / s, 1) for s in cog_times]} tiles/s from "
          f"the COG, {[round(1 / s, 1) for s in png_times]} from the PNGs; range requests per "
          f"tile {requests_per_tile}", flush=True)
    warp_s = statistics.median(warp_times)
    jpeg_s = statistics.median(jpeg_times)
    print(f"# cog: imagery.format jpeg: {[round(1 / s, 1) for s in jpeg_times]} tiles/s, "
          f"{jpeg_bytes / png_bytes:.2f} of the PNGs' bytes", flush=True)
    print(f"# cog: GDAL's warp alone (no mask, no image): {[round(1 / s, 1) for s in warp_times]}"
          f" tiles/s: at best {png_s / warp_s:.2f} of the PNGs' rate for any reader that "
          f"reprojects", flush=True)
    return [
        Result("cog: tiles/s per worker", 1 / cog_s, "tiles/s", "cnsq tileserver's PNGs",
               1 / png_s, ">= 0.5 (at most 2x the time)", better="higher"),
        Result("cog: tiles/s per worker, JPEG", 1 / jpeg_s, "tiles/s", "cnsq tileserver's PNGs",
               1 / png_s, ">= 0.5 (at most 2x the time)", better="higher"),
        Result("cog: GDAL's warp alone", 1 / warp_s, "tiles/s", "cnsq tileserver's PNGs",
               1 / png_s, "information (the floor of any reprojecting read)", better="higher"),
        Result("cog: range requests per tile", statistics.median(requests_per_tile), "requests",
               "one block read", 1.0, "about 1"),
        Result("cog: tiles/s per worker", 1 / cog_s, "tiles/s",
               "a tile server rendering each tile on request", 1 / served_s,
               "information (the server it replaces)", better="higher"),
    ]


def _bare_warp(url: str):
    """A function that warps one tile of the COG at ``url`` onto its Web Mercator grid with
    rasterio's WarpedVRT and nothing else (``.close()`` ends it)."""
    import mercantile
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_bounds
    from rasterio.vrt import WarpedVRT

    from download_and_predict.cog import GDAL_OPTIONS

    env = rasterio.Env(**GDAL_OPTIONS)
    env.__enter__()
    dataset = rasterio.open(url)

    def warp(tile) -> None:
        bounds = mercantile.xy_bounds(tile)
        with WarpedVRT(dataset, crs="EPSG:3857", width=256, height=256,
                       transform=from_bounds(*bounds, 256, 256),
                       resampling=Resampling.nearest) as vrt:
            vrt.read()

    def close() -> None:
        dataset.close()
        env.__exit__(None, None, None)

    warp.close = close  # type: ignore[attr-defined]
    return warp


def _rendering_server(imagery):
    """A tile server on 127.0.0.1 that renders ``GET /{z}/{x}/{y}.png`` from ``imagery`` on
    request, as TiTiler does (the worker's own reading code): 404 where it has no pixel."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from download_and_predict.cog import read_tile

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            z, x, y = (int(v) for v in self.path.split(".")[0].strip("/").split("/"))
            body = read_tile(imagery, x, y, z)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        @property
        def url(self) -> str:
            return f"http://127.0.0.1:{self.server_address[1]}"

        def close(self) -> None:
            self.shutdown()
            self.server_close()

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


BENCHMARKS: dict[str, Callable] = {"handler": bench_handler, "download": bench_download,
                                   "push": bench_push, "convert-geojson": bench_convert,
                                   "serve": bench_serve, "pipeline": bench_pipeline,
                                   "view": bench_view, "tune": bench_tune,
                                   "export": bench_export, "lambda": bench_lambda,
                                   "cost": bench_cost, "cog": bench_cog}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], metavar="NAME",
                        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--repeat", type=int, default=15, help="runs per timed figure")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the download bench")
    parser.add_argument("--download-repeat", type=int, default=3)
    parser.add_argument("--tiles", type=int, default=20_000, help="tiles for the push bench")
    parser.add_argument("--concurrency", type=int, default=32, help="push calls in flight")
    parser.add_argument("--serve-requests", type=int, default=800)
    parser.add_argument("--serve-rounds", type=int, default=3,
                        help="alternating batched and --max-batch 1 runs; medians compared")
    parser.add_argument("--pipeline-tiles", type=int, default=2000)
    parser.add_argument("--pipeline-rounds", type=int, default=5,
                        help="alternating server-alone and pipeline runs; medians compared "
                             "(on a 2-core VM one round can be 10%% off the next)")
    parser.add_argument("--pipeline-concurrency", type=int, default=16,
                        help="requests (server alone) or handler calls (cnsq run) in flight")
    parser.add_argument("--view-rows", type=int, default=1_000_000, help="results for the view bench")
    parser.add_argument("--tune-tiles", type=int, default=1_000_000, help="tiles for the tune bench")
    parser.add_argument("--tune-hosts", type=int, default=4, help="ecs.maxInstances for tune")
    parser.add_argument("--tune-reserved", type=int, default=200,
                        help="the reserved concurrency (maxConcurrent) tune's grid goes up to")
    parser.add_argument("--tune-worlds", metavar="NAMES",
                        help="tune: only these held-out worlds (comma-separated), with the baseline")
    parser.add_argument("--full-grid", action="store_true",
                        help="tune: every concurrency up to the reserved one, not stopping past "
                             "the GPUs' saturation")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="Also write the results as a Markdown table (for docs/performance.md).")
    args = parser.parse_args()
    names = args.names or list(BENCHMARKS)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {_memory_gib()} GiB, "
               f"Python {platform.python_version()}")
    print(f"# cnsq benchmarks on {platform.node()}: {machine}")
    db = Database()
    results = []
    try:
        for name in names:
            for result in BENCHMARKS[name](db, args):
                print(result.line(), flush=True)
                results.append(result)
    finally:
        db.close()
    if args.markdown:
        args.markdown.write_text(markdown(results, machine))
        print(f"wrote {args.markdown}")
    return 0


def _memory_gib() -> int:
    try:
        with open("/proc/meminfo") as handle:
            return round(int(handle.readline().split()[1]) / 1024 / 1024)
    except OSError:
        return 0


def markdown(results: list[Result], machine: str) -> str:
    """The Performance table of docs/performance.md."""
    lines = [f"Measured on {machine}, {time.strftime('%Y-%m-%d')}, by `python scripts/bench.py`.",
             "", "| benchmark | cnsq | same-run baseline | ratio | target |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.name} | {r.figure:.4g} {r.unit} | {r.baseline_name}: "
                     f"{r.baseline:.4g} {r.unit} | {r.ratio:.2f} | {r.target} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
