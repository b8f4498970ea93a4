"""``cnsq push``: send a tile list to the SQS queue, fast, exactly once from our side, resumable.

Batches of 10 go out with ``send_message_batch``, ``concurrency`` calls in flight. A response's
``Failed`` entries are re-sent alone (those the sender caused are not: they would fail again);
throttling and network errors back off and retry. Tiles that still fail are written to a file to
push again. Progress is checkpointed: the *watermark* is the last line up to which every line is
settled (sent, invalid or finally failed), plus the settled lines beyond it, so ``--resume``
skips exactly what was acknowledged. Ctrl-C and SIGTERM drain the calls in flight before the
checkpoint is written, so an interrupted push resumes without sending a tile twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import botocore.exceptions

from cnsq.aws import Client
from cnsq.errors import CnsqError, option
from cnsq.files import atomic_write
from cnsq.interrupt import Stop
from cnsq.tiles import Line, read_lines, tile_id

BATCH = 10
FATAL_CODES = {"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", "AccessDenied",
               "AccessDeniedException", "InvalidAddress", "InvalidSecurity"}


class PushError(CnsqError):
    """The push cannot start or must stop (no such queue, bad lines with --strict, …)."""


@dataclass
class Report:
    """What a push did."""

    sent: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # line, tile, reason
    resumed_from: int = 0
    skipped: int = 0
    interrupted: bool = False
    failed_file: Path | None = None
    checkpoint: Path | None = None


@dataclass
class Checkpoint:
    """Which lines of a tile file are settled, saved atomically as JSON."""

    path: Path
    source: str
    queue_url: str
    watermark: int = 0
    settled: set[int] = field(default_factory=set)
    sent: int = 0
    complete: bool = False
    fingerprint: str | None = None  # sha256 of the tile file: a resume refuses a changed file
    _journal: IO[str] | None = field(default=None, repr=False)

    @property
    def journal_path(self) -> Path:
        return self.path.with_suffix(".journal")

    @classmethod
    def location(cls, tiles: Path, queue_url: str, root: Path) -> Path:
        key = hashlib.sha256(f"{tiles.resolve()}|{queue_url}".encode()).hexdigest()[:12]
        return root / "push" / f"{tiles.name}-{key}.json"

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """The saved checkpoint plus every batch its journal recorded after it."""
        data = json.loads(path.read_text())
        checkpoint = cls(path, data["source"], data["queue_url"], data["watermark"],
                         set(data["settled"]), data.get("sent", 0), data.get("complete", False),
                         data.get("fingerprint"))
        if checkpoint.journal_path.exists():
            # Only whole lines: one cut short by a kill ends without "\n" and is dropped (its
            # batch is sent again).
            for entry in checkpoint.journal_path.read_text().split("\n")[:-1]:
                kind, _, numbers = entry.partition(" ")
                if kind not in ("s", "f"):
                    continue
                try:
                    settled = [int(n) for n in numbers.split()]
                except ValueError:
                    continue
                new = [n for n in settled if n > checkpoint.watermark and n not in checkpoint.settled]
                checkpoint.settled.update(new)
                if kind == "s":
                    checkpoint.sent += len(new)
        return checkpoint

    def record(self, sent: list[int], failed: list[int]) -> None:
        """Append one acknowledged batch to the journal, at once. A push killed with SIGKILL
        then repeats only the batches it had in flight, not everything since the last save."""
        if self._journal is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._journal = self.journal_path.open("a", encoding="utf-8")
        for kind, numbers in (("s", sent), ("f", failed)):
            if numbers:
                self._journal.write(f"{kind} {' '.join(map(str, numbers))}\n")
        self._journal.flush()  # into the kernel: it survives the process, SIGKILL included

    def save(self) -> None:
        """Write the whole state atomically, then empty the journal it now includes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as handle:
            handle.write(json.dumps({
            "source": self.source, "queue_url": self.queue_url, "watermark": self.watermark,
            "settled": sorted(self.settled), "sent": self.sent, "complete": self.complete,
            "fingerprint": self.fingerprint}))
        if self._journal is not None:
            self._journal.truncate(0)
        elif self.journal_path.exists():
            self.journal_path.unlink()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


def message_body(line: Line) -> str:
    tile = line.tile
    if tile is None:
        raise ValueError(f"line {line.number} holds no tile: {line.error}")
    return json.dumps({"x": tile.x, "y": tile.y, "z": tile.z}, separators=(",", ":"))


