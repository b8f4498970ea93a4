"""The package's layers, read from its source (docs/architecture.md §2).

Every import counts, those inside functions too: a cycle hidden in a function is still a cycle.
The layers, highest first: ``cnsq.cli`` → the jobs (``deploy``, ``ops``, ``results``, ``local``,
``view``, ``init``) → the stack's facts (``cnsq.stack``) → the core (the modules at the top of
``cnsq``) → the Lambda package, which imports nothing of cnsq. A layer imports only from lower
ones, and a job from another job only where ``ACROSS`` says so; only ``cnsq.cli`` imports click.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

JOBS = ("deploy", "ops", "results", "local", "view", "init")
CORE_PACKAGES = ("compat",)  # subpackages of the core
RANK = {"cli": 4, **{job: 3 for job in JOBS}, "stack": 2, "core": 1, "lambda": 0}
# What one job may use of another, and why.
ACROSS = {
    ("init", "deploy"): "the guided init checks a bucket and a key pair with preflight's calls",
    ("deploy", "ops"): "preflight prices the imagery's way out with the cost model's figures",
    ("ops", "results"): "status and verify read the results store",
    ("local", "results"): "a local run writes and downloads results as the stack's do",
    ("view", "results"): "the map reads the results CSV",
    ("view", "local"): "the map serves imagery from a folder or MBTiles, as `cnsq tileserver` does",
}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    where: str  # file:line


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """The dotted name of ``path`` under ``root`` (the folder holding ``cnsq`` or the Lambda's
    package), and whether it is a package's ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def modules(roots: list[Path]) -> dict[str, tuple[Path, bool]]:
    found = {}
    for root, package in ((r, p) for r in roots for p in ("cnsq", "download_and_predict")):
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            name, is_package = module_name(path, root)
            found[name] = (path, is_package)
    return found


def edges(found: dict[str, tuple[Path, bool]]) -> tuple[list[Edge], list[Edge]]:
    """First-party imports between modules, and imports of click (as edges to ``click``)."""
    first, clicks = [], []
    for name, (path, is_package) in found.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path}:{getattr(node, 'lineno', 0)}"
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                # `from a import b` names module a.b when there is one, else a's attribute b.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in found else base
                           for a in node.names]
            for target in targets:
                if target == "click" or target.startswith("click."):
                    clicks.append(Edge(name, "click", where))
                while target and target not in found and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in found and target != name:
                    first.append(Edge(name, target, where))
    return first, clicks


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "download_and_predict":
        return "lambda"
    if len(parts) > 1 and parts[1] in RANK and parts[1] not in ("core", "lambda"):
        return parts[1]
    return "core"


def violations(roots: list[Path]) -> list[str]:
    """Every import against the layers, and every cycle, as ``file:line: message`` lines."""
    found = modules(roots)
    first, clicks = edges(found)
    problems = []
    for edge in first:
        a, b = layer(edge.source), layer(edge.target)
        if a == b or RANK[a] > RANK[b] or (a, b) in ACROSS:
            continue
        problems.append(f"{edge.where}: {edge.source} ({a}) imports {edge.target} ({b})")
    problems += [f"{e.where}: {e.source} imports click (only cnsq.cli may)"
                 for e in clicks if layer(e.source) != "cli"]
    problems += [f"import cycle among: {', '.join(cycle)}" for cycle in cycles(first)]
    return problems


def cycles(graph_edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in graph_edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


ROOTS = [REPO, REPO / "lambda"]


def test_the_package_keeps_its_layers_and_has_no_cycle():
    assert violations(ROOTS) == []


def test_every_module_has_a_layer_the_test_knows():
    unknown = [m for m in modules(ROOTS) if m.startswith("cnsq.") and m.count(".") > 1
               and m.split(".")[1] not in RANK and m.split(".")[1] not in CORE_PACKAGES]
    assert unknown == []


def _copy(tmp_path: Path) -> list[Path]:
    shutil.copytree(REPO / "cnsq", tmp_path / "cnsq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "lambda" / "download_and_predict", tmp_path / "lambda" / "download_and_predict",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return [tmp_path, tmp_path / "lambda"]


def _append(path: Path, line: str) -> int:
    text = path.read_text()
    path.write_text(text + "\n\ndef _added():\n    " + line + "\n")
    return text.count("\n") + 4


def test_a_results_module_importing_deploy_is_named_with_its_line(tmp_path):
    roots = _copy(tmp_path)
    store = tmp_path / "cnsq" / "results" / "store.py"
    line = _append(store, "from cnsq.deploy import template  # inside a function: still counted")
    assert violations(roots) == [
        f"{store}:{line}: cnsq.results.store (results) imports cnsq.deploy.template (deploy)"]


def test_a_cycle_through_function_level_imports_is_found(tmp_path):
    roots = _copy(tmp_path)
    _append(tmp_path / "cnsq" / "errors.py", "from cnsq import files")
    assert "import cycle among: cnsq.errors, cnsq.files" in violations(roots)


def test_the_lambda_package_importing_cnsq_and_a_job_importing_click_are_refused(tmp_path):
    roots = _copy(tmp_path)
    handler = tmp_path / "lambda" / "download_and_predict" / "handler.py"
    push = tmp_path / "cnsq" / "ops" / "push.py"
    _append(handler, "import cnsq.errors")
    line = _append(push, "import click")
    problems = violations(roots)
    assert any("download_and_predict.handler (lambda) imports cnsq.errors (core)" in p for p in problems)
    assert f"{push}:{line}: cnsq.ops.push imports click (only cnsq.cli may)" in problems


FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
COMMAND = re.compile(r"`cnsq [^`]*`")  # a whole command suggested to the user, in backticks


def flags_in_library_errors(root: Path) -> list[str]:
    """``file:line: flag`` for each command-line flag a library module's ``raise`` names
    (mercantile's way: the library names its parameters with ``option()``, the CLI words them)."""
    found = []
    for path in sorted((root / "cnsq").rglob("*.py")):
        if "cli" in path.relative_to(root / "cnsq").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = " ".join(n.value for n in ast.walk(node.exc)
                                if isinstance(n, ast.Constant) and isinstance(n.value, str))
                found += [f"{path}:{node.lineno}: {m.group(0)}"
                          for m in FLAG.finditer(COMMAND.sub("", text))]
    return found


def test_library_errors_name_parameters_not_flags():
    assert flags_in_library_errors(REPO) == []


def test_a_flag_in_a_library_error_is_found(tmp_path):
    roots = _copy(tmp_path)
    line = _append(tmp_path / "cnsq" / "results" / "export.py",
                   'raise CnsqError("pass --thresh_ind")')
    assert flags_in_library_errors(roots[0]) == [
        f"{tmp_path / 'cnsq' / 'results' / 'export.py'}:{line}: --thresh_ind"]


def test_every_subpackage_ships_in_the_wheel():
    """setup.cfg lists packages one by one: a new subpackage missing there installs from a
    clone (editable) and is absent from the wheel (as cnsq.compat once was)."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    listed = set(parser["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "cnsq").rglob("__init__.py")}
    assert found - listed == set()
