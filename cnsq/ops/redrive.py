"""``cnsq redrive``: move the dead letter queue's messages back to the tile queue, none lost.

Each batch is received from the DLQ, sent to the tile queue, and only then deleted from the DLQ,
so stopping at any point loses nothing. The journal (``.cnsq/redrive/``) records a batch's ids
*before* it is sent (the intent) and again once SQS acknowledged it: a re-run deletes the
acknowledged ones instead of sending them twice. SQS has no idempotent send, so a run killed
during ``send_message_batch`` cannot know whether that batch arrived: the re-run sends it again
and says so — at most one batch (10 messages) repeated per hard kill. Ctrl-C finishes the batch
in hand first. A run that finds the DLQ empty while some of its messages are still invisible
(held by a killed run until their visibility timeout) reports them and exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cnsq.aws import Client
from cnsq.files import atomic_write


@dataclass
class Journal:
    """DLQ message ids sent to the tile queue but not yet deleted from the DLQ."""

    path: Path
    sent: set[str] = field(default_factory=set)
    # Ids of the batch being sent: saved before send_message_batch, cleared once it answered.
    intent: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, root: Path, dlq_url: str) -> Journal:
        key = hashlib.sha256(dlq_url.encode()).hexdigest()[:12]
        path = root / "redrive" / f"{key}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        return cls(path, set(data.get("sent", [])), set(data.get("intent", [])))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as handle:
            handle.write(json.dumps({"sent": sorted(self.sent), "intent": sorted(self.intent)}))


@dataclass
class RedriveReport:
    moved: int = 0
    already_sent: int = 0
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False
    # A killed run's batch whose send was not acknowledged: if those come back they are sent
    # again (at most one batch may then arrive twice).
    uncertain: int = 0
    resent: int = 0
    # DLQ messages still invisible when this run found nothing more to receive.
    invisible: int = 0


def _delete(sqs: Client, queue_url: str, messages: list[dict]) -> None:
    if messages:
        sqs.delete_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])


def redrive(sqs: Client, dlq_url: str, queue_url: str, journal: Journal, *, limit: int | None = None,
            visibility_timeout: int = 60, wait_seconds: int = 1) -> RedriveReport:
    """Move up to ``limit`` messages (all by default) from ``dlq_url`` to ``queue_url``."""
    report = RedriveReport(uncertain=len(journal.intent))
    uncertain = set(journal.intent)
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.is_set() and (limit is None or report.moved < limit):
            want = 10 if limit is None else min(10, limit - report.moved)
            messages = sqs.receive_message(
                QueueUrl=dlq_url, MaxNumberOfMessages=want, WaitTimeSeconds=wait_seconds,
                VisibilityTimeout=visibility_timeout, MessageAttributeNames=["All"],
            ).get("Messages", [])
            if not messages:
                break
            done = [m for m in messages if m["MessageId"] in journal.sent]
            fresh = [m for m in messages if m["MessageId"] not in journal.sent]
            report.already_sent += len(done)
            if fresh:
                report.resent += sum(m["MessageId"] in uncertain for m in fresh)
                journal.intent = {m["MessageId"] for m in fresh}
                journal.save()  # before the send: a kill during it is known to the re-run
                response = sqs.send_message_batch(QueueUrl=queue_url, Entries=[
                    {"Id": str(i), "MessageBody": m["Body"],
                     **({"MessageAttributes": m["MessageAttributes"]}
                        if m.get("MessageAttributes") else {})}
                    for i, m in enumerate(fresh)])
                ok = {int(item["Id"]) for item in response.get("Successful", [])}
                sent = [m for i, m in enumerate(fresh) if i in ok]
                report.failed += [m["MessageId"] for i, m in enumerate(fresh) if i not in ok]
                journal.sent.update(m["MessageId"] for m in sent)
                journal.intent = set()
                journal.save()  # before the delete: a re-run must not send these again
                done += sent
                report.moved += len(sent)
            _delete(sqs, dlq_url, done)
            journal.sent.difference_update(m["MessageId"] for m in done)
            journal.save()
        if not stop.is_set() and (limit is None or report.moved < limit):
            counts = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=[
                "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
            report.invisible = int(counts.get("ApproximateNumberOfMessagesNotVisible", 0))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    report.interrupted = stop.is_set()
    return report


def sample(sqs: Client, dlq_url: str, count: int = 10) -> tuple[int, list[str]]:
    """(approximate depth, up to ``count`` bodies) without keeping anything invisible."""
    depth = int(sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=[
        "ApproximateNumberOfMessages"])["Attributes"]["ApproximateNumberOfMessages"])
    messages = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=min(count, 10),
                                   VisibilityTimeout=0).get("Messages", [])
    return depth, [m["Body"] for m in messages]
