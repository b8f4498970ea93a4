"""`cnsq --help` and every command's --help: a summary on one line, help for every option."""

from __future__ import annotations

import click
from click.testing import CliRunner

from cnsq.cli import main


def test_every_command_has_a_whole_summary_and_every_option_help():
    listing = CliRunner().invoke(main, ["--help"], terminal_width=80).output
    commands = listing.split("Commands:")[1].splitlines()[1:]
    assert commands and all(not line.rstrip().endswith("...") for line in commands), commands
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, f"cnsq {name} {param.opts[0]} has no help"
        assert "Example" in (command.help or ""), f"cnsq {name} --help has no example"
