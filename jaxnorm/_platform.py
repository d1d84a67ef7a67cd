"""What differs per platform: the one CPU-or-elsewhere switch and XLA:CPU's barriers.

Programs are traced once and may be compiled for any backend (`jax.export`, a CPU host driving
accelerators), so per-platform choices are made by `jax.lax.platform_dependent`, which keeps
the branch of the platform a program is compiled for. Why each choice is made, and what was
measured, is in docs/guides/internals.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def switch(*args: Any, cpu: Callable[..., Any], default: Callable[..., Any],
           **platforms: Callable[..., Any]) -> Any:
  """`cpu(*args)` in programs compiled for CPU, `platforms[name](*args)` for a named platform
  (e.g. `tpu=`), `default(*args)` elsewhere."""
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default, **platforms)


def _varying_axes(a: Any) -> frozenset:
  """The mesh axes over which `a` varies inside `jax.shard_map` (empty elsewhere)."""
  aval = jax.typeof(a)
  mat = getattr(aval, "manual_axis_type", None)  # JAX 0.10; earlier versions call it `vma`
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _as_barrier_types(x: Any) -> Any:
  """`x` with the types `lax.optimization_barrier(x)` gives: under `jax.shard_map` every leaf
  varies over the mesh axes that any leaf varies over."""
  leaves, tree = jax.tree.flatten(x)
  axes = frozenset().union(*(_varying_axes(a) for a in leaves))
  return jax.tree.unflatten(tree, [
      jax.lax.pcast(a, tuple(sorted(axes - _varying_axes(a))), to="varying")
      if axes - _varying_axes(a) else a for a in leaves])


def cpu_barrier(x: Any) -> Any:
  """`lax.optimization_barrier(x)` in programs compiled for CPU, `x` itself elsewhere.

  The barrier keeps XLA:CPU from sharing one full-size expression between fusions (a broadcast
  of a statistic, the float32 conversion of bfloat16 input), which it would write out at x's
  size. On GPU that sharing happens inside one fused kernel, and a barrier would split the
  kernel in two (docs/guides/internals.md, "Barriers"). Both branches give the same types.
  """
  return switch(x, cpu=jax.lax.optimization_barrier, default=_as_barrier_types)
