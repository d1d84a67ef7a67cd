"""Test configuration: 8 fake CPU devices and strict dtype promotion, set before JAX starts;
and the one list of the slow modules.

Modules in `SLOW_MODULES` (they run the examples, the benchmarks or two real processes; they
check that programs run and report, not numerical bounds) are marked `slow`. Every other test
is a numerical or contract test, which `.ci/run` runs a second time under
`XLA_FLAGS=--xla_cpu_max_isa=SSE4_2` with `-m "not slow"`, so that no tolerance that holds for
only one XLA:CPU reduction kernel can land. A new slow module is added here.
"""

import pathlib

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")

SLOW_MODULES = frozenset({
    "test_benchmarks.py",
    "test_distributed.py",
    "test_example_flax_resnet.py",
    "test_examples_data_parallel.py",
    "test_examples_demo.py",
})


def pytest_collection_modifyitems(config, items):
  for item in items:
    if pathlib.Path(str(item.fspath)).name in SLOW_MODULES:
      item.add_marker(pytest.mark.slow)
