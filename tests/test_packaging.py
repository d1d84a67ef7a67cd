"""Ready to publish: the wheel installs into a fresh environment that holds nothing but JAX and
normalizes there; the sdist and the wheel carry the license; the metadata says what PyPI shows.

The build tests need the package registry (pip's isolated build fetches setuptools, and the fresh
environment fetches jax) and take from half a minute (pip's cache warm) to a few minutes, so they
are marked slow (the name alone does not make a module slow: tests/conftest.py); the metadata and
floor tests read files only.
"""

import email.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile

import jax
import pytest

import jaxnorm

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in the fresh environment: jaxnorm must come from the wheel, flax must be absent, and a
# layer normalization must match numpy's two-pass one.
_SMOKE = """
import pathlib, sys
import numpy as np
import jaxnorm as jn
assert pathlib.Path(jn.__file__).is_relative_to(sys.prefix), jn.__file__
try:
  import flax
except ImportError:
  pass
else:
  sys.exit("flax is installed: the environment was to hold nothing but jax")
x = np.arange(32, dtype=np.float32).reshape(4, 8) ** 1.5
mean = x.mean(-1, keepdims=True)
want = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
np.testing.assert_allclose(np.asarray(jn.layer_norm(x)), want, rtol=1e-5, atol=1e-5)
print(jn.__version__)
"""


def _run(*args: str, cwd: pathlib.Path, timeout: int = 600) -> str:
  # Without PYTHONPATH: a checkout on it would be imported instead of what was installed.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
  assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
  return result.stdout


def _metadata(text: str) -> email.message.Message:
  return email.parser.Parser().parsestr(text)


def _source(to: pathlib.Path) -> pathlib.Path:
  """The checkout copied without what a build or a test run leaves in it (virtual environments,
  caches, build outputs): setuptools writes `build/` and `*.egg-info` beside its input, which
  stay out of the checkout this way."""
  shutil.copytree(ROOT, to, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
      ".git", ".venv", ".venv-*", "venv", "__pycache__", "build", "dist", "*.egg-info", "results",
      ".pytest_cache", ".hypothesis", "bench-results", "_build", "generated"))
  return to


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """The wheel, built from this checkout by pip's PEP 517 build in an isolated environment (the
  build backend pyproject.toml names, fetched from the registry, as for a release)."""
  out = tmp_path_factory.mktemp("wheel")
  src = _source(tmp_path_factory.mktemp("src"))
  _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src),
       cwd=out)
  (path,) = out.glob("jaxnorm-*.whl")
  return path


def test_metadata_declares_python_versions_license_and_readme():
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  floor = re.fullmatch(r">=3\.(\d+)", meta["requires-python"]).group(1)
  minors = sorted(int(c.rsplit(".", 1)[1]) for c in meta["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
  assert minors and minors[0] == int(floor), "the oldest classifier is requires-python's"
  assert minors == list(range(minors[0], minors[-1] + 1)), "no Python version left out"
  assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
  assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
  assert meta["readme"] == "README.md" and "version" in meta["dynamic"]


@pytest.mark.slow
def test_wheel_carries_license_metadata_and_version(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    info = f"jaxnorm-{jaxnorm.__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in names, names
    assert "jaxnorm/py.typed" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
    meta = _metadata(z.read(f"{info}/METADATA").decode())
  assert meta["Version"] == jaxnorm.__version__
  assert meta["License-Expression"] == "Apache-2.0"
  assert meta["Description-Content-Type"] == "text/markdown"
  assert "Programming Language :: Python :: 3.11" in meta.get_all("Classifier")
  assert meta.get_payload().strip().startswith("# jaxnorm")  # the README, as the description


def _floor_pins() -> dict[str, str]:
  lines = (ROOT / ".ci" / "constraints-floor.txt").read_text().splitlines()
  return dict(line.split("==") for line in lines if line and not line.startswith("#"))


@pytest.mark.slow
@pytest.mark.parametrize("end", ["floor", "running"])
def test_wheel_installs_with_nothing_but_jax_and_normalizes(wheel, tmp_path, end):
  """At the declared floor (jax and jaxlib pinned from the constraints file) and at the running
  JAX (the newest release in CI's main run; pip finds it in its cache)."""
  env = tmp_path / "venv"
  venv.create(env, with_pip=True)
  python = str(env / "bin" / "python")
  pins = _floor_pins()
  jax_pins = ([f"jax=={pins['jax']}", f"jaxlib=={pins['jaxlib']}"] if end == "floor"
              else [f"jax=={jax.__version__}"])
  _run(python, "-m", "pip", "install", "-q", str(wheel), *jax_pins, cwd=tmp_path)
  assert _run(python, "-c", _SMOKE, cwd=tmp_path).strip() == jaxnorm.__version__
  want = pins["jax"] if end == "floor" else jax.__version__
  assert _run(python, "-c", "import jax; print(jax.__version__)", cwd=tmp_path).strip() == want


@pytest.mark.slow
def test_sdist_carries_license_and_runnable_tests(tmp_path):
  """The sdist, built by setuptools' PEP 517 hook in this environment (the wheel test covers the
  isolated build), holds the license and the repository, the tests' helpers included
  (MANIFEST.in), and no bytecode."""
  setuptools = pytest.importorskip("setuptools")
  if int(setuptools.__version__.split(".")[0]) < 77:
    pytest.skip(f"setuptools {setuptools.__version__} predates PEP 639 (77): `python -m build`")
  out = tmp_path / "sdist"
  code = ("import sys; from setuptools import build_meta; "
          "print(build_meta.build_sdist(sys.argv[1]))")
  src = _source(tmp_path / "src")
  name = _run(sys.executable, "-c", code, str(out), cwd=src).strip().splitlines()[-1]
  top = f"jaxnorm-{jaxnorm.__version__}"
  with tarfile.open(out / name) as tar:
    names = set(tar.getnames())
    meta = _metadata(tar.extractfile(f"{top}/PKG-INFO").read().decode())
  for path in ("LICENSE", "README.md", "pyproject.toml", "jaxnorm/_version.py", "jaxnorm/py.typed",
               "CHANGELOG.md", "tests/conftest.py", "tests/refs.py", "docs/conf.py"):
    assert f"{top}/{path}" in names, path  # the tests' helpers too: the sdist's tests run
  assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
  assert meta["Version"] == jaxnorm.__version__ and meta["License-File"] == "LICENSE"


def test_floor_constraints_pin_the_declared_floors():
  """`.ci/constraints-floor.txt` pins each package at its `>=` floor in pyproject.toml (jaxlib
  at jax's), so a floor raised in one place and not the other fails here."""
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  specs = [*meta["dependencies"], *(s for extra in meta["optional-dependencies"].values()
                                    for s in extra)]
  floors = {}
  for spec in specs:
    if match := re.fullmatch(r"([A-Za-z0-9_.-]+)>=([\w.]+)", spec.split(";")[0].strip()):
      floors.setdefault(match[1].lower(), set()).add(match[2])
  pins = _floor_pins()
  assert pins.pop("jaxlib") == pins["jax"]
  for name, version in pins.items():
    assert floors.get(name) == {version}, (name, version, floors.get(name))
  assert {"jax", "flax", "equinox"} <= pins.keys()
