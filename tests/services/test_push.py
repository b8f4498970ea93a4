"""cnsq push: every tile exactly once, against moto and against an SQS endpoint that misbehaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import botocore.config
import pytest
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.ops.push import BatchSender, Checkpoint, push
from support.servers import SqsServer

REPO = Path(__file__).resolve().parents[2]


def tile_file(path: Path, n: int, bad_every: int = 0) -> list[str]:
    """n tiles (x-y-z), with a bad line after every ``bad_every`` good ones; returns the tiles."""
    tiles, lines = [], []
    for i in range(n):
        tile = f"{i % 1000}-{i // 1000}-12"
        tiles.append(tile)
        lines.append(tile)
        if bad_every and i % bad_every == bad_every - 1:
            lines.append(["1-2", "a-b-c", "5000-1-12", "1-1-99"][i % 4])
    path.write_text("\n".join(lines) + "\n")
    return tiles


def as_tiles(bodies: list[str]) -> list[str]:
    out = []
    for body in bodies:
        data = json.loads(body)
        out.append(f"{data['x']}-{data['y']}-{data['z']}")
    return out


def drain_moto(queue_url: str) -> list[str]:
    """Receive (and delete) every message. moto's receive costs O(queue depth) per call."""
    sqs = boto3.client("sqs", region_name="us-east-1")
    bodies = []
    while True:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            return bodies
        bodies += [m["Body"] for m in got]
        sqs.delete_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])


@pytest.mark.parametrize("concurrency, count", [
    ("1", 200), ("64", 200),
    # Full size: ~2 minutes, as moto's SQS slows with the queue's depth.
    # A load test of moto itself: alone, with no worker beside it to slow moto down.
    pytest.param("64", 2000, marks=[pytest.mark.slow, pytest.mark.alone], id="64-2000")])
