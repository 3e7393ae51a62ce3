"""Both install modes work: editable (the test environment itself) and a regular wheel install."""

import importlib.machinery
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


def test_repository_kernels_dir_does_not_shadow_the_pypi_kernels_package(tmp_path):
    """From the repository root, ``import kernels`` (bitsandbytes and transformers look for the PyPI package) finds
    our kernels/ first: it hands over to an installed ``kernels``, and where there is none it stays an empty module
    without ``__file__`` (transformers' sign of a shadowing directory) whose submodules cannot be imported."""
    code = ("import kernels, importlib.util; print(kernels.__file__); "
            "print(importlib.util.find_spec('kernels.lora') is None if kernels.__file__ is None else "
            "getattr(kernels, 'real', lambda: 'pypi')())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    # the PyPI package may be installed (bitsandbytes 0.50 pulls it in): then it is what ``import kernels`` gives
    installed = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if pathlib.Path(p or os.curdir).resolve() != pathlib.Path(ROOT).resolve()])
    want = ["None", "True"] if installed is None else [installed.origin, "pypi"]
    assert out.stdout.split() == want, out.stderr
    # without site-packages (``-S``) there is no installed one: the empty stand-in
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["None", "True"], out.stderr
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("def real():\n    return 'installed'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(tmp_path / "site")},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(fake / "__init__.py"), "installed"], out.stderr
