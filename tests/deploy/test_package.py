"""The installed package (what `pip install .` puts in the Docker image, unlike the editable
install of development) carries the files the proxy reads at run time: the cost page, the price
overrides, Alembic's template. Built as a real wheel; setuptools must not warn about the layout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from deploy_files import ROOT

RUNTIME_FILES = {
    "proxy/page/index.html", "proxy/page/app.js", "proxy/page/style.css",
    "costing/price_overrides.json", "migrations/script.py.mako",
}


def test_the_wheel_carries_the_page_prices_and_migration_template(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    # pip prints the build backend's warnings; its own index notices are not about the layout.
    warnings = [line for line in (built.stdout + built.stderr).splitlines()
                if "warning" in line.lower() and not line.startswith("WARNING: Location")]
    assert warnings == []
    (wheel,) = tmp_path.glob("llm_cost_proxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert RUNTIME_FILES <= names, sorted(RUNTIME_FILES - names)
    assert any(name.startswith("migrations/versions/") and name.endswith(".py") for name in names)