class BatchSender:
    """Sends one batch until every entry is sent or has failed for good."""

    def __init__(self, sqs: Client, queue_url: str, attempts: int = 8, base_delay: float = 0.2,
                 sleep: Callable[[float], None] = time.sleep):
        self.sqs = sqs
        self.queue_url = queue_url
        self.attempts = attempts
        self.base_delay = base_delay
        self.sleep = sleep

    def send(self, lines: list[Line]) -> tuple[list[int], list[tuple[int, str]]]:
        """Returns (sent line numbers, [(line number, reason)] failed for good)."""
        pending = {str(line.number): line for line in lines}
        sent: list[int] = []
        failed: list[tuple[int, str]] = []
        reasons: dict[str, str] = {}
        for attempt in range(self.attempts):
            if not pending:
                break
            if attempt:
                self.sleep(self.base_delay * 2 ** (attempt - 1) * (0.5 + random.random()))
            entries = [{"Id": key, "MessageBody": message_body(line)} for key, line in pending.items()]
            try:
                response = self.sqs.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in FATAL_CODES:
                    raise
                reasons = dict.fromkeys(pending, f"{code or 'error'} (after retries)")
                continue
            except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
                reasons = dict.fromkeys(pending, f"network: {type(exc).__name__} (after retries)")
                continue
            for ok in response.get("Successful", []):
                if ok["Id"] in pending:
                    sent.append(pending.pop(ok["Id"]).number)
            for bad in response.get("Failed", []):
                if bad.get("SenderFault") and bad["Id"] in pending:
                    line = pending.pop(bad["Id"])
                    failed.append((line.number, f"{bad.get('Code')}: {bad.get('Message', '')}"))
                else:
                    reasons[bad["Id"]] = f"{bad.get('Code', 'Failed')} (after retries)"
        for key, line in pending.items():
            failed.append((line.number, reasons.get(key, "not acknowledged")))
        return sent, failed


def _batches(lines: Iterator[Line], report: Report, skip: set[int]) -> Iterator[list[Line]]:
    batch: list[Line] = []
    for line in lines:
        if line.number in skip:
            report.skipped += 1
            continue
        if line.tile is None:
            report.invalid.append((line.number, line.error or "invalid"))
            continue
        batch.append(line)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def push(
    open_tiles: Callable[[], IO[str]],
    source: str,
    queue_url: str,
    sqs: Client,
    *,
    concurrency: int = 16,
    strict: bool = False,
    checkpoint: Checkpoint | None = None,
    failed_path: Path | None = None,
    progress: Callable[[Report, int], None] | None = None,
    sender: BatchSender | None = None,
    on_first_sent: Callable[[], None] | None = None,
) -> Report:
    """Push the tiles of ``open_tiles()`` to ``queue_url``.

    ``checkpoint`` (None for stdin) is resumed from when it has progress. ``progress(report,
    lines_read)`` is called at most a few times a second; ``on_first_sent()`` once, when the
    queue has accepted the first tiles.

    Raises:
        PushError: the queue does not exist or refuses us; with ``strict``, any bad line.
    """
    try:
        sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in FATAL_CODES or "NonExistentQueue" in code:
            raise PushError(f"queue {queue_url} does not exist or is not yours ({code}); "
                            "nothing was sent") from None
        raise
    report = Report(checkpoint=checkpoint.path if checkpoint else None)
    if strict:
        with open_tiles() as stream:
            bad = [(ln.number, ln.error or "") for ln in read_lines(stream) if ln.tile is None]
        if bad:
            report.invalid = bad
            raise PushError(f"{len(bad)} invalid line(s) in {source} (first: line {bad[0][0]}: "
                            f"{bad[0][1]}); {option('strict')} sent nothing")
    start_after, skip = 0, set()
    if checkpoint:
        start_after, skip = checkpoint.watermark, set(checkpoint.settled)
        report.resumed_from = start_after
        report.sent = checkpoint.sent
    sender = sender or BatchSender(sqs, queue_url)
    failed_out = None
    in_flight: dict[Future, list[Line]] = {}
    pending_lines: set[int] = set()
    settled_beyond: set[int] = set(skip)
    lines_read = start_after
    last_save = last_progress = time.monotonic()
    first_told: list[bool] = []

    def settle(numbers: list[int]) -> None:
        pending_lines.difference_update(numbers)
        settled_beyond.update(numbers)

    def watermark() -> int:
        return (min(pending_lines) - 1) if pending_lines else lines_read

    def save(complete: bool = False) -> None:
        if checkpoint is None:
            return
        mark = watermark()
        checkpoint.watermark = mark
        checkpoint.settled = {n for n in settled_beyond if n > mark}
        settled_beyond.intersection_update(checkpoint.settled)
        checkpoint.sent = report.sent
        checkpoint.complete = complete
        checkpoint.save()

    def collect(done: set[Future]) -> None:
        nonlocal failed_out
        for future in done:
            batch = in_flight.pop(future)
            sent, failed = future.result()
            report.sent += len(sent)
            if sent and on_first_sent is not None and not first_told:
                first_told.append(True)
                on_first_sent()
            settle(sent)
            if failed:
                if failed_out is None and failed_path is not None:
                    failed_out = failed_path.open("a", encoding="utf-8")
                by_number = {line.number: line for line in batch}
                for number, reason in failed:
                    tile = by_number[number].tile
                    report.failed.append((number, tile_id(tile), reason))
                    if failed_out:
                        failed_out.write(tile_id(tile) + "\n")
                settle([n for n, _ in failed])
            if checkpoint is not None:
                checkpoint.record(sent, [n for n, _ in failed])

    stream = open_tiles()
    try:
        with Stop() as stop, ThreadPoolExecutor(max_workers=concurrency) as pool:
            counted = _counting(read_lines(stream, start_after))
            for batch in _batches(counted, report, skip):
                if stop.requested:
                    report.interrupted = True
                    break
                lines_read = counted.last
                pending_lines.update(line.number for line in batch)
                in_flight[pool.submit(sender.send, batch)] = batch
                if len(in_flight) >= concurrency:
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    collect(done)
                now = time.monotonic()
                if now - last_save > 0.5:
                    save()
                    last_save = now
                if progress and now - last_progress > 0.25:
                    progress(report, counted.last)
                    last_progress = now
            report.interrupted = report.interrupted or stop.requested
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                collect(done)
            if not report.interrupted:
                lines_read = counted.last
            save(complete=not report.interrupted)
    except botocore.exceptions.ClientError as exc:
        save()
        code = exc.response.get("Error", {}).get("Code", "")
        raise PushError(f"the queue refused the push ({code}): "
                        f"{exc.response.get('Error', {}).get('Message', '')}; "
                        f"{report.sent} tiles were sent before it") from None
    finally:
        stream.close()
        if failed_out:
            failed_out.close()
        if checkpoint is not None:
            checkpoint.close()
    if progress:
        progress(report, lines_read)
    if report.failed:
        report.failed_file = failed_path
    return report


