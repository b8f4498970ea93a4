"""``cnsq work``: poll an SQS queue and run the Lambda's handler in-process, as the event source
mapping would: batches of real SQS records in, the records that succeeded deleted, failures left
to come back and, after ``maxReceiveCount``, move to the dead letter queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cnsq.aws import Client
from cnsq.interrupt import Stop
from download_and_predict.masking import mask


@dataclass
class WorkReport:
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # One line per poller thread that stopped on an error (its messages return to the queue).
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, received: int, failures: dict[str, str]) -> None:
        with self.lock:
            self.received += received
            self.failed += len(failures)
            self.succeeded += received - len(failures)
            for reason in failures.values():
                self.reasons[reason] = self.reasons.get(reason, 0) + 1


def to_record(message: dict, queue_arn: str, region: str) -> dict:
    """An SQS message as the Lambda event source mapping delivers it."""
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message.get("Attributes", {}),
        "messageAttributes": message.get("MessageAttributes", {}),
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }


def work(sqs: Client, queue_url: str, app: Any, *, concurrency: int = 4, batch_size: int = 10,
         wait_seconds: int = 20, until_empty: bool = False,
         stop: threading.Event | None = None,
         progress: Callable[[WorkReport], None] | None = None,
         auto: Any = None) -> WorkReport:
    """Poll until stopped (or, with ``until_empty``, until nothing is waiting or in flight: the
    queue is asked every second, so the end is not held by a last long poll).

    ``auto`` (a :class:`cnsq.local.pipeline.AutoConcurrency`): ``concurrency`` pollers are
    started, and only the first ``auto.limit`` of them receive; the controller moves the limit
    from the calls' durations and failures, the model's busy share and the queue's depth."""
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    queue_arn = attributes["Attributes"]["QueueArn"]
    region = queue_arn.split(":")[3] if queue_arn.count(":") >= 5 else ""
    report = WorkReport()
    stop = stop or threading.Event()
    busy = [0]  # pollers holding messages (a poller in a long poll holds none)

    def drained() -> bool:
        counts = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed"])["Attributes"]
        return all(int(v) == 0 for v in counts.values())

    def poll(index: int) -> None:
        """One poller; an error stops it loudly (recorded in the report), never silently."""
        try:
            poll_until_stopped(index)
        except Exception as exc:  # noqa: BLE001 - reported by the caller, which exits non-zero

            text = mask(str(exc)).splitlines()[0] if str(exc) else ""
            with report.lock:
                report.errors.append(f"{type(exc).__name__}: {text}")

    def poll_until_stopped(index: int) -> None:
        while not stop.is_set():
            if auto is not None and index >= auto.limit:
                stop.wait(0.2)  # above the controller's limit: take nothing
                continue
            messages = sqs.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=batch_size, WaitTimeSeconds=wait_seconds,
                AttributeNames=["All"], MessageAttributeNames=["All"]).get("Messages", [])
            if not messages:
                if until_empty and drained():
                    stop.set()
                continue
            with report.lock:
                busy[0] += 1
            try:
                began = time.monotonic()
                outcome = app.process({"Records": [to_record(m, queue_arn, region)
                                                   for m in messages]})
                if auto is not None:
                    with report.lock:
                        auto.finished(time.monotonic() - began, outcome.failed.values(),
                                      outcome.written)
                done = [m for m in messages if m["MessageId"] not in outcome.failed]
                for start in range(0, len(done), 10):
                    sqs.delete_message_batch(QueueUrl=queue_url, Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(done[start:start + 10])])
                report.add(len(messages), outcome.failed)
            finally:
                with report.lock:
                    busy[0] -= 1
            if progress:
                progress(report)


    threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    def idle() -> bool:
        with report.lock:
            return busy[0] == 0

    checked = time.monotonic()
    with Stop() as signalled:
        while any(t.is_alive() for t in threads) and not signalled.requested:
            time.sleep(0.1)
            if auto is not None and time.monotonic() - auto.last >= auto.interval:
                counts = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
                with report.lock:
                    auto.tick(0, int(counts["ApproximateNumberOfMessagesNotVisible"]),
                              backlog=int(counts["ApproximateNumberOfMessages"]))
            if until_empty and time.monotonic() - checked >= 1.0:
                # The queue is asked here too, every second: the pollers' last long polls would
                # otherwise hold the end for up to wait_seconds after the work is done. Twice,
                # a second apart, as SQS's counts are approximate.
                checked = time.monotonic()
                if idle() and drained():
                    time.sleep(1.0)
                    if idle() and drained():
                        stop.set()
            if stop.is_set() and idle():
                break  # pollers still in a long poll hold no message: nothing to wait for
    if signalled.requested:
        # Ctrl-C or SIGTERM: take no more. A poller in a long poll would hold the exit for up
        # to wait_seconds; batches in hand get two seconds to finish, and what is abandoned
        # is neither written nor deleted, so SQS delivers it again after its visibility timeout.
        stop.set()
        report.interrupted = True
        give_up = time.monotonic() + 2
        for thread in threads:
            thread.join(max(0.0, give_up - time.monotonic()))
    return report
