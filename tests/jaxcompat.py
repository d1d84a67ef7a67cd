"""The tests' spellings of JAX and flax APIs that differ across the supported releases.

The package's own differences are in `jaxnorm/_compat.py`; these are the ones only tests (and
their references) use. Each comment names the release where the spelling changed. The floor
run (`.ci/run`, `-m floor`) uses them on the oldest declared JAX and flax.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxnorm import _compat, _platform


def enable_x64(on: bool = True) -> contextlib.AbstractContextManager:
  """64-bit types inside the block."""
  if hasattr(jax, "enable_x64"):  # JAX 0.8.0
    return jax.enable_x64(on)
  from jax.experimental import disable_x64
  from jax.experimental import enable_x64 as _enable_x64

  return _enable_x64() if on else disable_x64()


def shard_map(f: Callable, *, mesh: Any, in_specs: Any, out_specs: Any,
              check_vma: bool = True) -> Callable:
  """`jax.shard_map`; before JAX 0.6.1, `jax.experimental.shard_map.shard_map`, whose
  replication check (`check_rep`) is what `check_vma` became."""
  if hasattr(jax, "shard_map"):  # JAX 0.6.1
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=check_vma)
  from jax.experimental.shard_map import shard_map as _shard_map

  return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def set_mesh(mesh: Any) -> contextlib.AbstractContextManager:
  """The mesh of explicit sharding inside the block."""
  if hasattr(jax, "set_mesh"):  # JAX 0.7.1 (before: jax.sharding.use_mesh)
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)


# Whether `jax.lax.platform_dependent` lowers only the target platform's branch (JAX 0.7.2 does;
# 0.6 lowers every branch into one `case`, and XLA prunes the others when it compiles).
PRUNES_PLATFORM_BRANCHES = _compat.PRUNES_PLATFORM_BRANCHES
# The all-reduces that XLA's SPMD partitioner inserts for plain `jax.jit` over sharded input,
# beyond those of `jax.shard_map`: JAX 0.7.2's XLA merges the count's with the sums' (at most the
# shard_map's count); JAX 0.6's does not (one more). jaxnorm's own collectives are unchanged.
PARTITIONER_EXTRA = 0 if PRUNES_PLATFORM_BRANCHES else 1
NEEDS_PALLAS = pytest.mark.skipif(
    not PRUNES_PLATFORM_BRANCHES,
    reason=f"implementation='pallas' needs JAX 0.7.2 (jaxnorm._compat.check_pallas); installed: "
           f"JAX {jax.__version__}")


@functools.cache
def grad_in_checked_shard_map() -> bool:
  """Whether `jax.grad` of a varying scalar works inside `jax.shard_map` with its checks on.

  JAX 0.6.0 seeds the cotangent without the output's varying axes and fails on JAX code alone
  (`jax.grad(lambda v: jnp.sum(2 * v))`: "got float32[], but expected float32[]{d}"); 0.7.2
  does not. Without the checks (`check_rep=False` there) the gradient is right."""
  mesh = jax.make_mesh((2,), ("d",), devices=jax.devices()[:2])
  f = shard_map(jax.grad(lambda v: jnp.sum(2.0 * v)), mesh=mesh, in_specs=P("d"),
                out_specs=P("d"))
  try:
    f(jnp.zeros(2))
  except ValueError:
    return False
  return True


def pmap_names_mesh_axes() -> bool:
  """Whether, inside `jax.pmap`, the abstract mesh's manual axes name the pmap's axis (a JAX
  that runs pmap as a shard_map; JAX 0.6 does not)."""
  seen = []
  jax.pmap(lambda x: seen.append(jax.sharding.get_abstract_mesh().manual_axes) or x,
           axis_name="p")(jax.numpy.zeros(1))
  return "p" in seen[0]


def one_platform_lowering() -> contextlib.AbstractContextManager:
  """A block whose lowered text holds the CPU's branch alone, as the compiled program does:
  where `platform_dependent` does not prune the other platforms' branches when it lowers, the
  calls are traced under the CPU policy only (`_platform.forced`)."""
  if PRUNES_PLATFORM_BRANCHES:
    return contextlib.nullcontext()
  return _platform.forced(_platform.CPU)


def flax_at_least(release: str) -> bool:
  """Whether flax `release` or later is installed."""
  v = _compat.flax_version()
  return v is not None and v >= _compat.version(release)


def needs_flax(release: str, what: str) -> pytest.MarkDecorator:
  """Skip, naming the installed flax, where the test's reference `what` is newer than it."""
  have = _compat.flax_version()
  return pytest.mark.skipif(
      not flax_at_least(release),
      reason=f"{what} exists from flax {release}; installed: flax "
             f"{'.'.join(map(str, have)) if have else 'none'}")


# flax 0.12.0's nnx layers cast the input and the parameters to `dtype` before they normalize
# (`promote_dtype`); flax 0.11's cast nothing and round only the output, as flax.linen does.
FLAX_NNX_ROUNDS_INPUT = flax_at_least("0.12.0")

NEEDS_FLAX_INSTANCE_NORM = needs_flax("0.12.0", "flax.nnx.InstanceNorm (the reference layer)")
NEEDS_FLAX_VIEW = needs_flax("0.12.4", "flax.nnx.view")