class _counting:
    """Wraps the line iterator to remember the last line number read."""

    def __init__(self, lines: Iterator[Line]):
        self.lines = lines
        self.last = 0

    def __iter__(self) -> _counting:
        return self

    def __next__(self) -> Line:
        line = next(self.lines)
        self.last = line.number
        return line


def count_lines(path: Path) -> tuple[int, str]:
    """Lines in a file (for the ETA) and the SHA-256 of its bytes (to tell a changed file),
    read once in blocks."""
    total = 0
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            total += block.count(b"\n")
            digest.update(block)
    return total, digest.hexdigest()


def default_concurrency() -> int:
    """PROMISE_THRESHOLD as in the original, else 16."""
    value = os.environ.get("PROMISE_THRESHOLD", "")
    return int(value) if value.isdigit() and int(value) > 0 else 16


def check_source(tiles: str) -> None:
    """Refuse a tile file that is not there, before anything else is asked (the queue, the
    region, the stack): the user's own input is the first thing to check.

    Raises:
        PushError: no such file.
    """
    if tiles != "-" and not Path(tiles).is_file():
        raise PushError(f"{tiles}: no such file")


def run_push(tiles: str, queue_url: str, sqs: Client, *, concurrency: int, strict: bool,
             resume: bool, restart: bool, failed_file: Path | None, state_dir: Path,
             tty: bool, say: Callable[[str], None], show: Callable[[str], None],
             kick: Callable[[int], None] | None = None) -> Report:
    """The `cnsq push` command: checkpoint policy, progress line, summary; returns the report
    (everything went when it has no invalid line, no failure and no interruption).

    ``say`` writes a line for the user; ``show`` rewrites the progress line in place (the CLI
    gives both, to stderr). ``kick(tiles)``: told once the queue takes the first tiles, with the
    lines this push will send (the stack's controller: :func:`controller_kick`)."""

    if tiles == "-":
        if resume:
            raise PushError(f"{option('resume')} needs a file: a push from stdin cannot be resumed")
        lines = sys.stdin.read().removeprefix("\ufeff").splitlines(keepends=True)  # read once

        def opener() -> IO[str]:
            return io.StringIO("".join(lines))

        checkpoint, total, failed_path = None, len(lines), failed_file or Path("push.failed")
    else:
        path = Path(tiles)
        check_source(tiles)

        def opener() -> IO[str]:
            # utf-8-sig: a byte order mark is not part of line 1; surrogateescape: a byte that
            # is not UTF-8 makes its own line invalid (reported with its number), not the push.
            return path.open(encoding="utf-8-sig", errors="surrogateescape")

        total, fingerprint = count_lines(path)
        failed_path = failed_file or path.with_name(path.name + ".failed")
        location = Checkpoint.location(path, queue_url, state_dir)
        checkpoint = Checkpoint(location, str(path), queue_url, fingerprint=fingerprint)
        if location.exists() and not restart:
            previous = Checkpoint.load(location)
            if resume and previous.fingerprint not in (None, fingerprint):
                raise PushError(
                    f"{tiles} changed since the interrupted push ({previous.sent:,} tiles sent, "
                    f"up to line {previous.watermark:,}): its line numbers no longer name the "
                    f"same tiles, so resuming could skip or repeat some; pass {option('restart')} to send "
                    "the whole file again, or restore the file as it was")
            if resume:
                checkpoint = previous
                checkpoint.fingerprint = fingerprint
                state = "complete" if previous.complete else f"{previous.sent:,} tiles sent"
                say(f"Resuming after line {previous.watermark:,} ({state}).")
            elif not previous.complete:
                raise PushError(
                    f"an interrupted push of {tiles} to this queue exists ({previous.sent:,} tiles "
                    f"sent, up to line {previous.watermark:,}); pass {option('resume')} to continue it "
                    f"or {option('restart')} to send everything again")
        elif resume:
            say("No earlier push of this file to this queue: starting from the top.")
    if failed_path.exists() and not (resume and checkpoint and checkpoint.sent):
        failed_path.unlink()  # a fresh push starts a fresh list of failures

    started = time.monotonic()
    sent_before = checkpoint.sent if checkpoint else 0

    def progress(report: Report, lines_read: int) -> None:
        if not tty:
            return
        elapsed = max(time.monotonic() - started, 1e-6)
        rate = (report.sent - sent_before) / elapsed
        left = max(total - lines_read, 0)
        eta = f", ETA {int(left / rate // 60)}m{int(left / rate % 60):02d}s" if rate > 0 else ""
        show(f"\rsent {report.sent:,} tiles ({rate:,.0f}/s), line {lines_read:,}/{total:,}, "
             f"invalid {len(report.invalid):,}, failed {len(report.failed):,}{eta}   ")

    to_send = max(0, total - (checkpoint.watermark if checkpoint else 0))
    report = push(opener, tiles, queue_url, sqs, concurrency=concurrency, strict=strict,
                  checkpoint=checkpoint, failed_path=failed_path, progress=progress,
                  on_first_sent=(lambda: kick(to_send)) if kick else None)
    if tty:
        say("")
    for number, error in report.invalid[:20]:
        say(f"{tiles}:{number}: {error}")
    if len(report.invalid) > 20:
        say(f"… and {len(report.invalid) - 20:,} more invalid lines")
    elapsed = time.monotonic() - started
    rate = (report.sent - sent_before) / elapsed if elapsed else 0.0
    summary = (f"Sent {report.sent - sent_before:,} tiles in {elapsed:.1f}s ({rate:,.0f} tiles/s)"
               f"{f' ({report.sent:,} in all)' if sent_before else ''}; "
               f"{len(report.invalid):,} invalid; {len(report.failed):,} failed after retries")
    if report.failed:
        summary += f" (written to {failed_path}: push them again with `cnsq push {failed_path} …`)"
    if report.interrupted:
        summary += f". Interrupted: continue with `cnsq push {tiles} {queue_url} --resume`"
    say(summary + ".")
    return report


def controller_kick(lambda_client: Client, function: str, say: Callable[[str], None],
                    clock: Callable[[], float] = time.time) -> Callable[[int], None]:
    """What tells the stack's controller a push has begun: an asynchronous invocation (the
    function's one reserved execution queues it behind a running one) saying how many tiles,
    and when. Without it the controller's first look comes on its schedule, up to a minute
    later, and reads SQS's counts, which trail the queue by about a minute. A refusal is said
    and the push goes on: the schedule still comes."""

    def kick(tiles: int) -> None:
        payload = json.dumps({"cnsq": "pushed", "tiles": tiles, "at": clock()})
        try:
            lambda_client.invoke(FunctionName=function, InvocationType="Event",
                                 Payload=payload.encode())
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            code = (exc.response.get("Error", {}).get("Code", "")
                    if isinstance(exc, botocore.exceptions.ClientError) else type(exc).__name__)
            say(f"note: could not start the controller {function} now ({code}); it starts on "
                "its one-minute schedule")

    return kick
