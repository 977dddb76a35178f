"""``meshca demo``: the whole mesh on this machine, in one terminal (what ``make run`` runs)."""

from __future__ import annotations

import os
import sys

import click


def shown_name() -> str:
    """How the user started meshca, for the commands the demo prints."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "meshca":
        return argv0
    return "python -m meshca"


@click.command()
@click.option(
    "--keep",
    is_flag=True,
    help="Leave everything running at the end and print commands to try; Ctrl-C stops it.",
)
def demo(keep: bool) -> None:
    """Show the main job on loopback, step by step, in under a minute.

    A CA (SQLite; root key in SoftHSM2 when installed, otherwise in a file), three agents
    with their mTLS proxies (frontend, backend, and an intruder joining with a join
    token), a small HTTP backend; requests frontend -> backend over mTLS with the access
    log, the intruder refused by policy, then a certificate rotation and a root rotation
    under traffic with no failed request. All files stay in one temporary directory;
    Ctrl-C stops every process the demo started.
    """
    from meshca.demo.run import run_demo

    sys.exit(run_demo(keep=keep, shown_as=shown_name()))
