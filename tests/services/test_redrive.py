"""cnsq redrive against moto: every DLQ message arrives back exactly once, also across a stop.

The dead letter queue holds ``SIZE`` messages: enough for a partial run, interruptions and kills
part-way (moto's SQS costs grow with the queue's depth, so more only costs minutes). The
full-size runs (500 messages) are marked slow; CI runs them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.ops.redrive import Journal

SIZE = 120
FULL = pytest.param(500, marks=pytest.mark.slow, id="500")


@pytest.fixture
def queues(aws, tmp_path, monkeypatch, request):
    count = getattr(request, "param", SIZE)
    monkeypatch.chdir(tmp_path)
    sqs = boto3.client("sqs", region_name="us-east-1")
    dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    queue = sqs.create_queue(QueueName="tiles")["QueueUrl"]
    bodies = [json.dumps({"x": i, "y": 7, "z": 12}) for i in range(count)]
    for start in range(0, count, 10):
        sqs.send_message_batch(QueueUrl=dlq, Entries=[
            {"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start:start + 10])])
    return sqs, dlq, queue, bodies


def drain(sqs, url: str) -> list[str]:
    found = []
    while messages := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        found += [m["Body"] for m in messages]
        sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])
    return found


def redrive(dlq: str, queue: str, *args: str):
    return CliRunner().invoke(main, ["redrive", "--dlq-url", dlq, "--queue-url", queue, *args],
                              catch_exceptions=False)


def depth(sqs, url: str) -> int:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


@pytest.mark.parametrize("queues", [SIZE, FULL], indirect=True)
def test_all_arrive_exactly_once(queues):
    sqs, dlq, queue, bodies = queues
    result = redrive(dlq, queue)
    assert result.exit_code == 0, result.output
    assert f"Moved {len(bodies)} messages" in result.stdout
    assert Counter(drain(sqs, queue)) == Counter(bodies)
    assert depth(sqs, dlq) == 0


def test_stopped_part_way_and_run_again(queues):
    sqs, dlq, queue, bodies = queues
    first = redrive(dlq, queue, "--max", "23")
    assert "Moved 23 messages" in first.stdout
    assert depth(sqs, queue) == 23
    second = redrive(dlq, queue)
    assert f"Moved {len(bodies) - 23} messages" in second.stdout
    assert Counter(drain(sqs, queue)) == Counter(bodies)


def test_crash_between_send_and_delete_is_not_sent_twice(queues):
    sqs, dlq, queue, bodies = queues
    # What an interrupted run leaves: a batch sent to the tile queue, journaled, not yet deleted.
    messages = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, VisibilityTimeout=0)["Messages"]
    sqs.send_message_batch(QueueUrl=queue, Entries=[
        {"Id": str(i), "MessageBody": m["Body"]} for i, m in enumerate(messages)])
    journal = Journal.open(Path(".cnsq"), dlq)
    journal.sent.update(m["MessageId"] for m in messages)
    journal.save()
    result = redrive(dlq, queue)
    assert result.exit_code == 0
    assert "(10 sent by an interrupted run, now deleted)" in result.stdout
    assert Counter(drain(sqs, queue)) == Counter(bodies)
    assert Journal.open(Path(".cnsq"), dlq).sent == set()


def test_dry_run_moves_nothing(queues):
    sqs, dlq, queue, bodies = queues
    result = redrive(dlq, queue, "--dry-run")
    assert result.exit_code == 0
    assert f"{len(bodies)} messages in" in result.stdout and '{"x":' in result.stdout
    assert depth(sqs, queue) == 0 and depth(sqs, dlq) == len(bodies)


def test_queues_from_the_deployed_stack(project):
    assert CliRunner().invoke(main, ["deploy"]).exit_code == 0
    sqs = boto3.client("sqs", region_name="us-east-1")
    urls = sqs.list_queues()["QueueUrls"]
    dlq = next(u for u in urls if "DeadLetter" in u)
    tiles = next(u for u in urls if "TileQueue" in u)
    sqs.send_message(QueueUrl=dlq, MessageBody='{"x": 1, "y": 2, "z": 3}')
    result = CliRunner().invoke(main, ["redrive"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert drain(sqs, tiles) == ['{"x": 1, "y": 2, "z": 3}']


def test_interrupted_with_ctrl_c_and_run_again(queues, aws):
    import os
    import signal
    import subprocess
    import sys
    import time

    sqs, dlq, queue, bodies = queues
    env = {**os.environ, "AWS_ENDPOINT_URL": aws}
    command = [sys.executable, "-m", "cnsq.cli", "redrive", "--dlq-url", dlq, "--queue-url", queue]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 60
    while depth(sqs, queue) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 1 and "Interrupted" in err
    moved = int(out.split("Moved ")[1].split()[0].replace(",", ""))
    assert 20 <= moved < len(bodies)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert Counter(drain(sqs, queue)) == Counter(bodies)
    assert depth(sqs, dlq) == 0


def test_a_batch_killed_during_its_send_is_sent_again_at_most_once(queues):
    """The intent is journaled before send_message_batch: a re-run knows that batch's fate is
    unknown, sends it again, and says so (SQS has no idempotent send: one batch may repeat)."""
    sqs, dlq, queue, bodies = queues
    messages = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, VisibilityTimeout=0)["Messages"]
    sqs.send_message_batch(QueueUrl=queue, Entries=[  # it did arrive before the kill
        {"Id": str(i), "MessageBody": m["Body"]} for i, m in enumerate(messages)])
    journal = Journal.open(Path(".cnsq"), dlq)
    journal.intent = {m["MessageId"] for m in messages}
    journal.save()
    result = redrive(dlq, queue)
    assert result.exit_code == 0, result.output
    assert "A killed run was sending 10 message(s)" in result.stderr and "10 were sent again" in result.stderr
    received = Counter(drain(sqs, queue))
    assert set(received) == set(bodies) and sum(received.values()) == len(bodies) + 10  # one batch, twice
    assert Journal.open(Path(".cnsq"), dlq).intent == set()


def test_a_rerun_does_not_say_done_while_messages_are_still_invisible(queues):
    sqs, dlq, queue, bodies = queues
    held = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, VisibilityTimeout=300)["Messages"]
    result = redrive(dlq, queue)
    assert result.exit_code == 1
    assert f"Moved {len(bodies) - 10} messages" in result.stdout
    assert "10 message(s) of the DLQ are still invisible" in result.stderr
    assert len(held) == 10


@pytest.mark.parametrize("queues", [SIZE, FULL], indirect=True)
def test_repeats_after_hard_kills_are_at_most_one_batch_each(queues, aws):
    import os
    import signal
    import subprocess
    import sys
    import time

    sqs, dlq, queue, bodies = queues
    env = {**os.environ, "AWS_ENDPOINT_URL": aws}
    command = [sys.executable, "-m", "cnsq.cli", "redrive", "--dlq-url", dlq, "--queue-url", queue,
               "--visibility-timeout", "1"]
    kills, step = (4, 60) if len(bodies) >= 500 else (3, 20)
    for kill in range(kills):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while depth(sqs, queue) < step * (kill + 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    time.sleep(1.5)  # the killed runs' messages become visible again
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    received = Counter(drain(sqs, queue))
    assert set(received) == set(bodies) and depth(sqs, dlq) == 0  # nothing lost
    repeats = sum(received.values()) - len(bodies)
    print(f"redrive: {kills} SIGKILLs on {len(bodies)} messages: {repeats} repeated")
    assert repeats <= kills * 10
