"""`implementation="pallas"`: the fused Pallas kernels, run on the CPU in Pallas interpret mode.

Outputs and reverse-mode gradients against the XLA path and against float64 (autodiff of a
float64 formula on the same, rounded input), on awkward shapes: ragged row counts (the last row
block partly outside the array, whose padding interpret mode fills with NaN, so a missing mask
shows), feature sizes that are not powers of two (384, 1000), rank-3 input, float32 and
bfloat16, with and without parameters. Then the choice of kernel, forward mode, second order,
the wrappers, and the bad inputs.

Tolerances come from error bounds, elementwise, computed from the float64 values of what the
kernels compute (`_bounds`): each kernel and the XLA path evaluate the same float32 formula with
sums of n terms in some order, each within n·eps·Σ|terms| of the exact sum (worst case, any
order; the mean's error enters x - mean and so x̂); a bfloat16 output adds one rounding, half
an ulp, per value (two results rounded independently differ by up to one ulp).
"""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from jaxnorm import _pallas
from jaxnorm._pallas import _triton
from tests import jaxcompat

pytestmark = jaxcompat.NEEDS_PALLAS

F64 = jnp.float64
EPS32 = float(np.finfo(np.float32).eps)
EPS_OUT = {"float32": 0.0, "bfloat16": 2.0**-7, "float16": 2.0**-10}  # one ulp, relative
NORMS = {"layer_norm": True, "rms_norm": False}  # name -> centred


def _inputs(shape, dtype, seed=0):
  r = np.random.RandomState(seed)
  f = shape[-1]
  x = (r.randn(*shape) * 2.0 + 0.5).astype(np.float32)
  x = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))  # rounded to dtype
  scale = (r.rand(f) + 0.5).astype(np.float32)
  bias = r.randn(f).astype(np.float32)
  w = r.randn(*shape).astype(np.float32)
  return x, scale, bias, w


def _call(norm, x, scale, bias, implementation):
  if norm == "layer_norm":
    return jn.layer_norm(x, scale, bias, epsilon=1e-6, implementation=implementation)
  return jn.rms_norm(x, scale, epsilon=1e-6, implementation=implementation)


def _ref(centered, x, scale, bias):
  """The float64 formula, differentiated by JAX (under jax.enable_x64)."""
  mean = jnp.mean(x, -1, keepdims=True) if centered else 0.0
  xc = x - mean
  y = xc / jnp.sqrt(jnp.mean(xc * xc, -1, keepdims=True) + 1e-6)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


def _params(norm, scale, bias, with_params, dtype):
  if not with_params:
    return ()
  p = (scale,) if norm == "rms_norm" else (scale, bias)
  return tuple(jnp.asarray(a).astype(dtype) for a in p)


def _split(p):
  return (p[0] if p else None), (p[1] if len(p) > 1 else None)


def _value_and_grads(norm, x, params, w, implementation):
  """y and the vjp of the cotangent w (non-uniform) in one jitted program."""
  def run(x, params, w):
    y, pullback = jax.vjp(lambda x, *p: _call(norm, x, *_split(p), implementation), x,
                          *params)
    return y, pullback(w.astype(y.dtype))

  y, grads = jax.jit(run)(x, params, jnp.asarray(w))
  return np.asarray(y, np.float64), [np.asarray(g, np.float64) for g in grads]


def _float64(norm, x, params, w):
  with jaxcompat.enable_x64(True):
    args = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, *params)]
    y, pullback = jax.vjp(lambda x, *p: _ref(NORMS[norm], x, *_split(p)), *args)
    return np.asarray(y), [np.asarray(g) for g in pullback(jnp.asarray(w, F64))]


