"""Runs the doctested examples of every public docstring and of the README's quick start."""

import doctest
import importlib
import pathlib
import pkgutil

import pytest

import jaxnorm

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxnorm.__path__, "jaxnorm."))
OPTIONS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


@pytest.mark.parametrize("name", MODULES)
def test_module_docstrings(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=OPTIONS)
  assert result.failed == 0


def test_every_public_function_has_a_doctested_example():
  finder = doctest.DocTestFinder()
  for name in jaxnorm.__all__:
    obj = getattr(jaxnorm, name)
    if isinstance(obj, type):  # NamedTuples document their fields, not an example
      continue
    tests = finder.find(obj, name)
    assert any(t.examples for t in tests), f"jaxnorm.{name} has no doctested example"


def test_readme_quick_start():
  result = doctest.testfile(str(ROOT / "README.md"), module_relative=False, optionflags=OPTIONS)
  assert result.attempted > 0
  assert result.failed == 0
