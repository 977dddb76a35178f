"""The README's promises that code can check: its first commands, the settings it says
have no flag, and that its shell examples run as written from a checkout."""

from __future__ import annotations

import re
from pathlib import Path

from meshca.cli.server import server
from meshca.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)


def test_the_readme_starts_with_make_run_and_make_test() -> None:
    first = _shell_blocks()[0].splitlines()
    assert [line.split()[:2] for line in first] == [["make", "run"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "$(BIN)/meshca demo" in recipe
    assert ".installed-package" in recipe  # the package alone, not the developer tools


def test_every_setting_without_a_flag_is_named() -> None:
    flags = {param.name for param in server.params}
    paragraph = README.split("Settings with no flag", 1)[1].split("\n\n", 1)[0]
    missing = [
        name for name in Settings.model_fields if name not in flags and f"`{name}`" not in paragraph
    ]
    assert missing == []


def test_shell_examples_call_meshca_from_the_checkout_with_one_state_dir() -> None:
    """Bare ``meshca`` is not on the PATH after ``make run``; an admin or server command
    without --state-dir/--config (or MESHCA_STATE_DIR) would start another CA."""
    for block in _shell_blocks():
        exported = "export MESHCA_STATE_DIR=" in block
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            assert not command.startswith("meshca "), line
            if re.match(r"\.venv/bin/meshca (server|admin)\b", command) and not exported:
                assert "--state-dir" in command or "--config" in command, line
