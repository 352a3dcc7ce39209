"""A non-editable wheel install works from any directory: templates, profiles and recipes travel as package data."""

import site
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_install_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("moe_launch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "launcher/_data/templates/sbatch/job.sbatch.j2" in names and "launcher/_data/clusters/h100-8x64.yaml" in names
    assert "recipes/full_ft.py" in names and "model/config.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # Dependencies come from this environment's site-packages (a plain path entry: its .pth files,
    # such as an editable install of this checkout, are not processed).
    (site_dir,) = venv.glob("lib/python*/site-packages")
    (site_dir / "outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([venv / "bin" / "launch", "recipes/full_ft.py", "--cluster", "h100-8x64", "--dry-run", "--runs-dir", "r"],
                         cwd=elsewhere, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=64" in res.stdout
    where = subprocess.run([venv / "bin" / "python", "-c", "import launcher, launcher.paths as p; print(launcher.__file__); print(p.data_dir('templates'))"],
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout.split()
    assert all(str(venv) in w for w in where), where
