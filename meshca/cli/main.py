"""The ``meshca`` command: ``server`` and ``admin`` (more sub-commands plug in here)."""

from __future__ import annotations

import os
import sys

try:  # meshca's modules take a second or so to import: Ctrl-C may well land here
    import click

    from meshca import __version__
    from meshca.cli.admin import admin
    from meshca.cli.agent import agent
    from meshca.cli.proxy import proxy
    from meshca.cli.server import server
except KeyboardInterrupt:
    # Leave at once: an interpreter half-way through imports may turn a normal exit
    # back into the interrupt (killed by SIGINT, not 130).
    sys.stderr.write("meshca: interrupted during start-up\n")
    sys.stderr.flush()
    os._exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="meshca")
def main() -> None:
    """meshca: a workload-identity CA issuing SPIFFE X509-SVIDs for service meshes."""


main.add_command(server)
main.add_command(admin)
main.add_command(agent)
main.add_command(proxy)
