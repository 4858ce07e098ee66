"""``./dev`` on awkward machines: no ``sha1sum`` (macOS), a ``.venv`` left by a too-old
Python, and a first run that says what it is doing. Python and pip are stand-ins
(a shell script), so no real venv is built and nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / "dev"


def _bin_without_sha1sum(tmp_path: Path) -> Path:
    """A PATH with only the tools ./dev may use: no sha1sum, no shasum."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "rm", "touch", "sed", "mkdir", "cp", "chmod"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    return bin_dir


def _dev(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEV), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _fake_python(path: Path, *, version: str | None, log: Path) -> Path:
    """A stand-in interpreter: ``-m venv DIR`` copies itself to DIR/bin/python; ``-c``
    runs the real Python (or prints ``version`` when given, as an old one would);
    anything else (pip, the task) is only logged."""
    real = sys.executable
    check = f'echo "{version}"; exit 0' if version else f'exec "{real}" "$@"'
    path.write_text(
        f"""#!/bin/bash
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1" = "-c" ]; then {check}; fi
echo "$*" >> "{log}"
"""
    )
    path.chmod(0o755)
    return path


def test_needs_no_sha1sum(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    if venv == Path(sys.base_prefix) or not list(venv.glob(".installed-*")):
        pytest.skip("the tests do not run in a .venv made by ./dev (no install stamp)")
    env = {"PATH": str(_bin_without_sha1sum(tmp_path)), "JOBPOOL_VENV": str(venv)}
    result = _dev("types", "--version", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("mypy ")
    assert "installing" not in result.stderr  # the stamp was recognised: no reinstall


def test_a_venv_of_a_too_old_python_is_rebuilt(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _fake_python(venv / "bin" / "python", version="3.9", log=log)
    (venv / ".installed-0123456789abcdef").touch()
    fresh = _fake_python(tmp_path / "python3", version=None, log=log)
    env = {"PATH": os.environ["PATH"], "JOBPOOL_VENV": str(venv), "PYTHON": str(fresh)}
    result = _dev("types", "--version", env=env)
    assert result.returncode == 0, result.stderr
    assert "made by Python 3.9" in result.stderr and "rebuilding" in result.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        "-m pip install --upgrade --progress-bar on pip",
        "-m pip install --progress-bar on -e .[dev]",
        "-m mypy --version",
    ]
    assert len(list(venv.glob(".installed-*"))) == 1


def test_a_too_old_python_is_named_not_used(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    old = _fake_python(tmp_path / "python3", version="3.10", log=log)
    env = {"PATH": os.environ["PATH"], "JOBPOOL_VENV": str(tmp_path / "v"), "PYTHON": str(old)}
    result = _dev("test", env=env)
    assert result.returncode == 1
    assert f"{old} is Python 3.10; this project needs 3.11+" in result.stderr
    assert "PYTHON=" in result.stderr
    assert not (tmp_path / "v").exists() and not log.exists()


def test_the_first_run_says_what_it_does(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    fresh = _fake_python(tmp_path / "python3", version=None, log=log)
    env = {"PATH": os.environ["PATH"], "JOBPOOL_VENV": str(tmp_path / "v"), "PYTHON": str(fresh)}
    result = _dev("lint", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"./dev: creating {tmp_path / 'v'} with ")
    assert lines[1].startswith("./dev: installing the project")
    assert "--quiet" not in log.read_text()  # pip's own progress is shown
    again = _dev("lint", env=env)
    assert again.returncode == 0 and again.stderr == ""  # later runs are quiet
