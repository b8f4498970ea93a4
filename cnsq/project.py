"""Where a command finds the template, the Lambda and the example config: the project's own
copies when it has them (a kes-style project, or one `cnsq init --templates --lambda` wrote),
else those that ship with cnsq — so `pip install cnsq` can deploy without a clone.

`cnsq init` writes a starter project from the shipped files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cnsq.errors import CnsqError
from cnsq.files import atomic_write, backup

PACKAGE = Path(__file__).resolve().parent
# Shipped files: in a wheel under cnsq/bundled/ (setup.cfg's package_dir), in a clone at the root.
_SHIPPED = {"templates": "templates", "config": "config", "lambda_extra": "lambda"}


def shipped(kind: str) -> Path:
    """The folder of shipped ``templates``, ``config`` or ``lambda_extra`` files.

    Raises:
        CnsqError: the installation has no such files (a broken install).
    """
    for candidate in (PACKAGE / "bundled" / kind, PACKAGE.parent / _SHIPPED[kind]):
        if candidate.is_dir():
            return candidate
    raise CnsqError(f"this cnsq installation has no {kind} files; reinstall cnsq")


def templates_dir(project_dir: Path) -> Path:
    """The project's templates/ if it has one, else the shipped template."""
    own = project_dir / "templates"
    return own if own.is_dir() else shipped("templates")


def lambda_source(source: Path, build_dir: Path) -> Path:
    """``source`` if it exists; the default ``lambda`` folder, when the project has none, is
    assembled from the installed handler package and the shipped requirements."""
    if source.exists() or source.name != "lambda":
        return source
    import download_and_predict

    bundle = build_dir / "shipped-lambda"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    shutil.copytree(Path(download_and_predict.__file__).parent, bundle / "download_and_predict",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(shipped("lambda_extra") / "requirements.txt", bundle / "requirements.txt")
    return bundle


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
    import download_and_predict

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
        raise CnsqError(f"{existing[0]} exists; nothing was written (--force overwrites it, "
                        "keeping a .bak)")
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
    import re

    return re.sub(r"Copy to config/[\w.]+\.", "Written by `cnsq init` from the example: fill it in.",
                  example, count=1)


def guided_init(directory: Path, force: bool, prompt, say) -> list[Path]:
    """``cnsq init --guided``: ask, check, and write config.yml and .env (see cnsq.init.guided).

    ``prompt(text, default=…, hide_input=…, show_default=…)`` is click's.

    Raises:
        CnsqError: the config exists, without ``force``.
    """
    import boto3
    import requests

    from cnsq.init import guided

    targets = [directory / "config/config.yml", directory / "config/.env"]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise CnsqError(f"{existing[0]} exists; nothing was asked (--force replaces it, keeping a .bak)")
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
