"""Eager (un-jitted) calls of jaxnorm and flax side by side: compilations, time, memory.

    python benchmarks/eager.py [--calls N] [--memory-calls M]

People debug and build models outside `jax.jit`: eager nnx modules, `Module.init` and
`Module.apply` called directly, `jax.grad` of a function that was never jitted. Each of those
calls should compile once, the first time, and cost about what flax's costs afterwards. For
each case this prints, for jaxnorm and for flax (linen or nnx, the same layer), the number of
XLA compilations of the first call and of the next `--calls` identical calls (counted from
JAX's own `/jax/core/compile/backend_compile_duration` events), the median milliseconds of
those calls, jaxnorm's time over flax's, and the growth of the process's resident memory over
`--memory-calls` further identical calls of jaxnorm's case.

The arrays are small (32x64), so the times are the per-call overhead of tracing, dispatch and
any compilation, not arithmetic.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm as jn

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compilations = [0]


def _on_event(event: str, duration: float, **kwargs: Any) -> None:
  del duration, kwargs
  if event == _COMPILE_EVENT:
    _compilations[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compilations(fn: Callable[[], Any]) -> int:
  """The number of XLA compilations that one call of `fn` (its result made ready) causes."""
  before = _compilations[0]
  jax.block_until_ready(fn())
  return _compilations[0] - before


def rss_mib() -> float:
  """The process's resident memory in MiB (Linux: /proc/self/statm)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cases() -> dict[str, dict[str, Callable[[], Callable[[], Any]]]]:
  """name -> {library: a factory of the call to repeat}. A factory builds the layer (outside
  the count); the call it returns is what is repeated."""
  import flax.linen as fnn
  from flax import nnx

  import jaxnorm.linen as jlinen
  import jaxnorm.nnx as jnnx

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 64)).astype(np.float32) + 3)
  g = jnp.ones(64)
  b = jnp.zeros(64)

  def jn_batch_norm():
    state = jn.batch_norm_init(64)
    return lambda: jn.batch_norm(x, state, training=True, momentum=0.9)

  def flax_batch_norm():  # flax has no functional batch norm: its layer's apply
    layer = fnn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = layer.init(jax.random.key(0), x)
    return lambda: layer.apply(variables, x, mutable=["batch_stats"])

  def jn_grad_layer_norm():
    return lambda: jax.grad(lambda x, g, b: jn.layer_norm(x, g, b).sum(), (0, 1, 2))(x, g, b)

  def flax_grad_layer_norm():
    layer = fnn.LayerNorm()
    variables = layer.init(jax.random.key(0), x)
    return lambda: jax.grad(lambda v, x: layer.apply(v, x).sum(), (0, 1))(variables, x)

  def linen_apply(module):
    def factory():
      layer = module.BatchNorm(use_running_average=False, momentum=0.9)
      variables = layer.init(jax.random.key(0), x)
      return lambda: layer.apply(variables, x, mutable=["batch_stats"])
    return factory

  def linen_init(module):
    def factory():
      layer = module.BatchNorm(use_running_average=False)
      return lambda: layer.init(jax.random.key(0), x)
    return factory

  def nnx_call(module):
    def factory():
      layer = module.BatchNorm(64, rngs=nnx.Rngs(0))
      return lambda: layer(x)
    return factory

  def nnx_construct(module):
    def factory():
      return lambda: module.BatchNorm(64, rngs=nnx.Rngs(0))
    return factory

  return {
      "batch_norm (training)": {"jaxnorm": jn_batch_norm, "flax": flax_batch_norm},
      "grad(layer_norm)": {"jaxnorm": jn_grad_layer_norm, "flax": flax_grad_layer_norm},
      "linen BatchNorm.apply": {"jaxnorm": linen_apply(jlinen), "flax": linen_apply(fnn)},
      "linen BatchNorm.init": {"jaxnorm": linen_init(jlinen), "flax": linen_init(fnn)},
      "nnx BatchNorm()": {"jaxnorm": nnx_construct(jnnx), "flax": nnx_construct(nnx)},
      "nnx BatchNorm.__call__": {"jaxnorm": nnx_call(jnnx), "flax": nnx_call(nnx)},
  }


def measure(factory: Callable[[], Callable[[], Any]], calls: int) -> dict[str, float]:
  call = factory()
  first = compilations(call)
  again = sum(compilations(call) for _ in range(calls))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return {"first": first, "again": again, "ms": 1e3 * statistics.median(times)}


def memory_growth(factory: Callable[[], Callable[[], Any]], calls: int) -> float:
  """RSS growth in MiB over `calls` identical calls, after 20 calls to warm up."""
  call = factory()
  for _ in range(20):
    jax.block_until_ready(call())
  gc.collect()
  before = rss_mib()
  for _ in range(calls):
    jax.block_until_ready(call())
  gc.collect()
  return rss_mib() - before


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calls", type=int, default=10, help="timed calls per case (10)")
  parser.add_argument("--memory-calls", type=int, default=200,
                      help="calls over which memory growth is measured (200; 0 skips it)")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {args.calls} calls per case")
  print("| case | jaxnorm compiles (first, next) | flax compiles | jaxnorm ms | flax ms | "
        f"ratio | jaxnorm RSS growth over {args.memory_calls} calls |")
  print("|---|---|---|---|---|---|---|")
  for name, libs in cases().items():
    ours, theirs = measure(libs["jaxnorm"], args.calls), measure(libs["flax"], args.calls)
    growth = memory_growth(libs["jaxnorm"], args.memory_calls) if args.memory_calls else 0.0
    print(f"| {name} | {ours['first']}, {ours['again']} | {theirs['first']}, "
          f"{theirs['again']} | {ours['ms']:.2f} | {theirs['ms']:.2f} | "
          f"{ours['ms'] / theirs['ms']:.2f}x | {growth:+.1f} MiB |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
