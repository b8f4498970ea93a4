"""Every user-facing failure is one line on stderr and exit 1; `cnsq --debug` shows the traceback."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

from cnsq.cli import main


@pytest.fixture
def busy_port():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield listener.getsockname()[1]
    listener.close()


def bad_invocations(tmp_path, busy_port) -> dict[str, list[str]]:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    (tmp_path / "tiles.txt").write_text("1-2-3\n")
    (tmp_path / "results.csv").write_text("tile,output\n1-2-3,\"[0.1, 0.9]\"\n")
    return {
        "serve a corrupt model": ["serve", str(tmp_path / "bad.onnx"), "--port", "0"],
        "tileserver on a port in use": ["tileserver", str(tmp_path), "--port", str(busy_port)],
        "demo into a folder that cannot exist": ["demo", "--dir", "/proc/cnsq-nope/demo"],
        "download into a missing folder": ["download", str(tmp_path / "no" / "r.csv"),
                                           "--database-url", f"sqlite:///{tmp_path}/none.db"],
        "download from a missing SQLite file": ["download", str(tmp_path / "r.csv"),
                                                "--database-url", f"sqlite:///{tmp_path}/none.db"],
        "setup with a port that is not a number": ["setup", "postgresql://u:p@127.0.0.1:x/db"],
        "convert-geojson onto a folder": ["convert-geojson", str(tmp_path / "results.csv"),
                                          str(tmp_path), "--thresh_ind", "1", "--thresh", "0.5"],
        "convert-geojson with --thresh_ind out of range": [
            "convert-geojson", str(tmp_path / "results.csv"), str(tmp_path / "o.geojson"),
            "--thresh_ind", "5", "--thresh", "0.5"],
        "compile without a config": ["compile", "--config", str(tmp_path / "none.yml")],
    }


def test_no_failure_prints_a_traceback(tmp_path, busy_port):
    for name, args in bad_invocations(tmp_path, busy_port).items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, f"{name}: {result.output}"
        assert "Traceback" not in result.output, name
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1, f"{name}: {result.stderr}"


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "demo", "--dir", "/proc/cnsq-nope/demo"])
    assert isinstance(result.exception, OSError)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_that_a_library_turns_into_another_error_is_still_an_interruption(signame):
    """A Ctrl-C landing while numpy ran Python code inside C (an isinstance check in
    ``ndarray.tofile``) reached the CLI as a TypeError: 'Error: TypeError: expected str, bytes
    or os.PathLike object, not BufferedRandom' and 1, seen once in a GeoParquet export. A
    signal received means 'Interrupted.' and 130, whatever the error it turned into."""
    import subprocess
    import sys

    script = f"""
import os, signal, time
from cnsq.cli import main

@main.command("swallow")
def swallow():
    try:
        os.kill(os.getpid(), signal.{signame})
        time.sleep(5)
    except KeyboardInterrupt:
        raise TypeError("expected str, bytes or os.PathLike object, not BufferedRandom")

main(["swallow"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "Interrupted."


def test_the_cli_words_a_library_error_with_the_commands_own_flags():
    """A library error names parameters (option()); the CLI shows each as the flag of the
    command that ran, the negative of a flag pair, an argument's metavar, or, for a parameter
    the command lacks, the parameter's name."""
    import click

    from cnsq.cli.app import flags_of
    from cnsq.errors import CnsqError, option

    @click.command()
    @click.argument("results")
    @click.option("--thresh_ind", "--thresh-ind", "thresh_ind", type=int)
    @click.option("--database-url")
    @click.option("--warmup/--no-warmup", default=True)
    def command(results, thresh_ind, database_url, warmup):
        """A command."""

    error = CnsqError(f"{option('thresh_ind')} 3, {option('database_url')}, {option('no_warmup')}, "
                      f"{option('results')}, {option('instance_price')}")
    assert str(error) == "thresh_ind 3, database_url, no_warmup, results, instance_price"
    assert error.worded(flags_of(command)) == (
        "--thresh_ind 3, --database-url, --no-warmup, RESULTS, instance_price")
    assert CnsqError("a {brace} and {option:x", 2).worded(flags_of(command)) == "a {brace} and {option:x"


def test_every_parameter_a_message_names_is_one_a_command_has():
    """A message naming ``option("x")`` shows the command's flag for ``x``; a name no command has
    is printed bare (`estimate` once said "or pass instance_price", an option it did not have;
    `imagery` said "datetime:" for --datetime, whose parameter is ``datetime_``)."""
    import re
    from pathlib import Path

    import click

    context = click.Context(main)
    names = set()
    for name in main.list_commands(context):
        command = main.get_command(context, name)
        for param in command.params if command else []:
            names.add(param.name)
            if isinstance(param, click.Option) and param.secondary_opts:
                names.add(f"no_{param.name}")
    root = Path(__file__).resolve().parents[2] / "cnsq"
    named = {(match.group(1), path.relative_to(root.parent).as_posix())
             for path in root.rglob("*.py")
             for match in re.finditer(r"""option\(["'](\w+)["']\)""", path.read_text())}
    assert named and {name for name, _ in named} & names
    assert sorted((name, where) for name, where in named if name not in names) == []
