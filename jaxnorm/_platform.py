"""Every choice that differs per platform, as named data, and the one way programs make it.

Programs are traced once and may be compiled for any backend (`jax.export`, a CPU host driving
accelerators), so a public call makes its per-platform choice with one
`jax.lax.platform_dependent` (`by_platform`), whose branches each run the whole computation
under one `Policy`. The numerics read plain fields of the policy they are given. Why each
field has the value it has on each platform, and what was measured, is written once, in
docs/guides/internals.md ("The platform policy").

Tests run another platform's branch on the CPU by tracing under `forced(policy)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Hashable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._compat import pcast_varying, varying_axes


class Policy(NamedTuple):
  """How a program compiled for one platform computes (static, hashable)."""

  name: str
  # XLA:CPU: optimization barriers that keep one full-size expression from being shared
  # between fusions (and written out); elsewhere they would split a fused kernel.
  barriers: bool
  # `jax.checkpoint`'s CSE barrier around the fused normalizer.
  prevent_cse: bool
  # Normalization with given statistics of narrow input under `jax.checkpoint`, so that
  # reverse mode recomputes `x - mean` instead of keeping a float32 copy of x.
  recompute_given: bool
  # The moments of batch, instance and group normalization of images: "two_pass" or
  # "shifted" (one read of x, `_stats.shifted_moments`).
  column_moments: str
  # The moments of layer and group normalization of rows under differentiation: "two_pass"
  # or "shifted", for rows of at least
  # `row_moments_from` elements (and, unless `row_moments_narrow`, float32 or wider input).
  row_moments: str
  row_moments_from: int
  row_moments_narrow: bool
  # The one-read moments' shift sample (each set's three leading elements) taken by a kernel
  # of its own, for x of at least `sample_apart_from` bytes (None: never). Fused into its
  # consumers, XLA:TPU lays a large x out again, column-major, to read three columns of it.
  sample_apart_from: int | None
  # The fused residual add's layer norm (`add_layer_norm`) takes the rows' moments of
  # differentiation (`rows_take`) in its forward pass too: with the one-read moments XLA:TPU
  # computes the sum in the statistics' kernel, where the two-pass variance reads it back.
  residual_rows_forward: bool
  # Layer and RMS norm's tangent sums: against x̂ ("normalized") or against x - μ, multiplied
  # by the reciprocal standard deviation afterwards ("centred").
  tangent_sums: str
  # Layer and RMS norm's parameter gradients summed per block of rows, then over the blocks.
  blocked_param_grads: bool
  # The Pallas kernels: "triton" (interpreted where `interpret_kernels`) or "mosaic".
  kernels: str
  interpret_kernels: bool

  def sample_apart(self, nbytes: int) -> bool:
    """Whether the shift sample of an x of `nbytes` bytes is sliced by a kernel of its own."""
    return self.sample_apart_from is not None and nbytes >= self.sample_apart_from

  def rows_take(self, n: int, dtype: Any) -> str:
    """The moments algorithm for rows of `n` elements of `dtype` under differentiation."""
    if n < self.row_moments_from or (not self.row_moments_narrow
                                     and jnp.dtype(dtype).itemsize < 4):
      return "two_pass"
    return self.row_moments


# Any other backend: no barriers, two-pass moments, the Triton kernels compiled. The others
# say where they differ from it.
OTHER = Policy("other", barriers=False, prevent_cse=False, recompute_given=False,
               column_moments="two_pass", row_moments="two_pass", row_moments_from=0,
               row_moments_narrow=True, sample_apart_from=None, residual_rows_forward=False,
               tangent_sums="centred",
               blocked_param_grads=False, kernels="triton", interpret_kernels=False)
CPU = OTHER._replace(name="cpu", barriers=True, prevent_cse=True, recompute_given=True,
                     tangent_sums="normalized", interpret_kernels=True)
GPU = OTHER._replace(name="gpu", column_moments="shifted", row_moments="shifted",
                     blocked_param_grads=True)
TPU = OTHER._replace(name="tpu", row_moments="shifted", row_moments_from=4096,
                     row_moments_narrow=False, sample_apart_from=48 * 2**20,
                     residual_rows_forward=True, kernels="mosaic")

# `platform_dependent`'s platform names; branches of one policy are one branch.
_BY_PLATFORM = {"cpu": CPU, "cuda": GPU, "rocm": GPU, "tpu": TPU, "default": OTHER}

_forced: contextvars.ContextVar[Policy | None] = contextvars.ContextVar("jaxnorm_policy",
                                                                        default=None)


@contextlib.contextmanager
def forced(policy: Policy) -> Iterator[None]:
  """Within the block, calls are traced with `policy` alone, on any backend (for tests: a
  GPU's or a TPU's branch run on the CPU). Entry points that cache traces key them on it."""
  token = _forced.set(policy)
  try:
    yield
  finally:
    _forced.reset(token)


def current() -> Policy | None:
  """The policy that `forced` imposes, or None: the platform's, chosen by `by_platform`."""
  return _forced.get()


@functools.lru_cache(maxsize=4096)
def _entry(make: Callable[[Policy, Any], Callable[..., Any]], static: Hashable,
           policy: Policy | None) -> Callable[..., Any]:
  """The jitted call of `by_platform`: built once per key, so that its branch functions (one
  per policy, shared by the platforms of one policy) are the same objects on every call."""
  if policy is not None:
    return jax.jit(make(policy, static), inline=False)
  made = {p: make(p, static) for p in set(_BY_PLATFORM.values())}
  branches = {name: made[p] for name, p in _BY_PLATFORM.items()}
  return jax.jit(lambda *args: jax.lax.platform_dependent(*args, **branches), inline=False)


def by_platform(make: Callable[[Policy, Any], Callable[..., Any]], static: Hashable,
                *args: Any) -> Any:
  """`make(policy, static)(*args)` under the policy of the platform that the program is
  compiled for (or the one `forced` imposes): one `platform_dependent`.

  `make` is a module-level function and `static` hashable. Equal ones find the same branch
  functions, in one jitted function per `(make, static, forced policy)`, so identical eager
  calls, their `jax.grad` included, trace and compile once. Inside a traced function it stays
  a call, which XLA inlines. (Inlined into the caller's jaxpr, `inline=True`, an eager
  `jax.grad` would transpose the `platform_dependent` afresh on every call, and compile it.)
  """
  return _entry(make, static, current())(*args)


def hashable(value: Any) -> Any:
  """`value` with every list (at any depth) made a tuple: axis names and index groups as keys
  of `by_platform`'s cache."""
  if isinstance(value, list | tuple):
    return tuple(hashable(v) for v in value)
  return value


def _varying_axes(a: Any) -> frozenset:
  """The mesh axes over which `a` varies inside `jax.shard_map` (empty elsewhere)."""
  return varying_axes(jax.typeof(a))


def _as_barrier_types(x: Any) -> Any:
  """`x` with the types `lax.optimization_barrier(x)` gives: under `jax.shard_map` every leaf
  varies over the mesh axes that any leaf varies over."""
  leaves, tree = jax.tree.flatten(x)
  axes = frozenset().union(*(_varying_axes(a) for a in leaves))
  return jax.tree.unflatten(tree, [
      pcast_varying(a, tuple(sorted(axes - _varying_axes(a))))
      if axes - _varying_axes(a) else a for a in leaves])


def barrier(policy: Policy, x: Any) -> Any:
  """`lax.optimization_barrier(x)` where the policy keeps barriers, else `x` with the same
  types (docs/guides/internals.md, "Barriers")."""
  return jax.lax.optimization_barrier(x) if policy.barriers else _as_barrier_types(x)
