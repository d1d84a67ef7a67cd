"""Packaging contract: exact public surface, one version, py.typed, and no flax import."""

import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

import jaxnorm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_all_is_exact_and_sorted():
  public = {n for n in dir(jaxnorm) if not n.startswith("_")}
  modules = {n for n in public if type(getattr(jaxnorm, n)).__name__ == "module"}
  assert set(jaxnorm.__all__) == public - modules
  assert list(jaxnorm.__all__) == sorted(jaxnorm.__all__)
  for name in ("Moments", "moments", "merge_moments", "normalize", "layer_norm", "rms_norm",
               "group_norm", "instance_norm", "BatchNormState", "batch_norm_init",
               "batch_norm", "batch_renorm", "update_running_stats", "fold_batch_norm"):
    assert name in jaxnorm.__all__


def test_import_jaxnorm_does_not_import_flax():
  # jaxnorm.interop reads torch tensors by duck typing, so it must not import torch either.
  code = ("import sys, jaxnorm, jaxnorm.interop; "
          "sys.exit(any(m.split('.')[0] in ('flax', 'optax', 'torch', 'equinox') "
          "for m in sys.modules))")
  assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_version_lives_in_one_place_and_py_typed_ships():
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" in meta["project"]["dynamic"]
  assert meta["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "jaxnorm._version.__version__"
  assert meta["project"]["dependencies"] == ["jax>=0.6.0", "absl-py"]
  assert (ROOT / "jaxnorm" / "py.typed").is_file()
  assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["jaxnorm"]
  assert jaxnorm.__version__.count(".") == 2


# The install hint of each optional dependency: the form that works from a clone and the form
# that works from a package index once jaxnorm is released there (`jaxnorm[flax]` alone is on
# no index today, and unquoted it is a glob in zsh).
_HINT_CASES = [("flax", "jaxnorm.linen"), ("flax", "jaxnorm.nnx"), ("equinox", "jaxnorm.equinox")]


@pytest.mark.parametrize(("extra", "module"), _HINT_CASES)
def test_missing_optional_dependency_gives_both_install_commands(extra, module):
  code = (f"import sys; sys.modules[{extra!r}] = None\n"
          f"try:\n  __import__({module!r})\nexcept ImportError as e:\n  print(e)\n"
          f"else:\n  sys.exit(2)")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  message = result.stdout
  assert module in message and f"needs {extra}" in message, message
  assert f'pip install -e ".[{extra}]"' in message, message   # from a clone
  assert f'pip install "jaxnorm[{extra}]"' in message, message  # from an index, once released


def test_the_docs_give_both_install_commands():
  for page in ("docs/guides/flax.md", "docs/guides/equinox.md", "docs/api/index.md", "README.md"):
    text = (ROOT / page).read_text()
    assert not re.search(r"pip install jaxnorm\[", text), f"{page}: unquoted, on no index"
