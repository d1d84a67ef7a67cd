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


def cpu_barrier(x: Any) -> Any:
  """`lax.optimization_barrier(x)` in programs compiled for CPU, `x` itself elsewhere.

  The barrier keeps XLA:CPU from sharing one full-size expression between fusions (a broadcast
  of a statistic, the float32 conversion of bfloat16 input), which it would write out at x's
  size. On GPU that sharing happens inside one fused kernel, and a barrier would split the
  kernel in two (docs/guides/internals.md, "Barriers").
  """
  return switch(x, cpu=jax.lax.optimization_barrier, default=lambda x: x)
