"""Fused Pallas kernels for layer and RMS normalization over the last axis, and when they apply.

The plain case only: `x` of shape `(..., F)` flattened to `(R, F)` rows, statistics and
parameters over the last axis, no mask, no devices. `obstacle` says why a call is outside it;
`normalize_rows` runs the kernels (`add_normalize_rows` the residual add's, which add the
residual stream in front of the normalization): Mosaic kernels (`_mosaic`) in programs compiled
for TPUs, Triton kernels (`_triton`) for GPUs, the Triton kernels in Pallas interpret mode on
CPU. The arithmetic of every kernel is `_math`'s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._platform import Policy, by_platform
from . import _mosaic, _triton
from ._math import add_math, backward_math, forward_math

# The tracers of JAX's partial evaluator, which stages out the tangents of reverse-mode
# linearization: used only to tell it from forward mode (`normalize_rows` says why nothing
# public can). `jax.interpreters` re-exports the class outside JAX's covered public API.
try:
  from jax.interpreters.partial_eval import JaxprTracer as _LinearTracer
except ImportError:  # pragma: no cover - a later JAX: every tangent then takes the XLA path
  _LinearTracer = ()  # type: ignore[assignment,misc]

MAX_FEATURES = 16384
"""The largest feature size the kernels take (one row on chip); beyond it, the XLA path."""

DTYPES = ("float32", "bfloat16", "float16")


def obstacle(x: jax.Array, scale: Any, bias: Any, epsilon: Any, mask: Any,
             reduction_axes: tuple[int, ...], feature_axes: tuple[int, ...],
             axis_name: Any) -> str | None:
  """Why the kernels do not apply to a call, or None in the plain case."""
  last = (x.ndim - 1,)
  if x.ndim == 0:
    return "a scalar input"
  if reduction_axes != last:
    return f"reduction_axes={reduction_axes} (the kernels reduce over the last axis only)"
  if feature_axes != last:
    return f"feature_axes={feature_axes} (the kernels take parameters along the last axis)"
  if mask is not None:
    return "a mask"
  if axis_name is not None:
    return f"axis_name={axis_name!r} (a reduction across devices)"
  for name, a in (("scale", scale), ("bias", bias)):
    if a is not None and jnp.shape(a) != x.shape[-1:]:
      return (f"{name} of shape {jnp.shape(a)} (the kernels take parameters of the feature "
              f"shape {x.shape[-1:]}, not per-example ones)")
  for name, a in (("x", x), ("scale", scale), ("bias", bias)):
    if a is not None and jnp.dtype(jnp.result_type(a)).name not in DTYPES:
      return (f"{name} of dtype {jnp.dtype(jnp.result_type(a)).name} (the kernels take "
              f"{', '.join(DTYPES)})")
  if isinstance(epsilon, jax.core.Tracer):
    return "a traced epsilon (the kernels take a Python float)"
  if jax.default_backend() not in ("cpu", "gpu", "tpu"):
    return (f"the {jax.default_backend()} backend (the kernels are Triton kernels for GPUs and "
            f"Mosaic kernels for TPUs)")
  return None


def _kernel_for(policy: Policy, kernel: Callable[..., Any], reference: Callable[..., Any],
                k: _Rows) -> Callable[..., Any]:
  """`by_platform`'s branch of a kernel call: `kernel(_mosaic, k, *args, interpret=False)`
  where the policy takes the Mosaic kernels (the XLA `reference(k, *args)` where they do not
  apply to `k`), else `kernel(_triton, k, *args, interpret=...)`, in Pallas interpret mode
  where the policy says so (CPU). Every branch is traced whatever the platform, so each must
  trace everywhere."""
  if policy.kernels == "mosaic":
    if not k.mosaic:
      return functools.partial(reference, k)
    return functools.partial(kernel, _mosaic, k, interpret=False)
  return functools.partial(kernel, _triton, k, interpret=policy.interpret_kernels)


class _Rows(NamedTuple):
  """A normalization of `(rows, features)` rows by the kernels (static)."""

  features: int
  eps: float
  centered: bool
  has_scale: bool
  has_bias: bool
  bias_dtype: Any
  mosaic: bool  # the Mosaic kernels take these rows on TPU (else XLA there)
  y_dtype: Any = None  # the residual kernels' dtypes (`add_normalize_rows`): y's, h's,
  h_dtype: Any = None
  in_dtypes: tuple[Any, ...] = ()  # and x's and the residual's (their cotangents')

  def split(self, params):
    """`(scale, bias)` from the parameters given (None where absent)."""
    it = iter(params)
    return (next(it) if self.has_scale else None), (next(it) if self.has_bias else None)

  def split_rest(self, rest):
    """The backward kernel's inputs after x and dy, `(*stats, [scale])`, as (stats, scale)."""
    return rest[:len(rest) - self.has_scale], (rest[-1] if self.has_scale else None)


