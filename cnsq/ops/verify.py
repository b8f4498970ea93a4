"""``cnsq verify``: check that each part of a deployed stack works, and say which does not.

Every check runs for real and can fail: the stack's status, the queues, the results table, the
model's status path, a sample tile from the imagery endpoint, and a prediction for that tile.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from cnsq.aws import Client
from cnsq.errors import CnsqError, option
from cnsq.results.store import open_store
from cnsq.stack import logical_ids
from cnsq.tiles import parse_tile_id
from download_and_predict.masking import mask
from download_and_predict.tiles import (
    Tile,
    imagery_url,
    is_image,  # one definition, the Lambda's
)


class CheckFailed(CnsqError):
    """One check's ✗, with what was found."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Target:
    """What to verify; values come from the stack's outputs, the config or the options."""

    stack_name: str | None  # None: check the given targets only (no stack)
    stack_status: str | None
    queue_url: str | None
    dead_letter_url: str | None
    database_url: Callable[[], str] | None
    model_endpoint: str | None  # …/v1/models/NAME (no :predict)
    tile_url: str | None  # the sample tile's URL, token filled in
    tile_id: str
    admin: Any = None  # the stack's AdminFunction: counts rows of a private database in the VPC


def _check(name: str, fn: Callable[[], str], name_of: Callable[[str], str]) -> Check:
    try:
        return Check(name, True, mask(fn()))
    except Exception as exc:  # noqa: BLE001 - any failure is this check's ✗
        said = exc.worded(name_of) if isinstance(exc, CnsqError) else str(exc)
        text = mask(said).splitlines()[0] if said else type(exc).__name__
        return Check(name, False, text)


def run_checks(target: Target, sqs: Client, session: requests.Session | None = None,
               timeout: float = 20.0, name_of: Callable[[str], str] = lambda name: name
               ) -> list[Check]:
    """Each check of ``target`` in turn. ``name_of`` words the parameters a failure names
    (the CLI gives its flags)."""
    session = session or requests.Session()
    checks: list[Check] = []

    def stack() -> str:
        if target.stack_status is None:
            raise CheckFailed(f"stack {target.stack_name} does not exist")
        if target.stack_status not in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
            raise CheckFailed(f"stack {target.stack_name} is {target.stack_status}")
        return f"{target.stack_name} is {target.stack_status}"

    def queue(url: str | None, what: str) -> Callable[[], str]:
        def run() -> str:
            if not url:
                raise CheckFailed(f"no {what} URL (stack output missing)")
            attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
                "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
            visible = int(attrs.get("ApproximateNumberOfMessages", 0))
            flight = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
            note = ""
            if what == "dead letter queue" and visible:
                note = " (tiles that failed maxReceiveCount times)"
            return f"{url.rsplit('/', 1)[-1]}: {visible:,} waiting, {flight:,} in flight{note}"
        return run

    def results() -> str:
        if target.admin is not None and target.database_url is None:
            answer = target.admin.call("count")
            if answer["problems"]:
                raise CheckFailed("; ".join(answer["problems"]))
            return f"results(tile, output) exists with {answer['rows']:,} rows (via {target.admin.name})"
        if target.database_url is None:
            raise CheckFailed(f"no database (stack output missing; pass {option('database_url')})")
        store = open_store(target.database_url())
        try:
            problems = store.check_schema()
            if problems:
                raise CheckFailed("; ".join(problems))
            return f"results(tile, output) exists with {store.count():,} rows"
        finally:
            store.close()

    def model() -> str:
        if not target.model_endpoint:
            raise CheckFailed("no model endpoint (stack output missing)")
        response = session.get(target.model_endpoint, timeout=timeout)
        if response.status_code != 200:
            raise CheckFailed(f"GET {target.model_endpoint} answered HTTP {response.status_code}")
        states = [v.get("state") for v in response.json().get("model_version_status", [])]
        return f"{target.model_endpoint} answered 200 ({', '.join(states) or 'no version status'})"

    image: dict[str, bytes] = {}

    def imagery() -> str:
        if not target.tile_url:
            raise CheckFailed(f"no TILE_ENDPOINT in the config (pass {option('tile_endpoint')})")
        response = session.get(target.tile_url, timeout=timeout)
        if response.status_code != 200:
            raise CheckFailed(f"tile {target.tile_id} answered HTTP {response.status_code}")
        kind = response.headers.get("Content-Type", "")
        if not is_image(response.content):
            raise CheckFailed(f"tile {target.tile_id} is not an image ({kind or 'no type'})")
        image["bytes"] = response.content
        return f"tile {target.tile_id}: {len(response.content):,} bytes of {kind or 'image'}"

    def prediction() -> str:
        if "bytes" not in image:
            raise CheckFailed("no sample image to predict on (see the imagery check)")
        if not target.model_endpoint:
            raise CheckFailed("no model endpoint")
        payload = {"instances": [{"image_bytes": {"b64": base64.b64encode(image["bytes"]).decode()}}]}
        url = target.model_endpoint + ":predict"
        response = session.post(url, json=payload, timeout=timeout)
        if response.status_code != 200:
            raise CheckFailed(f"POST {url} answered HTTP {response.status_code}: "
                               f"{response.text[:120]}")
        predictions = response.json().get("predictions")
        if not isinstance(predictions, list) or len(predictions) != 1:
            raise CheckFailed(f"expected one prediction, got {predictions!r:.120}")
        return f"tile {target.tile_id} → {str(predictions[0])[:80]}"

    if target.stack_name is not None:  # None: a local setup, no stack to check
        checks.append(_check("stack", stack, name_of))
        checks.append(_check("tile queue", queue(target.queue_url, "tile queue"), name_of))
        checks.append(_check("dead letter queue", queue(target.dead_letter_url, "dead letter queue"),
                             name_of))
    checks.append(_check("results table", results, name_of))
    checks.append(_check("model status", model, name_of))
    checks.append(_check("imagery", imagery, name_of))
    checks.append(_check("prediction", prediction, name_of))
    return checks


def tile_url_from_template(template: str, tile_id: str, token: str | None = None) -> str:
    """The sample tile's URL, filled in as the Lambda fills it (both template forms, {s})."""

    tile = parse_tile_id(tile_id)
    return imagery_url(template, Tile(tile.x, tile.y, tile.z), token)


def build_target(deployed, *, database_url: str | None, model_endpoint: str | None,
                 tile_endpoint: str | None, tile_id: str) -> Target:
    """What to check of a deployed stack (a :class:`cnsq.stack.deployed.Deployed`); the options
    replace its parts."""

    parse_tile_id(tile_id)  # a malformed id fails here, before any request
    template, token = deployed.tile_endpoint
    template = tile_endpoint or template
    return Target(
        stack_name=deployed.stack_name,
        stack_status=deployed.status,
        queue_url=deployed.outputs.get(logical_ids.QUEUE_URL),
        dead_letter_url=deployed.outputs.get(logical_ids.DEAD_LETTER_URL),
        database_url=(lambda: database_url or deployed.database_url())
        if (database_url or logical_ids.DB_SECRET_ARN in deployed.outputs) else None,
        admin=None if database_url else deployed.admin,
        model_endpoint=model_endpoint or deployed.model_endpoint,
        tile_url=tile_url_from_template(template, tile_id, token) if template else None,
        tile_id=tile_id,
    )
