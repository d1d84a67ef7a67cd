"""Test configuration: 8 fake CPU devices and strict dtype promotion, set before JAX starts;
and the one rule for the slow modules.

Slow modules run the examples (`test_example*.py`), the benchmarks (`test_benchmark*.py`) or
several real processes (`test_distributed.py`, `test_multihost.py`); they check that programs
run and report, not numerical bounds, and are marked `slow`. Every other test is a numerical or
contract test, which `.ci/run` runs a second time under `XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`
with `-m "not slow"`, so that no tolerance that holds for only one XLA:CPU reduction kernel can
land. A new example or benchmark test is slow by its name.

The floor modules (`FLOOR_MODULES`, marked `floor`) are the part of the suite that `.ci/floor`
runs on the oldest declared releases (`.ci/constraints-floor.txt`): the core, the linen, nnx and
equinox drop-ins against that flax and equinox, and the statistics across devices.
"""

import os
import pathlib

import jax
import pytest
from hypothesis import HealthCheck, Phase, settings

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Hypothesis profiles of the generated tests (test_generated*.py, test_bad_inputs.py and the
# property tests): "ci", the default, draws a fixed (derandomized) set of examples, so every CI
# run tests the same inputs and a failure reproduces; "long" (HYPOTHESIS_PROFILE=long) draws
# many more (HYPOTHESIS_MAX_EXAMPLES, default 1000 per test), at random, for a search before a
# release. No deadline: the first example of each shape compiles.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          print_blob=True, phases=(Phase.explicit, Phase.generate, Phase.shrink),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", deadline=None, print_blob=True,
                          max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 1000)),
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SLOW_PREFIXES = ("test_example", "test_benchmark")
SLOW_MODULES = frozenset({"test_distributed.py", "test_multihost.py"})


FLOOR_MODULES = frozenset({
    "test_compat.py", "test_normalize.py", "test_batch_norm.py", "test_stats.py",
    "test_gradients.py", "test_eager.py", "test_platform_branches.py",
    "test_cross_device.py", "test_replicas.py", "test_shard_map_narrow.py",
    "test_linen.py", "test_nnx.py", "test_flax_compat.py", "test_equinox.py",
    "test_packaging.py",
})


def is_slow(module: str) -> bool:
  return module.startswith(SLOW_PREFIXES) or module in SLOW_MODULES


def pytest_collection_modifyitems(config, items):
  for item in items:
    module = pathlib.Path(str(item.fspath)).name
    if is_slow(module):
      item.add_marker(pytest.mark.slow)
    if module in FLOOR_MODULES:
      item.add_marker(pytest.mark.floor)
