"""The wheel: funcgrad works from an installed wheel, away from the repository (configs shipped inside)."""

import subprocess
import sys
import tomllib
import zipfile

import pytest
from conftest import ROOT, run_python


def test_every_package_under_funcgrad_is_shipped():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "funcgrad").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"funcgrad.configs"}


@pytest.mark.slow  # ~15 s (builds and installs a wheel); the package list above is checked by default
def test_a_wheel_install_trains_from_a_shipped_config(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("funcgrad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "funcgrad/configs/spiral.toml" in names and "funcgrad/py.typed" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {"PYTHONPATH": str(target), "FUNCGRAD_COMPILATION_CACHE": "0"}
    where = run_python(["-c", "import funcgrad; print(funcgrad.__file__)"], cwd=away, env=env).stdout
    assert where.startswith(str(target))  # the wheel's copy, not the checkout
    proc = run_python(["-m", "funcgrad", "train", "--set", "train.epochs=5", "--set", "train.verify=false"],
                      cwd=away, env=env)
    assert "funcgrad train: spiral" in proc.stdout and (away / "runs" / "spiral" / "summary.json").exists()
    help_text = run_python(["-m", "funcgrad", "train", "--help"], cwd=away, env=env).stdout
    assert "spiral_dropout" in help_text
