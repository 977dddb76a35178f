"""``python -m meshca`` is the ``meshca`` command."""

from meshca.cli.main import main

main()