def _forward_kernel(module: Any, k: _Rows, x2, *params, interpret: bool):
  return tuple(module.forward_call(x2, params, eps=k.eps, centered=k.centered,
                                   has_scale=k.has_scale, has_bias=k.has_bias,
                                   interpret=interpret))


def _forward_ref(k: _Rows, x2, *params):
  f32 = jnp.float32
  s, b = k.split(params)
  y, mean, rstd = forward_math(x2.astype(f32), None if s is None else s.astype(f32),
                               None if b is None else b.astype(f32), None, k.features,
                               k.eps, k.centered)
  return (y.astype(x2.dtype),) + ((mean,) if k.centered else ()) + (rstd,)


def _add_forward_kernel(module: Any, k: _Rows, x2, r2, *params, interpret: bool):
  return tuple(module.add_forward_call(x2, r2, params, eps=k.eps, centered=k.centered,
                                       has_scale=k.has_scale, has_bias=k.has_bias,
                                       y_dtype=k.y_dtype, h_dtype=k.h_dtype,
                                       interpret=interpret))


def _add_forward_ref(k: _Rows, x2, r2, *params):
  f32 = jnp.float32
  s, b = k.split(params)
  h, h32 = add_math(x2, r2, k.h_dtype)
  y, mean, rstd = forward_math(h32, None if s is None else s.astype(f32),
                               None if b is None else b.astype(f32), None, k.features,
                               k.eps, k.centered)
  return (y.astype(k.y_dtype), h) + ((mean,) if k.centered else ()) + (rstd,)


def _backward_kernel(module: Any, k: _Rows, x2, dy2, *rest, interpret: bool):
  stats, s = k.split_rest(rest)
  out = module.backward_call(x2, dy2, stats, s, has_bias=k.has_bias, bias_dtype=k.bias_dtype,
                             centered=k.centered, interpret=interpret)
  return tuple(o for o in out if o is not None)


def _add_backward_kernel(module: Any, k: _Rows, h2, dy2, dh2, *rest, interpret: bool):
  stats, s = k.split_rest(rest)
  dxs, *dparams = module.backward_call(h2, dy2, stats, s, has_bias=k.has_bias,
                                      bias_dtype=k.bias_dtype, centered=k.centered,
                                      interpret=interpret, dh2=dh2, out_dtypes=k.in_dtypes)
  return (*dxs, *(o for o in dparams if o is not None))


def _add_backward_ref(k: _Rows, h2, dy2, dh2, *rest):
  dx, *dparams = _backward_ref(k, h2, dy2, *rest)
  dx = dx.astype(jnp.float32) + dh2.astype(jnp.float32)
  return (*(dx.astype(d) for d in k.in_dtypes), *dparams)


def _backward_ref(k: _Rows, x2, dy2, *rest):
  f32 = jnp.float32
  stats, s = k.split_rest(rest)
  mean, rstd = stats if k.centered else (None, stats[0])
  dx, dg, db = backward_math(x2.astype(f32), dy2.astype(f32), mean, rstd,
                             None if s is None else s.astype(f32), None, k.features,
                             k.centered)
  out = [dx.astype(x2.dtype)]
  if s is not None:
    out.append(dg.astype(s.dtype))
  if k.has_bias:
    out.append(db.astype(k.bias_dtype))
  return tuple(out)


def _forward_branch(policy: Policy, k: _Rows) -> Callable[..., Any]:
  return _kernel_for(policy, _forward_kernel, _forward_ref, k)


def _add_forward_branch(policy: Policy, k: _Rows) -> Callable[..., Any]:
  return _kernel_for(policy, _add_forward_kernel, _add_forward_ref, k)


def _add_backward_branch(policy: Policy, k: _Rows) -> Callable[..., Any]:
  return _kernel_for(policy, _add_backward_kernel, _add_backward_ref, k)


