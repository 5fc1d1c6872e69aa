"""The wheel: built from the repository, installed on its own (no source tree on the path), it carries
the recipes (`--config cpu-budget` by name), the license and every package-data pattern's files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _setuptools_major() -> int:
    try:
        import setuptools
    except ImportError:
        return 0
    return int(setuptools.__version__.split(".")[0])


@pytest.mark.slow
def test_wheel_installs_with_recipes_and_license(tmp_path):
    isolation = [] if _setuptools_major() >= 77 else ["--use-pep517"]  # else pip fetches pyproject's setuptools
    extra = ["--no-build-isolation"] if not isolation else isolation
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *extra, "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("bertforge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in ("cpu-budget", "gpu-budget", "tiny-smoke"):
        assert f"bertforge/configs/{recipe}.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import bertforge, bertforge.config as c; print(bertforge.__file__); "
            "print(c.load_run_config(__import__('bertforge.workflows.pretrain', fromlist=['x']).PretrainRunConfig, "
            "file='cpu-budget').model)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    where, model = out.stdout.splitlines()[:2]
    assert where.startswith(str(site)), where  # the installed copy, not the source tree
    assert "rotary" in model
    help_out = subprocess.run([sys.executable, "-m", "bertforge", "pretrain", "--help"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "packaged" in help_out.stdout
