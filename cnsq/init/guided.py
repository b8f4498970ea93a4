"""``cnsq init --guided``: from nothing to a config that will deploy, one question at a time.

Each answer is checked where it can be, as it is given — the bucket exists in the region, the
key pair exists, the tile endpoint answers an image for a sample tile, the model image name and
path parse — and a wrong one is asked again. Without AWS credentials the account's answers are
said to be unchecked rather than passed. The result is the example config with the answers in
place (its comments kept) and a ``.env`` with the token, readable by its owner only.

Collaborators are passed in (how to ask, how to reach AWS and the tile endpoint), so the session
is tested with scripted answers against moto and a local tile server.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cnsq.deploy.preflight import bucket_region, key_pair_exists
from cnsq.errors import CnsqError
from cnsq.files import atomic_write, backup
from download_and_predict.masking import mask
from download_and_predict.tiles import check_tile_endpoint, imagery_url, is_image, parse_tile_id

# A Docker image reference: [registry/]name[:tag][@digest], lower-case name components.
IMAGE = re.compile(r"^(?:[\w.-]+(?::\d+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
                   r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
PREDICTION_PATH = re.compile(r"^/v1/models/[A-Za-z0-9_.-]+$")
# The project's name: each deployment's stack is NAME-STAGE (cnsq-dev, cnsq-prod), as the example
# writes stackName, so `cnsq deploy -d prod` deploys its own stack.
PROJECT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,99}$")


@dataclass
class Answers:
    project: str = "cnsq"
    region: str = "us-east-1"
    bucket: str = ""
    key_pair: str = ""
    tile_endpoint: str = ""
    token: str = ""
    image: str = "tensorflow/serving:latest-gpu"
    prediction_path: str = ""
    unchecked: list[str] = field(default_factory=list)


class Asker:
    """How a question is put: ``prompt(text, default, hide)`` returns the answer; ``say(text)``
    tells the user something."""

    def __init__(self, prompt: Callable[[str, str, bool], str], say: Callable[[str], None]):
        self.prompt, self.say = prompt, say

    def until(self, text: str, default: str, check: Callable[[str], str | None],
              hide: bool = False) -> str:
        """Ask until ``check`` returns None (no problem) for the answer."""
        while True:
            answer = self.prompt(text, default, hide).strip()
            problem = check(answer)
            if problem is None:
                return answer
            self.say(f"  {problem}")


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _tile_id(text: str) -> bool:
    try:
        parse_tile_id(text)
    except ValueError:
        return False
    return True


def _code(exc: BaseException) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def run(asker: Asker, client: Callable[[str, str], Any] | None,
        fetch: Callable[[str], tuple[int | None, bytes | str]],
        sample_tile: str = "0-0-0") -> Answers:
    """Ask every question; ``client(service, region)`` reaches AWS (None: no credentials), and
    ``fetch(url)`` gets a tile: ``(status, body)``, or ``(None, why)`` when nothing answered."""
    from botocore.exceptions import BotoCoreError, ClientError


    answers = Answers()

    def aws(service: str) -> Any:
        """The client (only called where ``client`` is known to be there)."""
        if client is None:
            raise RuntimeError("no AWS client")
        return client(service, answers.region)

    def aws_says(what: str, call: Callable[[], str | None]) -> str | None:
        if client is None:
            answers.unchecked.append(what)
            return None
        try:
            return call()
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and _code(exc) not in ("AccessDenied", "AccessDeniedException",
                                                                     "UnauthorizedOperation"):
                raise
            answers.unchecked.append(f"{what} ({type(exc).__name__})")
            return None

    answers.project = asker.until(
        "Project name (each deployment's stack is NAME-STAGE: cnsq-dev, cnsq-prod)", answers.project,
        lambda a: None if PROJECT_NAME.match(a) else "a letter, then up to 99 letters, digits or "
                                                     "hyphens")
    answers.region = asker.until(
        "AWS region", answers.region,
        lambda a: None if re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", a) else "a region such as us-east-1")

    def bucket_problem(name: str) -> str | None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name):
            return "an S3 bucket name: 3 to 63 lower-case letters, digits, dots or hyphens"

        def check() -> str | None:
            where = bucket_region(aws("s3"), name)
            if where is None:
                return (f"bucket {name} does not exist: create it (aws s3 mb s3://{name} "
                        f"--region {answers.region}) or name another")
            if where != answers.region:
                return f"bucket {name} is in {where}, not {answers.region}: name one in {answers.region}"
            return None

        return aws_says(f"the bucket {name}", check)

    answers.bucket = asker.until("S3 bucket for the Lambda code (in that region)", "", bucket_problem)

    def key_problem(name: str) -> str | None:
        if not name:
            return None

        def check() -> str | None:
            if key_pair_exists(aws("ec2"), name):
                return None
            return f"key pair {name} does not exist in {answers.region}: name another, or none"

        return aws_says(f"the key pair {name}", check)

    asker.say("A key pair is optional: the GPU hosts are private, and SSM Session Manager reaches "
              "them without one (aws ssm start-session --target INSTANCE_ID).")
    answers.key_pair = asker.until("EC2 key pair (empty for none)", "", key_problem)
    answers.token = asker.prompt("Imagery token (empty if the endpoint needs none)", "", True).strip()

    def endpoint_problem(template: str) -> str | None:
        if "{{" in template or "{%" in template:
            return "a config value is a Jinja template: write {z}, {x}, {y} and {token}, single braces"
        if "://" not in template:
            return "a URL template such as https://tiles.example.org/{z}/{x}/{y}.png?access_token={token}"
        try:
            check_tile_endpoint(template)
        except ValueError as exc:
            return str(exc)
        return None

    def tile_problem(template: str, tile_text: str) -> str | None:
        """None when the endpoint answers the tile with an image; else what it answered."""
        tile = parse_tile_id(tile_text)
        status, body = fetch(imagery_url(template, tile, answers.token))
        if status is None:
            return f"the endpoint did not answer tile {tile_text} ({body!s})"
        if status != 200:
            hint = {401: "the token?", 403: "the token?", 404: "a tile it does not cover?"}.get(
                status, "")
            return f"the endpoint answered HTTP {status} for tile {tile_text}" + (
                f" ({hint})" if hint else "")
        if not isinstance(body, bytes) or not is_image(body):
            return f"the endpoint answered tile {tile_text} with something that is not an image"
        return None

    while True:
        template = asker.until("Imagery URL template ({z}/{x}/{y}, {token})", "", endpoint_problem)
        host = urlsplit(template.replace("{", "").replace("}", "")).hostname or ""
        if host == "localhost" or host.endswith(".localhost") or _loopback(host):
            asker.say(f"  {host} is the Lambda itself on AWS: a deployed stack can never reach a "
                      "server there (`cnsq run` can).")
            if asker.until("'url' to change it, or 'keep' for a local run only", "url",
                           lambda a: None if a in ("keep", "url") else "url or keep") == "url":
                continue
        tile_text = sample_tile
        while True:
            problem = tile_problem(template, tile_text)
            if problem is None:
                answers.tile_endpoint = template
                break
            asker.say(f"  {problem}")
            choice = asker.until(
                "A tile the imagery covers (x-y-z), 'url' to change the URL, or 'keep' to go on "
                "unchecked", "keep", lambda a: None if a in ("keep", "url") or _tile_id(a) else
                "x-y-z (such as 4823-6160-14), url or keep")
            if choice == "keep":
                asker.say(f"  Kept {mask(template)} unchecked: `cnsq verify` checks it after the "
                          "deploy.")
                answers.tile_endpoint = template
                answers.unchecked.append("the imagery endpoint")
                break
            if choice == "url":
                break
            tile_text = choice
        if answers.tile_endpoint:
            break
    answers.image = asker.until(
        "Model image (TF Serving, see `cnsq model`)", answers.image,
        lambda a: None if IMAGE.match(a) else "an image name such as 123456789012.dkr.ecr.us-east-1"
                                              ".amazonaws.com/buildings:1")
    answers.prediction_path = asker.until(
        "Model path on TF Serving", "/v1/models/model",
        lambda a: None if PREDICTION_PATH.match(a) else "/v1/models/NAME (no :predict)")
    return answers


def render(example: str, answers: Answers) -> str:
    """The example config with the answers in place; its comments kept.

    Raises:
        CnsqError: the example has changed and a line to fill in is not where it was.
    """
    import json

    def quoted(value: str) -> str:
        return json.dumps(value)  # JSON strings are YAML strings

    replacements = [
        # Templated with the stage, as the example: each deployment its own stack.
        ("  stackName: 'cnsq-{{ stage }}'\n",
         f"  stackName: {quoted(answers.project + '-{{ stage }}')}\n"),
        ("  # region: us-east-1", f"  region: {answers.region}"),
        ("internal: your-bucket", f"internal: {answers.bucket}"),
        ("TILE_ENDPOINT: 'https://example.com/{}/{}/{}.jpg?access_token={}'",
         f"TILE_ENDPOINT: {quoted(answers.tile_endpoint)}"),
        ("image: tensorflow/serving:latest-gpu", f"image: {answers.image}"),
        ("predictionPath: /v1/models/your_model", f"predictionPath: {answers.prediction_path}"),
    ]
    if answers.key_pair:
        replacements.append(("    # keyPairName: your-key-pair", f"    keyPairName: {answers.key_pair}"))
    text = example
    for old, new in replacements:
        if old not in text:
            raise CnsqError(f"the example config has no line {old.strip()!r} to fill in")
        text = text.replace(old, new, 1)
    return text


def write(directory: Path, example: str, answers: Answers, username: str = "postgres") -> list[Path]:
    """``config/config.yml`` and ``config/.env`` (created 0600) from the answers; a file they
    replace is kept first as a backup that never replaces an older one."""

    config = directory / "config" / "config.yml"
    env = directory / "config" / ".env"
    config.parent.mkdir(parents=True, exist_ok=True)
    for existing in (config, env):
        if existing.exists():
            backup(existing)
    with atomic_write(config) as handle:
        handle.write(render(example, answers))
    token = answers.token.replace("\\", "\\\\").replace('"', '\\"')
    with atomic_write(env, permissions=0o600) as handle:
        handle.write("# Written by cnsq init --guided: secrets only, readable by you alone.\n"
                     f"RDS_USERNAME={username}\nTILE_ACCESS_TOKEN=\"{token}\"\n")
    return [config, env]