def test_moto_every_tile_arrives_exactly_once(aws, tmp_path, monkeypatch, concurrency, count):
    monkeypatch.chdir(tmp_path)
    queue_url = boto3.client("sqs", region_name="us-east-1").create_queue(QueueName="tiles")["QueueUrl"]
    tiles = tile_file(tmp_path / "tiles.txt", count, bad_every=count // 8)
    result = CliRunner().invoke(main, ["push", "tiles.txt", queue_url, "--concurrency", concurrency])
    assert result.exit_code == 1  # the bad lines were reported and skipped
    assert f"Sent {count:,} tiles" in result.stderr
    assert "8 invalid" in result.stderr
    assert f"tiles.txt:{count // 8 + 1}: expected x-y-z" in result.stderr
    bodies = drain_moto(queue_url)
    assert Counter(as_tiles(bodies)) == Counter(tiles)
    assert bodies[0] == json.dumps(json.loads(bodies[0]), separators=(",", ":"))
    assert list(json.loads(bodies[0])) == ["x", "y", "z"]


def test_moto_queue_that_does_not_exist(aws, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tile_file(tmp_path / "tiles.txt", 20)
    result = CliRunner().invoke(main, ["push", "tiles.txt",
                                       f"{aws}/123456789012/no-such-queue"])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr and "nothing was sent" in result.stderr
    assert "Sent" not in result.output


def test_a_refused_controller_start_is_said_and_the_push_goes_on(aws, tmp_path, monkeypatch):
    """The controller's invocation refused (here: no such function, as moto answers): the push
    says so, names the schedule that will start it, and sends every tile."""
    import boto3

    from cnsq.ops.push import controller_kick, run_push

    monkeypatch.chdir(tmp_path)
    tile_file(tmp_path / "tiles.txt", 20)
    queue = boto3.client("sqs").create_queue(QueueName="tiles")["QueueUrl"]
    said: list[str] = []
    kick = controller_kick(boto3.client("lambda"), "cnsq-dev-controller", said.append)
    report = run_push("tiles.txt", queue, boto3.client("sqs"), concurrency=4, strict=False,
                      resume=False, restart=False, failed_file=None, state_dir=tmp_path / ".cnsq",
                      tty=False, say=said.append, show=said.append, kick=kick)
    assert report.sent == 20
    notes = [line for line in said if line.startswith("note:")]
    assert notes == ["note: could not start the controller cnsq-dev-controller now "
                     "(ResourceNotFoundException); it starts on its one-minute schedule"], said


@pytest.fixture
def sqs_env(monkeypatch, tmp_path):
    def make(**faults) -> SqsServer:
        server = SqsServer(**faults)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                           "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)
        servers.append(server)
        return server

    servers: list[SqsServer] = []
    yield make
    for server in servers:
        server.close()


def test_throttling_errors_and_failed_entries_still_deliver_exactly_once(sqs_env, tmp_path):
    server = sqs_env(throttle_every=7, error_every=11, fail_every=13)
    tiles = tile_file(tmp_path / "tiles.txt", 2000)
    result = CliRunner().invoke(main, ["push", "tiles.txt", server.queue_url(), "-n", "16"])
    assert result.exit_code == 0, result.output
    assert "0 failed after retries" in result.stderr
    assert Counter(as_tiles(server.bodies())) == Counter(tiles)
    assert server.failed_once  # entries really were refused once and re-sent alone


def test_strict_sends_nothing_when_a_line_is_bad(sqs_env, tmp_path):
    server = sqs_env()
    tile_file(tmp_path / "tiles.txt", 100, bad_every=50)
    result = CliRunner().invoke(main, ["push", "tiles.txt", server.queue_url(), "--strict"])
    assert result.exit_code == 1
    assert "--strict sent nothing" in result.stderr and "line 51" in result.stderr
    assert server.bodies() == []


def test_stdin(sqs_env):
    server = sqs_env()
    result = CliRunner().invoke(main, ["push", "-", server.queue_url()], input="1-2-3\n4-5-6\n")
    assert result.exit_code == 0, result.output
    assert sorted(as_tiles(server.bodies())) == ["1-2-3", "4-5-6"]


def test_tiles_failing_for_good_are_written_to_a_file(sqs_env, tmp_path):
    server = sqs_env(error_every=1)  # every call answers 500
    tile_file(tmp_path / "tiles.txt", 25)
    sqs = boto3.client("sqs", region_name="us-east-1",
                       config=botocore.config.Config(retries={"max_attempts": 1}))
    failed = tmp_path / "tiles.txt.failed"
    report = push(lambda: (tmp_path / "tiles.txt").open(), "tiles.txt", server.queue_url(), sqs,
                  concurrency=2, failed_path=failed,
                  sender=BatchSender(sqs, server.queue_url(), attempts=2, base_delay=0))
    assert report.sent == 0 and len(report.failed) == 25
    assert sorted(failed.read_text().split()) == sorted(tile for _, tile, _ in report.failed)
    assert "InternalError" in report.failed[0][2]


def _run_push(server: SqsServer, *args: str) -> subprocess.Popen:
    env = {**os.environ, "AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1"}
    return subprocess.Popen([sys.executable, "-m", "cnsq.cli", "push", "tiles.txt",
                             server.queue_url(), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _interrupt(process: subprocess.Popen, server: SqsServer, sig: int) -> None:
    deadline = time.monotonic() + 30
    while len(server.bodies()) < 300 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(sig)
    process.wait(30)


def test_interrupted_push_resumes_without_sending_a_tile_twice(sqs_env, tmp_path):
    server = sqs_env(delay=0.02)
    tiles = tile_file(tmp_path / "tiles.txt", 2000, bad_every=400)
    first = _run_push(server, "-n", "4")
    _interrupt(first, server, signal.SIGINT)
    assert first.returncode == 130
    assert "--resume" in first.stderr.read()
    assert 300 <= len(server.bodies()) < 2000

    refused = _run_push(server)  # neither --resume nor --restart: refuse to start over
    refused.wait(30)
    assert refused.returncode == 1 and "pass --resume" in refused.stderr.read()

    second = _run_push(server, "--resume", "-n", "8")
    second.wait(60)
    assert "Resuming after line" in second.stderr.read()
    assert Counter(as_tiles(server.bodies())) == Counter(tiles)

    again = _run_push(server, "--resume")  # complete: sends nothing more
    again.wait(30)
    assert Counter(as_tiles(server.bodies())) == Counter(tiles)


def test_killed_push_repeats_at_most_the_calls_in_flight(sqs_env, tmp_path):
    """Every acknowledged batch is journaled at once, so SIGKILL repeats only the batches in
    flight: at most concurrency x 10 tiles per kill (SQS has no idempotent send)."""
    server = sqs_env(delay=0.02)
    tiles = tile_file(tmp_path / "tiles.txt", 6000)
    kills = 4
    for kill in range(kills):
        process = _run_push(server, "--resume", "-n", "4")
        deadline = time.monotonic() + 30
        target = (kill + 1) * 1000
        while len(server.bodies()) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # no chance to drain or save
        process.wait(30)
    last = _run_push(server, "--resume", "-n", "4")
    last.wait(120)
    assert last.returncode == 0, last.stderr.read()
    received = Counter(as_tiles(server.bodies()))
    assert set(received) == set(tiles)  # nothing lost
    repeats = sum(received.values()) - len(tiles)
    print(f"push: {kills} SIGKILLs on {len(tiles)} tiles, -n 4: {repeats} repeated")
    assert repeats <= kills * 4 * 10


def test_resume_refuses_a_tile_file_that_changed(sqs_env, tmp_path):
    """Line numbers of a changed file name other tiles: 300 prepended lines were never sent."""
    server = sqs_env(delay=0.02)
    tile_file(tmp_path / "tiles.txt", 2000)
    first = _run_push(server, "-n", "4")
    _interrupt(first, server, signal.SIGINT)
    original = (tmp_path / "tiles.txt").read_text()
    (tmp_path / "tiles.txt").write_text("".join(f"{i}-9-12\n" for i in range(300)) + original)
    resumed = _run_push(server, "--resume")
    resumed.wait(30)
    assert resumed.returncode == 1
    error = resumed.stderr.read()
    assert "tiles.txt changed since the interrupted push" in error and "--restart" in error
    restarted = _run_push(server, "--restart", "-n", "8")
    restarted.wait(60)
    assert restarted.returncode == 0
    assert set(as_tiles(server.bodies())) >= {f"{i}-9-12" for i in range(300)}


def test_a_journal_line_cut_short_by_a_kill_is_not_trusted(tmp_path):
    checkpoint = Checkpoint(tmp_path / "c.json", "tiles.txt", "https://q", watermark=10)
    checkpoint.save()
    checkpoint.journal_path.write_text("s 11 12 13\nf 14\ns 15 1")  # the last line: cut short
    loaded = Checkpoint.load(tmp_path / "c.json")
    assert loaded.settled == {11, 12, 13, 14} and loaded.sent == 3


def test_checkpoint_lives_under_cnsq(tmp_path):
    path = Checkpoint.location(tmp_path / "tiles.txt", "https://q", tmp_path / ".cnsq")
    assert path.parent == tmp_path / ".cnsq" / "push" and path.name.startswith("tiles.txt-")


def test_a_byte_order_mark_and_a_non_utf8_byte(sqs_env, tmp_path):
    """A BOM made line 1 invalid; a byte that is not UTF-8 crashed the push mid-way with no line
    number. Now the BOM is not part of line 1 and the bad byte spoils only its own line."""
    server = sqs_env()
    (tmp_path / "tiles.txt").write_bytes(b"\xef\xbb\xbf1-2-3\n4-5-6\n7-\xff-8\n9-9-9\n")
    result = CliRunner().invoke(main, ["push", "tiles.txt", server.queue_url()])
    assert result.exit_code == 1
    assert "tiles.txt:3: expected x-y-z" in result.stderr and "Traceback" not in result.output
    assert sorted(as_tiles(server.bodies())) == ["1-2-3", "4-5-6", "9-9-9"]


def test_the_region_of_a_legacy_queue_url():
    from cnsq.cli import _queue_region

    assert _queue_region("https://sqs.eu-west-1.amazonaws.com/123456789012/q") == "eu-west-1"
    assert _queue_region("https://us-west-2.queue.amazonaws.com/123456789012/q") == "us-west-2"
    assert _queue_region("http://127.0.0.1:5000/123456789012/q") is None


def test_the_queue_comes_from_the_stack_and_an_empty_url_is_refused(project, tmp_path):
    sqs = boto3.client("sqs", region_name="us-east-1")
    template = {"Resources": {"Q": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": "cnsqdevTileQueue"}}},
                "Outputs": {"queueURL": {"Value": {"Ref": "Q"}}}}
    boto3.client("cloudformation", region_name="us-east-1").create_stack(
        StackName="cnsq-dev", TemplateBody=json.dumps(template))
    Path("tiles.txt").write_text("1-2-3\n4-5-6\n")
    result = CliRunner().invoke(main, ["push", "tiles.txt", "--config", "config/config.yml"])
    assert result.exit_code == 0, result.output
    queue = sqs.get_queue_url(QueueName="cnsqdevTileQueue")["QueueUrl"]
    assert sorted(as_tiles(drain_moto(queue))) == ["1-2-3", "4-5-6"]
    empty = CliRunner().invoke(main, ["push", "tiles.txt", ""])
    assert empty.exit_code == 1 and "QUEUE_URL is empty" in empty.stderr


def test_push_json(sqs_env, tmp_path):
    server = sqs_env()
    tile_file(tmp_path / "tiles.txt", 25, bad_every=10)
    result = CliRunner().invoke(main, ["push", "tiles.txt", server.queue_url(), "--json"])
    assert result.exit_code == 1  # two invalid lines
    report = json.loads(result.stdout)
    assert report["sent"] == 25 and len(report["invalid"]) == 2 and report["failed"] == []


def test_the_users_own_input_is_checked_before_the_environment(tmp_path, monkeypatch):
    """push with a missing file said "no AWS region" first; model with a missing folder
    complained about Docker first."""
    monkeypatch.chdir(tmp_path)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker either
    pushed = CliRunner().invoke(main, ["push", "missing.txt"])  # no queue, no config, no region
    assert pushed.exit_code == 1 and pushed.stderr == "Error: missing.txt: no such file\n"
    built = CliRunner().invoke(main, ["model", "./missing", "--push"])
    assert built.exit_code == 1
    assert built.stderr.startswith("Error: ./missing: not a folder"), built.stderr
