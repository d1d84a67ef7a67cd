"""Packaging contract: exact public surface, one version, py.typed, and no flax import."""

import pathlib
import subprocess
import sys
import tomllib

import jaxnorm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_all_is_exact_and_sorted():
  public = {n for n in dir(jaxnorm) if not n.startswith("_")}
  modules = {n for n in public if type(getattr(jaxnorm, n)).__name__ == "module"}
  assert set(jaxnorm.__all__) == public - modules
  assert list(jaxnorm.__all__) == sorted(jaxnorm.__all__)
  for name in ("Moments", "moments", "merge_moments", "normalize", "layer_norm", "rms_norm",
               "group_norm", "instance_norm", "BatchNormState", "batch_norm_init",
               "batch_norm", "update_running_stats"):
    assert name in jaxnorm.__all__


def test_import_jaxnorm_does_not_import_flax():
  code = ("import sys, jaxnorm; "
          "sys.exit(any(m.split('.')[0] in ('flax', 'optax') for m in sys.modules))")
  assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_version_lives_in_one_place_and_py_typed_ships():
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" in meta["project"]["dynamic"]
  assert meta["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "jaxnorm._version.__version__"
  assert meta["project"]["dependencies"] == ["jax>=0.10.2"]
  assert (ROOT / "jaxnorm" / "py.typed").is_file()
  assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["jaxnorm"]
  assert jaxnorm.__version__.count(".") == 2