def _bounds(norm, x, params, w, dtype):
  """Elementwise error bounds of y, dx, dγ, dβ: float32 arithmetic, then rounding to `dtype`.

  From the float64 values of the quantities the kernels compute: a sum of n terms is within
  n·eps·Σ|terms| of the exact sum in any order, a product or quotient within eps (relative),
  and one rounding to the output dtype within half an ulp (a whole ulp between two results).
  Second-order terms are left to the factor 2 of `_assert_within`.
  """
  centered = NORMS[norm]
  e, eo = EPS32, EPS_OUT[jnp.dtype(dtype).name]
  f = x.shape[-1]
  rows = x.size // f
  x2 = np.asarray(x, np.float64).reshape(rows, f)
  w2 = np.asarray(w, np.float64).reshape(rows, f)
  p64 = [np.asarray(p, np.float64) for p in params]
  gam = p64[0] if p64 else np.ones(f)
  beta = p64[1] if len(p64) > 1 else np.zeros(f)
  mean = x2.mean(1, keepdims=True) if centered else 0.0
  xc = x2 - mean
  r = 1 / np.sqrt((xc * xc).mean(1, keepdims=True) + 1e-6)
  xh = xc * r
  d_mean = f * e * np.abs(x2).mean(1, keepdims=True) if centered else 0.0
  rel_r = (f + 4) * e + 2 * d_mean * np.abs(xc).mean(1, keepdims=True) * r * r
  d_xh = r * (d_mean + 2 * e * np.abs(xc)) + np.abs(xh) * rel_r
  y = xh * gam + beta
  y_tol = np.abs(gam) * d_xh + 4 * e * (np.abs(xh * gam) + np.abs(beta)) + eo * np.abs(y)
  # dx = r (g - x̂ c1 - c2), g = w γ, c1 = mean(g x̂), c2 = mean(g) (layer norm only).
  g = w2 * gam
  c1 = (g * xh).mean(1, keepdims=True)
  c2 = g.mean(1, keepdims=True) if centered else 0.0
  d_c1 = f * e * np.abs(g * xh).mean(1, keepdims=True) + (np.abs(g) * d_xh).mean(
      1, keepdims=True)
  d_c2 = f * e * np.abs(g).mean(1, keepdims=True) if centered else 0.0
  dx = r * (g - xh * c1 - c2)
  d_inner = (4 * e * (np.abs(g) + np.abs(xh * c1) + np.abs(c2)) + d_xh * np.abs(c1)
             + np.abs(xh) * d_c1 + d_c2)
  tols = [(r * d_inner + np.abs(dx) * rel_r + eo * np.abs(dx)).reshape(x.shape)]
  if params:  # dγ = Σ_rows w x̂
    dg = (w2 * xh).sum(0)
    tols.append(rows * e * np.abs(w2 * xh).sum(0) + (np.abs(w2) * d_xh).sum(0)
                + eo * np.abs(dg))
  if len(params) > 1:  # dβ = Σ_rows w
    tols.append(rows * e * np.abs(w2).sum(0) + eo * np.abs(w2.sum(0)))
  return y_tol.reshape(x.shape), tols


def _assert_within(got, want, tol, what):
  """|got - want| <= 2 tol elementwise (2: the bounds' neglected second-order terms)."""
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  worst = float((err / (2 * tol)).max())
  assert worst <= 1.0, f"{what}: error up to {worst:.3g} x its bound"


CASES = [  # (shape, dtype, with parameters): ragged rows, 384 and 1000 features, rank 3
    ((37, 384), jnp.float32, True),
    ((3, 5, 1000), jnp.bfloat16, True),
    ((37, 384), jnp.bfloat16, False),
    ((3, 5, 1000), jnp.float32, False),
]


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("shape,dtype,with_params", CASES)
def test_outputs_and_gradients_match_xla_and_float64(norm, shape, dtype, with_params):
  x, scale, bias, w = _inputs(shape, dtype)
  xd = jnp.asarray(x).astype(dtype)
  params = _params(norm, scale, bias, with_params, dtype)
  y_p, g_p = _value_and_grads(norm, xd, params, w, "pallas")
  y_x, g_x = _value_and_grads(norm, xd, params, w, "xla")
  w = np.asarray(jnp.asarray(w).astype(dtype).astype(jnp.float32))  # the cotangent used
  y64, g64 = _float64(norm, x, [np.asarray(p, np.float32) for p in params], w)
  y_tol, g_tols = _bounds(norm, x, params, w, dtype)
  assert np.isfinite(y_p).all() and all(np.isfinite(g).all() for g in g_p)
  _assert_within(y_p, y64, y_tol, "y vs float64")
  _assert_within(y_p, y_x, 2 * y_tol, "y vs xla")
  names = ("dx", "dscale", "dbias")[:len(g_p)]  # the gradients of the arguments given
  for name, gp, gx, g, tol in zip(names, g_p, g_x, g64, g_tols, strict=True):
    assert gp.shape == g.shape, name
    _assert_within(gp, g, tol, f"{name} vs float64")
    _assert_within(gp, gx, 2 * tol, f"{name} vs xla")


def test_float16_with_float32_statistics():
  try:  # XLA:CPU built for SSE4.2 only (--xla_cpu_max_isa=SSE4_2) cannot convert to float16
    jax.block_until_ready(jnp.ones((2,), jnp.float32).astype(jnp.float16))
  except jax.errors.JaxRuntimeError as e:
    pytest.skip(f"this XLA:CPU cannot convert float32 to float16: {str(e)[:80]}")
  x, scale, bias, w = _inputs((6, 96), jnp.float16, seed=6)
  params = _params("layer_norm", scale, bias, True, jnp.float16)
  y_p, g_p = _value_and_grads("layer_norm", jnp.asarray(x).astype(jnp.float16), params, w,
                              "pallas")
  w = np.asarray(jnp.asarray(w).astype(jnp.float16).astype(jnp.float32))
  y64, g64 = _float64("layer_norm", x, [np.asarray(p, np.float32) for p in params], w)
  y_tol, g_tols = _bounds("layer_norm", x, params, w, jnp.float16)
  _assert_within(y_p, y64, y_tol, "y")
  names = ("dx", "dscale", "dbias")[:len(g_p)]  # the gradients of the arguments given
  for name, gp, g, tol in zip(names, g_p, g64, g_tols, strict=True):
    _assert_within(gp, g, tol, name)


