"""Both install modes work: editable (the test environment itself) and a regular wheel install."""

import os
import pathlib
import subprocess
import sys

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_python_package_is_declared():
    """A subpackage missing from pyproject's list would vanish from regular installs only."""
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"peftfast.kernels"}
    for init in (ROOT / "peftfast").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    assert found == declared


def test_editable_install_maps_kernels():
    import peftfast.kernels.lora as k

    assert pathlib.Path(k.__file__).resolve() == (ROOT / "kernels" / "lora.py").resolve()


def test_regular_wheel_install(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(wheel_dir)],
        check=True, env={**os.environ, "PEFTFAST_BUILD_EXT": "0"}, cwd=tmp_path,
    )
    wheel = next(wheel_dir.glob("peftfast-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path)
    code = ("import peftfast, peftfast.kernels.lora as k, peftfast.ops.lora; "
            "print(peftfast.__file__); print(k.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                         cwd=tmp_path).stdout.split()
    assert all(pathlib.Path(p).is_relative_to(target) for p in out), out
