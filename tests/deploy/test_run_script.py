"""scripts/run.sh installs only when it must (no .venv, or pyproject.toml changed since the last
install), so once installed the proxy starts offline. Run against a copy of the project layout
whose `.venv` holds stand-ins for pip and the console script, which record their calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from deploy_files import ROOT

STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "$(dirname "$0")/../calls"
"""


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "run.sh", project / "scripts" / "run.sh")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("pip", "python", "llm-cost-proxy"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    return project


def _run(project: Path) -> list[str]:
    calls = project / ".venv" / "calls"
    calls.unlink(missing_ok=True)
    subprocess.run(["bash", str(project / "scripts" / "run.sh"), "--flag"], check=True, timeout=30,
                   env={"PATH": os.environ["PATH"]}, capture_output=True)
    return calls.read_text().splitlines()


def test_run_installs_once_then_starts_without_pip_until_pyproject_changes(tmp_path):
    project = _project(tmp_path)
    first = _run(project)
    assert first[0].startswith("pip install") and first[-1] == "llm-cost-proxy serve --flag"
    assert _run(project) == ["llm-cost-proxy serve --flag"]  # offline: no pip at all
    with (project / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    assert [c.split()[0] for c in _run(project)] == ["pip", "llm-cost-proxy"]
    assert _run(project) == ["llm-cost-proxy serve --flag"]


def test_run_never_upgrades_pip():
    assert "--upgrade pip" not in (ROOT / "scripts" / "run.sh").read_text()