def _backward_branch(policy: Policy, k: _Rows) -> Callable[..., Any]:
  return _kernel_for(policy, _backward_kernel, _backward_ref, k)


def _forward(k: _Rows):
  """The forward kernel, with a forward-mode derivative from `forward_math` on whole arrays."""

  @jax.custom_jvp
  def forward(x2, *params):
    return tuple(by_platform(_forward_branch, k, x2, *params))

  forward.defjvp(lambda p, t: jax.jvp(functools.partial(_forward_ref, k), p, t))
  return forward


def _add_forward(k: _Rows):
  """The residual forward kernel, with a forward-mode derivative from `_add_forward_ref`."""

  @jax.custom_jvp
  def add_forward(x2, r2, *params):
    return tuple(by_platform(_add_forward_branch, k, x2, r2, *params))

  add_forward.defjvp(lambda p, t: jax.jvp(functools.partial(_add_forward_ref, k), p, t))
  return add_forward


def _backward(k: _Rows):
  """The backward kernel, with a forward-mode derivative from `backward_math`."""

  @jax.custom_jvp
  def backward(x2, dy2, *rest):
    return by_platform(_backward_branch, k, x2, dy2, *rest)

  backward.defjvp(lambda p, t: jax.jvp(functools.partial(_backward_ref, k), p, t))
  return backward


def _add_backward(k: _Rows):
  """The backward kernel of the residual add: `dh + norm'(h)ᵀ dy` in x's dtype and in the
  residual's (both inputs' cotangents) and the parameters', with a forward-mode derivative
  from `_add_backward_ref`."""

  @jax.custom_jvp
  def add_backward(h2, dy2, dh2, *rest):
    return by_platform(_add_backward_branch, k, h2, dy2, dh2, *rest)

  add_backward.defjvp(lambda p, t: jax.jvp(functools.partial(_add_backward_ref, k), p, t))
  return add_backward


def _kernels(k: _Rows):
  """The forward kernel whose reverse-mode derivative is the backward kernel."""
  forward, backward = _forward(k), _backward(k)

  @jax.custom_vjp
  def kernels(x2, *params):
    return forward(x2, *params)[0]

  def kernels_fwd(x2, *params):
    y, *stats = forward(x2, *params)
    return y, (x2, tuple(stats), params)

  def kernels_bwd(res, dy2):
    x2, stats, params = res
    s, _ = k.split(params)
    return tuple(backward(x2, dy2, *stats, *(() if s is None else (s,))))

  kernels.defvjp(kernels_fwd, kernels_bwd)
  return kernels


def _add_kernels(k: _Rows):
  """The residual forward kernel, `(y, h)`, whose reverse-mode derivative is the backward
  kernel run on `h` that adds `h`'s own cotangent: both inputs' is `dh + norm'(h)ᵀ dy`."""
  forward, backward = _add_forward(k), _add_backward(k)

  @jax.custom_vjp
  def kernels(x2, r2, *params):
    y, h, *_ = forward(x2, r2, *params)
    return y, h

  def kernels_fwd(x2, r2, *params):
    y, h, *stats = forward(x2, r2, *params)
    return (y, h), (h, tuple(stats), params)

  def kernels_bwd(res, cotangents):
    h, stats, params = res
    dy2, dh2 = cotangents
    s, _ = k.split(params)
    return tuple(backward(h, dy2, dh2.astype(h.dtype), *stats, *(() if s is None else (s,))))

  kernels.defvjp(kernels_fwd, kernels_bwd)
  return kernels


def _tangents_by_mode(kernels: Callable[..., Any], xla: Callable[..., Any]):
  """`kernels`, whose derivative is theirs in reverse mode and `xla`'s in forward mode
  (`normalize_rows` says why and how)."""

  @jax.custom_jvp
  def fused(*args):
    return kernels(*args)

  @fused.defjvp
  def fused_jvp(primals, tangents):
    if any(isinstance(t, _LinearTracer) for t in tangents):  # reverse-mode linearization
      return jax.jvp(kernels, primals, tangents)
    _, dy = jax.jvp(xla, primals, tangents)
    return kernels(*primals), dy

  return fused


def _mosaic_takes(features: int, dtype: Any, wide: Any, params: tuple[Any, ...]) -> bool:
  return (_mosaic.supports(features, dtype, wide=wide)
          and all(jnp.dtype(p.dtype).name in _mosaic.DTYPES for p in params if p is not None))


