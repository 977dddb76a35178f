"""The ``meshca`` command: ``server``, ``agent``, ``proxy`` and ``admin``.

Each sub-command's module is imported only when that sub-command runs (or ``--help``
lists them): ``meshca agent`` runs in every pod, and the CA's modules (the store, the
signers, the cloud SDKs) would take more memory than the agent itself.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NoReturn

try:  # meshca's modules take a second or so to import: Ctrl-C may well land here
    import click

    from meshca import __version__
except KeyboardInterrupt:
    # Leave at once: an interpreter half-way through imports may turn a normal exit
    # back into the interrupt (killed by SIGINT, not 130).
    sys.stderr.write("meshca: interrupted during start-up\n")
    sys.stderr.flush()
    os._exit(130)

SUBCOMMANDS = {
    "admin": "meshca.cli.admin:admin",
    "agent": "meshca.cli.agent:agent",
    "demo": "meshca.cli.demo:demo",
    "proxy": "meshca.cli.proxy:proxy",
    "server": "meshca.cli.server:server",
}
"""Sub-command name -> ``module:attribute`` of its click command."""


class _LazyGroup(click.Group):
    """A group whose sub-commands are imported on first use (click's documented pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *SUBCOMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        try:
            command = getattr(importlib.import_module(module), attribute)
        except KeyboardInterrupt:
            _interrupted("meshca: interrupted during start-up")
        assert isinstance(command, click.Command)
        return command

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt:
            _interrupted("meshca: interrupted during start-up")

    def invoke(self, ctx: click.Context) -> Any:
        """Run the sub-command; an interrupt that reaches here (click would print
        "Aborted!" and exit 1) leaves with one line and 130, the code a shell gives
        SIGINT. ``meshca server`` handles its own once it is under way, so one that
        reaches here landed in click's parsing, before the server's start-up."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            starting = ctx.invoked_subcommand == "server"
            _interrupted("meshca: interrupted" + (" during start-up" if starting else ""))


def _interrupted(line: str) -> NoReturn:
    """Leave at once: an interpreter half-way through imports may turn a normal exit
    back into the interrupt (killed by SIGINT, not 130)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(130)


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="meshca")
def main() -> None:
    """meshca: a workload-identity CA issuing SPIFFE X509-SVIDs for service meshes."""