def test_bias_without_scale():
  x, _, bias, w = _inputs((5, 40), jnp.float32, seed=7)

  def run(impl):
    return jax.jit(lambda x, b: jax.vjp(
        lambda x, b: jn.layer_norm(x, None, b, implementation=impl), x, b)[1](w))(x, bias)

  _, (dx_tol, _, db_tol) = _bounds("layer_norm", x, (np.ones(40), bias), w, jnp.float32)
  for name, got, want, tol in zip(("dx", "dbias"), run("pallas"), run("xla"), (dx_tol, db_tol),
                                  strict=True):
    _assert_within(got, want, 2 * tol, name)


def test_backward_walking_several_row_chunks_per_program(monkeypatch):
  """Few backward programs: each loops over chunks, the last ones wholly past the last row."""
  monkeypatch.setattr(_triton, "_BWD_PROGRAMS", 1)
  blk = _triton.blocking(37, 384)
  assert blk["steps"] > 1 and 37 % (blk["chunk"] * blk["steps"]) != 0, blk
  x, scale, bias, w = _inputs((37, 384), jnp.float32, seed=1)
  params = _params("layer_norm", scale, bias, True, jnp.float32)
  _, g_p = _value_and_grads("layer_norm", jnp.asarray(x), params, w, "pallas")
  _, g64 = _float64("layer_norm", x, params, w)
  _, g_tols = _bounds("layer_norm", x, params, w, jnp.float32)
  names = ("dx", "dscale", "dbias")[:len(g_p)]  # the gradients of the arguments given
  for name, gp, g, tol in zip(names, g_p, g64, g_tols, strict=True):
    _assert_within(gp, g, tol, name)


def _primitives(f, *args):
  return str(jax.make_jaxpr(f)(*args))


def test_reverse_mode_runs_the_backward_kernel_and_none_stays_on_xla():
  x = jnp.ones((4, 48), jnp.float32)
  g = jnp.ones((48,), jnp.float32)

  def loss(impl):
    return jax.jit(jax.grad(lambda x, g: jnp.sum(jn.layer_norm(x, g, implementation=impl)
                                                 ** 2), (0, 1)))
  text = _primitives(loss("pallas"), x, g)
  assert "jaxnorm_layer_norm_fwd" in text and "jaxnorm_layer_norm_bwd" in text
  for impl in (None, "xla"):
    assert "pallas_call" not in _primitives(loss(impl), x, g)
  # None is the XLA path on the CPU, bit for bit.
  y = jax.jit(lambda x: jn.rms_norm(x, g))(x * 3)
  assert np.array_equal(np.asarray(y), np.asarray(jax.jit(
      lambda x: jn.rms_norm(x, g, implementation="xla"))(x * 3)))


def test_features_beyond_the_kernels_take_the_xla_path():
  x = jax.ShapeDtypeStruct((2, _pallas.MAX_FEATURES + 1), jnp.float32)
  assert "pallas_call" not in _primitives(
      lambda x: jn.layer_norm(x, implementation="pallas"), x)
  x = jax.ShapeDtypeStruct((2, _pallas.MAX_FEATURES), jnp.bfloat16)
  assert "jaxnorm_rms_norm_fwd" in _primitives(
      lambda x: jn.rms_norm(x, implementation="pallas"), x)


def test_forward_mode_and_hessian_work_under_pallas():
  """jax.jvp takes the tangent of the XLA path; jax.hessian differentiates the kernels' math."""
  x, scale, bias, _ = _inputs((3, 24), jnp.float32, seed=2)
  t = np.random.RandomState(3).randn(*x.shape).astype(np.float32)

  def f(impl):
    return lambda x: jn.layer_norm(x, scale, bias, implementation=impl)

  y_p, t_p = jax.jit(lambda x, t: jax.jvp(f("pallas"), (x,), (t,)))(x, t)
  y_x, t_x = jax.jvp(f("xla"), (x,), (t,))
  np.testing.assert_allclose(np.asarray(y_p), np.asarray(y_x), atol=1e-5)
  np.testing.assert_allclose(np.asarray(t_p), np.asarray(t_x), atol=1e-4 * np.abs(t_x).max())

  def scalar(v, s):
    return jnp.sum(jnp.sin(jn.rms_norm(v.reshape(2, 8), s, implementation="pallas")))

  v, s = x[:2, :8].reshape(-1), scale[:8]
  h_p = jax.jit(jax.hessian(scalar))(v, s)
  with jaxcompat.enable_x64(True):
    h64 = jax.hessian(lambda v, s: jnp.sum(jnp.sin(_ref(False, v.reshape(2, 8), s, None))))(
        jnp.asarray(v, F64), jnp.asarray(s, F64))
  np.testing.assert_allclose(np.asarray(h_p), np.asarray(h64), atol=1e-4 * np.abs(h64).max())