def normalize_rows(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                   eps: float, *, centered: bool,
                   xla: Callable[..., jax.Array]) -> jax.Array:
  """Layer (`centered`) or RMS normalization of `x` over its last axis with the kernels.

  `x` is float32, bfloat16 or float16 with at most `MAX_FEATURES` features; `scale` and
  `bias` have shape `(F,)`; `eps` is a Python float. `xla(x, scale, bias)` is the same
  normalization on the XLA path (a function JAX can differentiate in forward mode).

  Differentiation. Reverse mode runs the backward kernel through a `jax.custom_vjp`. JAX
  cannot differentiate a `custom_vjp` in forward mode and cannot transpose a `pallas_call`,
  and its public API has no linear function with a custom transpose that survives `jax.vmap`
  and second derivatives (`jax.custom_derivatives.linear_call` has no batching rule and no
  derivative in its residuals; a `custom_vjp` inside a tangent cannot be transposed).
  So the whole is a `jax.custom_jvp` whose rule looks at the tangents it is given: during
  reverse-mode linearization (`jax.grad`, `jax.vjp`; tangents that JAX's partial evaluator
  stages out) it differentiates the `custom_vjp`, so that the transposed program calls the
  backward kernel; otherwise (`jax.jvp`, `jax.jacfwd`) it keeps the kernel's `y` and takes the
  tangent from `xla`, which is exact and linear. Either choice gives the same derivative; the
  test only picks which kernels compute it. It cannot see through everything: the gradient of
  a function JAX has already traced (`jax.jit`, `jax.checkpoint`) or batched (`jax.vmap`)
  linearizes with tangents that look like forward mode, so its backward pass runs on the XLA
  path; `jax.linearize` followed by a call of its linear function is JAX's forward-mode error.
  The kernel calls themselves differentiate through `forward_math` and `backward_math` on
  whole arrays, so that `jax.hessian` works too.
  """
  lead, features = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(math.prod(lead), features)
  k = _Rows(features, eps, centered, scale is not None, bias is not None,
            None if bias is None else bias.dtype,
            _mosaic_takes(features, x.dtype, None, (scale, bias)))
  params = tuple(p for p in (scale, bias) if p is not None)
  fused = _tangents_by_mode(_kernels(k), lambda x2, *p: xla(x2, *k.split(p)))
  return fused(x2, *params).reshape(x.shape)


def add_normalize_rows(x: jax.Array, residual: jax.Array, scale: jax.Array | None,
                       bias: jax.Array | None, eps: float, *, centered: bool, h_dtype: Any,
                       y_dtype: Any, xla: Callable[..., jax.Array]
                       ) -> tuple[jax.Array, jax.Array]:
  """`(y, h)`: `h = x + residual` in `h_dtype` and its normalization `y` in `y_dtype`, by one
  forward kernel that reads `x` and `residual` and writes `h`, `y` and the statistics.

  As `normalize_rows` (same plain case, same differentiation), with `residual` of `x`'s shape
  in a dtype the kernels take, `h_dtype` their promoted dtype and `y_dtype` one the kernels
  take; the statistics are those of the rounded `h` in float32, `y` rounded once to `y_dtype`
  (a wider `y_dtype` than `h`'s: the norm of `h` converted to it, exactly). Reverse mode runs
  the backward kernel on `h` with `h`'s own cotangent as an extra input, added on chip, and
  writes both inputs' cotangents.
  `xla(x, residual, scale, bias)` is the same on the XLA path.
  """
  lead, features = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(math.prod(lead), features)
  r2 = residual.reshape(x2.shape)
  k = _Rows(features, eps, centered, scale is not None, bias is not None,
            None if bias is None else bias.dtype,
            _mosaic_takes(features, *_mosaic.add_dtypes(x.dtype, residual.dtype, y_dtype),
                          (scale, bias)),
            jnp.dtype(y_dtype), jnp.dtype(h_dtype), (x.dtype, residual.dtype))
  params = tuple(p for p in (scale, bias) if p is not None)
  fused = _tangents_by_mode(_add_kernels(k),
                            lambda x2, r2, *p: xla(x2, r2, *k.split(p)))
  y, h = fused(x2, r2, *params)
  return y.reshape(x.shape), h.reshape(x.shape)
