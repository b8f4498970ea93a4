"""`cnsq init`: a starter project written from the shipped files (cnsq.shipped), plainly or by
asking (``guided_init``, whose questions and checks are cnsq.init.guided)."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import requests

import download_and_predict
from cnsq.errors import CnsqError, option
from cnsq.files import atomic_write, backup
from cnsq.init import guided
from cnsq.shipped import shipped


@dataclass
class Written:
    """What ``init`` did: files written, files replaced (each with a ``.bak``), files kept."""

    written: list[Path] = field(default_factory=list)
    replaced: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def init(directory: Path, templates: bool = False, handler: bool = False,
         force: bool = False) -> Written:
    """Write ``config/config.yml`` and ``config/.env`` (and, to customise them, ``templates/``
    and ``lambda/``) into ``directory``.

    Adding the template or the Lambda to a project never touches its config files (a filled-in
    ``.env`` holds the token). ``force`` overwrites only what the call names — the templates and
    the Lambda when asked for, else the config — keeping a ``.bak`` of each file it replaces.
    ``.env`` is written readable by its owner only.

    Raises:
        CnsqError: a file it names exists, without ``force``; nothing was written.
    """
    config = shipped("config")
    config_plan = [(config / "config.example.yml", directory / "config/config.yml"),
                   (config / ".env.sample", directory / "config/.env")]
    named: list[tuple[Path, Path]] = []
    if templates:
        named += [(p, directory / "templates" / p.name) for p in shipped("templates").glob("*.yml")]
    if handler:
        source = Path(download_and_predict.__file__).parent
        named += [(p, directory / "lambda/download_and_predict" / p.name) for p in source.glob("*.py")]
        extra = shipped("lambda_extra")
        named += [(extra / "requirements.txt", directory / "lambda/requirements.txt")]
        named += [(p, directory / "lambda/examples" / p.name) for p in (extra / "examples").glob("*")
                  if p.suffix in (".py", ".md")]
    result = Written()
    if named:  # adding to a project: its config is written only where there is none
        result.kept = [target for _, target in config_plan if target.exists()]
        named += [(s, t) for s, t in config_plan if not t.exists()]
    else:
        named = config_plan
    existing = [target for _, target in named if target.exists()]
    if existing and not force:
        raise CnsqError(f"{existing[0]} exists; nothing was written ({option('force')} "
                          "overwrites it, keeping a .bak)")
    for source_path, target in named:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            backup(target)  # never over an older backup; a .env's copy stays private
            result.replaced.append(target)
        if target.name == ".env":  # created readable by its owner only, never for a moment more
            with atomic_write(target, permissions=0o600) as handle:
                handle.write(as_written(source_path.read_text()))
        elif target.name == "config.yml":
            with atomic_write(target) as handle:
                handle.write(as_written(source_path.read_text()))
        else:
            shutil.copyfile(source_path, target)
        result.written.append(target)
    return result


def as_written(example: str) -> str:
    """An example file's text as ``init`` writes it into a project: its first line's "Copy to
    config/…" is already done, so it says what was done instead."""
    return re.sub(r"Copy to config/[\w.]+\.", "Written by `cnsq init` from the example: fill it in.",
                  example, count=1)


def guided_init(directory: Path, force: bool, prompt, say) -> list[Path]:
    """``cnsq init --guided``: ask, check, and write config.yml and .env (see cnsq.init.guided).

    ``prompt(text, default=…, hide_input=…, show_default=…)`` is click's.

    Raises:
        CnsqError: the config exists, without ``force``.
    """
    targets = [directory / "config/config.yml", directory / "config/.env"]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise CnsqError(f"{existing[0]} exists; nothing was asked ({option('force')} replaces it, "
                          "keeping a .bak)")
    # Nothing is backed up or replaced until every answer is in (guided.write): an aborted run
    # leaves the project as it was.

    session = boto3.Session()
    client = None
    if session.get_credentials() is not None:
        clients: dict = {}

        def client(service: str, region: str):
            key = (service, region)
            if key not in clients:
                clients[key] = session.client(service, region_name=region)
            return clients[key]
    else:
        say("No AWS credentials: the bucket and the key pair cannot be checked now "
            "(`cnsq validate` checks them later).")

    def fetch(url: str) -> tuple[int | None, bytes | str]:
        try:
            answer = requests.get(url, timeout=15)
        except requests.RequestException as exc:
            return None, type(exc).__name__  # never the URL: it carries the token
        return answer.status_code, answer.content

    def ask(text: str, default: str, hide: bool) -> str:
        return prompt(text, default=default, hide_input=hide, show_default=bool(default) and not hide)

    answers = guided.run(guided.Asker(ask, say), client, fetch)
    if answers.unchecked:
        say("Not checked against the account: " + "; ".join(answers.unchecked) + ".")
    example = as_written((shipped("config") / "config.example.yml").read_text())
    return guided.write(directory, example, answers)
