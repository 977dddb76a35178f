"""Ctrl-C that lands while click is still parsing a sub-command's arguments: one line and
exit 130, not click's "Aborted!" and exit 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A stand-in sub-command whose option callback raises KeyboardInterrupt: an interrupt
# landing inside click's parsing, before the command's own body (and its handlers) runs.
PROBE = """
import sys, types, click
import meshca.cli.main as cli

def interrupt(ctx, param, value):
    raise KeyboardInterrupt

@click.command()
@click.option("--x", callback=interrupt)
def probe(x):
    print("the body ran")

module = types.ModuleType("probe_cmd")
module.probe = probe
sys.modules["probe_cmd"] = module
cli.SUBCOMMANDS[sys.argv[1]] = "probe_cmd:probe"
cli.main([sys.argv[1], "--x", "1"])
"""


@pytest.mark.parametrize(
    ("name", "line"),
    [("server", "meshca: interrupted during start-up"), ("admin", "meshca: interrupted")],
)
def test_an_interrupt_in_argument_parsing_is_one_line_and_130(name: str, line: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, name], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [line]
    assert "the body ran" not in done.stdout
