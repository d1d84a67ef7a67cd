"""Test configuration: 8 fake CPU devices and strict dtype promotion, set before JAX starts;
and the one rule for the slow modules.

Slow modules run the examples (`test_example*.py`), the benchmarks (`test_benchmark*.py`) or
several real processes (`test_distributed.py`, `test_multihost.py`); they check that programs
run and report, not numerical bounds, and are marked `slow`. Every other test is a numerical or
contract test, which `.ci/run` runs a second time under `XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`
with `-m "not slow"`, so that no tolerance that holds for only one XLA:CPU reduction kernel can
land. A new example or benchmark test is slow by its name.
"""

import pathlib

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")

SLOW_PREFIXES = ("test_example", "test_benchmark")
SLOW_MODULES = frozenset({"test_distributed.py", "test_multihost.py"})


def is_slow(module: str) -> bool:
  return module.startswith(SLOW_PREFIXES) or module in SLOW_MODULES


def pytest_collection_modifyitems(config, items):
  for item in items:
    if is_slow(pathlib.Path(str(item.fspath)).name):
      item.add_marker(pytest.mark.slow)