def test_vmap_and_the_flax_wrappers_pass_the_choice_through():
  from flax import nnx

  from jaxnorm import linen as jnn
  from jaxnorm import nnx as jnnx

  x, _, _, _ = _inputs((2, 3, 40), jnp.float32, seed=4)
  want = jax.jit(lambda x: jn.layer_norm(x, implementation="pallas"))(x)
  got = jax.jit(jax.vmap(lambda v: jn.layer_norm(v, implementation="pallas")))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  ln = jnn.LayerNorm(use_scale=False, use_bias=False, implementation="pallas")
  assert np.array_equal(np.asarray(jax.jit(lambda x: ln.apply({}, x))(x)), np.asarray(want))
  want = jax.jit(lambda x: jn.rms_norm(x, implementation="pallas"))(x)
  rms = jnnx.RMSNorm(40, use_scale=False, implementation="pallas", rngs=nnx.Rngs(0))
  assert np.array_equal(np.asarray(jax.jit(lambda x: rms(x))(x)), np.asarray(want))
  assert jnnx.LayerNorm(40, implementation="pallas", rngs=nnx.Rngs(0)).implementation == (
      "pallas") and jnn.RMSNorm(implementation="pallas").implementation == "pallas"


def test_pallas_outside_the_plain_case_is_a_clear_error_and_none_takes_xla():
  x = jnp.asarray(np.random.RandomState(5).randn(4, 6).astype(np.float32))
  mask = jnp.asarray(np.arange(24).reshape(4, 6) % 5 != 0)
  cases = {
      "a mask": {"mask": mask},
      "reduction_axes": {"reduction_axes": 0, "feature_axes": 0},
      "feature_axes": {"feature_axes": 0},
  }
  for fn in (jn.layer_norm, jn.rms_norm):
    for what, kw in cases.items():
      with pytest.raises(ValueError, match=f"implementation='pallas'.*{what}.*'xla'"):
        fn(x, implementation="pallas", **kw)
      np.testing.assert_array_equal(np.asarray(fn(x, implementation=None, **kw)),
                                    np.asarray(fn(x, implementation="xla", **kw)))
    with pytest.raises(ValueError, match="axis_name='i'"):
      jax.vmap(functools.partial(fn, axis_name="i", implementation="pallas"),
               axis_name="i")(x)
    jax.vmap(functools.partial(fn, axis_name="i"), axis_name="i")(x)  # None: XLA
  with jaxcompat.enable_x64(True):
    with pytest.raises(ValueError, match="dtype float64"):
      jn.layer_norm(jnp.ones((2, 4), F64), implementation="pallas")
    with pytest.raises(ValueError, match="scale of dtype float64"):
      jn.rms_norm(jnp.ones((2, 4), jnp.float32), jnp.ones((4,), F64),
                  implementation="pallas")


def test_kernels_lower_through_triton_for_cuda():
  """Without a GPU: the kernels pass the Pallas Triton lowering (compiling to PTX needs one)."""
  x = jax.ShapeDtypeStruct((37, 1000), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((1000,), jnp.bfloat16)

  def fwd_bwd(x, g):
    y, pullback = jax.vjp(lambda x, g: jn.layer_norm(x, g, g, implementation="pallas"), x, g)
    return y, pullback(y)

  text = jax.jit(fwd_bwd).trace(x, g).lower(lowering_platforms=("cuda",)).as_text()
  for name in ("jaxnorm_layer_norm_fwd", "jaxnorm_layer_norm_bwd"):
    assert name in text
  assert "tt.divisibility" in text  # the serialized Triton module


def test_no_private_jax_module_is_imported():
  """jaxnorm imports nothing from `jax._src`, whose names change without notice between JAX
  releases (the reverse-mode test of `normalize_rows` takes JAX's re-export of its tracer)."""
  root = pathlib.Path(jn.__file__).parent
  private = re.compile(r"^\s*(from|import)\s+jax\._src\b", re.MULTILINE)
  found = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.py"))
           if private.search(p.read_text())]
  assert not found, found
