"""The residual kernels: `add_rms_norm` and `add_layer_norm` with `implementation="pallas"`, run
on the CPU in Pallas interpret mode (the Triton kernels; the Mosaic ones called directly).

One forward kernel reads x and the residual and writes h and y, the backward kernel runs on h
and adds h's own cotangent. Checked: h bit for bit against the XLA path, y against float64 with
`refs.norm_bound`, the gradients of x, the residual, the scale and the bias against float64
autodiff of the composition with `refs.derivative_bounds` (plus the roundings of the result),
on ragged rows (37 rows, 100 features, padded to 128) and adversarial sums, in float32,
bfloat16 and bfloat16 with a float32 residual stream; then which kernels run, forward mode,
`jax.hessian`, `jax.vmap`, and the cases that keep today's path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from jaxnorm import _pallas
from jaxnorm._dtypes import residual_sum_dtype
from jaxnorm._pallas import _mosaic
from tests import refs

F64 = jnp.float64
NORMS = {"add_layer_norm": True, "add_rms_norm": False}  # name -> centred
DTYPES = {"float32": (jnp.float32, jnp.float32), "bfloat16": (jnp.bfloat16, jnp.bfloat16),
          "bfloat16+float32": (jnp.bfloat16, jnp.float32)}
SHAPE = (37, 100)


def _inputs(kind, dtypes, shape=SHAPE, seed=0):
  """`(x, residual)` in their dtypes: plain, or adversarial sums."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  r = rng.normal(size=shape).astype(np.float32)
  if kind == "outlier":  # a leading outlier in the sum
    x[:, 0] += 512.0
  elif kind == "offset":  # the stream carries a large offset, x the variation
    r = (1e3 + 0.25 * r).astype(np.float32)
  elif kind == "constant":  # constant rows of the sum (up to the rounding of x)
    r = (3.0 - x).astype(np.float32)
  return jnp.asarray(x, dtypes[0]), jnp.asarray(r, dtypes[1])


def _params(c, seed=1):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(1 + 0.25 * rng.normal(size=c), jnp.float32),
          jnp.asarray(rng.normal(size=c), jnp.float32))


def _call(name, x, r, scale, bias, **kw):
  if NORMS[name]:
    return jn.add_layer_norm(x, r, scale, bias, **kw)
  return jn.add_rms_norm(x, r, scale, bias=bias, **kw)


def _norm64(h, scale, bias, centered, eps=1e-6):
  mean = jnp.mean(h, -1, keepdims=True) if centered else 0.0
  y = (h - mean) / jnp.sqrt(jnp.mean((h - mean) ** 2, -1, keepdims=True) + eps) * scale
  return y if bias is None else y + bias


def _ref_y(h64, scale, bias, centered):
  return (refs.ref_layer_norm(h64, scale, bias) if centered
          else refs.ref_rms_norm(h64, scale) + (0.0 if bias is None else refs.f64(bias)))


@pytest.mark.parametrize("kind", ["plain", "outlier", "offset", "constant"])
@pytest.mark.parametrize("dtypes", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(NORMS))
def test_h_is_the_xla_paths_bit_for_bit_and_y_within_the_bound(name, dtypes, kind):
  x, r = _inputs(kind, DTYPES[dtypes])
  scale, bias = _params(x.shape[-1])
  b = bias if NORMS[name] else None
  y, h = jax.jit(functools.partial(_call, name, implementation="pallas"))(x, r, scale, b)
  y_x, h_x = jax.jit(functools.partial(_call, name, implementation="xla"))(x, r, scale, b)
  assert (y.dtype, h.dtype) == (y_x.dtype, h_x.dtype) == (x.dtype, residual_sum_dtype(
      x.dtype, r.dtype))
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_x, np.float32))
  h64 = refs.f64(np.asarray(h, np.float32))
  want = _ref_y(h64, scale, b, NORMS[name])
  bound = refs.norm_bound(h64, want, scale, centered=NORMS[name], out_dtype=x.dtype)
  refs.assert_within(np.asarray(y, np.float32), want, bound, "y vs float64")
  if h.dtype == jnp.float32:
    # A bfloat16 h: XLA's compiled path normalizes the sum before its rounding to bfloat16
    # (XLA's excess precision), the kernel the h it returns; each is within its own bound.
    refs.assert_within(np.asarray(y, np.float32), np.asarray(y_x, np.float32), 2 * bound,
                       "y vs xla")


@pytest.mark.parametrize("kind", ["plain", "outlier", "offset"])
@pytest.mark.parametrize("dtypes", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(NORMS))
def test_gradients_of_both_inputs_and_the_parameters_match_float64(name, dtypes, kind):
  x, r = _inputs(kind, DTYPES[dtypes], seed=3)
  scale, bias = _params(x.shape[-1])
  centered = NORMS[name]
  b = bias if centered else None
  rng = np.random.default_rng(4)
  # cotangents exact in y's and h's dtypes
  wy = jnp.asarray(rng.normal(size=x.shape), x.dtype).astype(jnp.float32)
  h_dtype = residual_sum_dtype(x.dtype, r.dtype)
  wh = jnp.asarray(rng.normal(size=x.shape), h_dtype).astype(jnp.float32)

  def loss(x, r, s, b):
    y, h = _call(name, x, r, s, b, implementation="pallas")
    return jnp.sum(wy * y.astype(jnp.float32)) + jnp.sum(wh * h.astype(jnp.float32))

  argnums = (0, 1, 2) + ((3,) if centered else ())
  got = jax.jit(jax.grad(loss, argnums))(x, r, scale, b)
  h = np.asarray(_call(name, x, r, scale, b, implementation="xla")[1], np.float32)
  h64 = refs.f64(h)  # the rounded sum: the derivative of the rounding is 1
  with jax.enable_x64(True):
    def loss64(h, s, b):
      return jnp.sum(jnp.asarray(wy, F64) * _norm64(h, s, b, centered)) + jnp.sum(
          jnp.asarray(wh, F64) * h)
    want = jax.grad(loss64, (0, 1) + ((2,) if centered else ()))(
        jnp.asarray(h64), jnp.asarray(scale, F64), None if b is None else jnp.asarray(b, F64))
    want = [np.asarray(w) for w in want]
  bx, bs, bb = refs.derivative_bounds(h64, -1, -1, scale, refs.f64(wy), 0.0 * h64,
                                      centered=centered)
  for g, dtype, what in ((got[0], x.dtype, "dx"), (got[1], r.dtype, "dresidual")):
    assert g.dtype == dtype, what
    # one float32 rounding of dh + the norm's, one rounding to the input's dtype
    bound = bx + (refs.U32 + refs.unit_roundoff(dtype)) * np.abs(want[0])
    refs.assert_within(np.asarray(g, np.float32), want[0], bound, what)
  refs.assert_within(got[2], want[1], bs, "dscale")
  if centered:
    refs.assert_within(got[3], want[2], bb, "dbias")


def _text(f, *args):
  return str(jax.make_jaxpr(f)(*args))


@pytest.mark.parametrize("name", sorted(NORMS))
def test_one_forward_kernel_and_one_backward_kernel_with_the_add(name):
  x, r = _inputs("plain", DTYPES["bfloat16+float32"], shape=(8, 48))
  scale, bias = _params(48)
  b = bias if NORMS[name] else None

  def loss(x, r, s):
    y, h = _call(name, x, r, s, b, implementation="pallas")
    return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h * h)

  # (every platform's branch is in the jaxpr: the kernels' names, not their count, tell)
  row = name.removeprefix("add_")
  fwd = _text(lambda x, r, s: _call(name, x, r, s, b, implementation="pallas"), x, r, scale)
  assert f"jaxnorm_{name}_fwd" in fwd and f"jaxnorm_{row}_fwd" not in fwd
  text = _text(jax.jit(jax.grad(loss, (0, 1, 2))), x, r, scale)
  assert f"jaxnorm_{name}_fwd" in text and f"jaxnorm_{name}_bwd" in text
  assert f"jaxnorm_{row}_fwd" not in text and f"jaxnorm_{row}_bwd" not in text


def test_a_wider_output_and_the_paths_outside_the_kernels():
  x, r = _inputs("offset", DTYPES["bfloat16"], shape=(6, 40))
  scale, bias = _params(40)
  # a wider output (flax's layers: float32 out of bfloat16 input): the residual kernel, the norm
  # of the bfloat16 sum in float32, rounded once to float32
  f = functools.partial(jn.add_layer_norm, dtype=jnp.float32)
  assert "jaxnorm_add_layer_norm_fwd" in _text(
      lambda x, r: f(x, r, scale, bias, implementation="pallas"), x, r)
  y, h = f(x, r, scale, bias, implementation="pallas")
  y_x, h_x = f(x, r, scale, bias, implementation="xla")
  assert (y.dtype, h.dtype) == (y_x.dtype, h_x.dtype) == (jnp.float32, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_x, np.float32))
  h64 = refs.f64(np.asarray(h, np.float32))
  want = _ref_y(h64, scale, bias, True)
  bound = refs.norm_bound(h64, want, scale)
  refs.assert_within(y, want, bound, "wider y")
  refs.assert_within(y, y_x, 2 * bound, "wider y vs xla")
  # None and "xla" stay on the XLA path, and so do rows longer than the kernels take
  for impl in (None, "xla"):
    g = functools.partial(jn.add_layer_norm, implementation=impl)
    assert "pallas_call" not in _text(g, x, r)
  long = jax.ShapeDtypeStruct((2, _pallas.MAX_FEATURES + 1), jnp.float32)
  assert "pallas_call" not in _text(
      lambda x, r: jn.add_rms_norm(x, r, implementation="pallas"), long, long)
  # outside the plain case "pallas" is the row kernels' error
  with pytest.raises(ValueError, match=r"implementation='pallas'.*mask"):
    jn.add_rms_norm(x, r, mask=jnp.ones((6, 40), bool), implementation="pallas")


@pytest.mark.parametrize("convention", ["llama", "gemma"])
def test_conventions_take_the_residual_kernel(convention):
  x, r = _inputs("offset", DTYPES["bfloat16+float32"], shape=(6, 40))
  scale, _ = _params(40)
  f = functools.partial(jn.add_rms_norm, convention=convention)
  assert "jaxnorm_add_rms_norm_fwd" in _text(
      lambda x, r: f(x, r, scale, implementation="pallas"), x, r)
  y, h = f(x, r, scale, implementation="pallas")
  y_x, h_x = f(x, r, scale, implementation="xla")
  assert y.dtype == y_x.dtype and h.dtype == h_x.dtype
  np.testing.assert_array_equal(h, h_x)
  h64 = refs.f64(h)
  g = 1 + refs.f64(scale) if convention == "gemma" else refs.f64(scale)
  want = refs.ref_rms_norm(h64) * g
  # llama rounds the normalized value to bfloat16 before the scale, then the product
  bound = refs.norm_bound(h64, want, g, centered=False, out_dtype=jnp.bfloat16)
  if convention == "llama":
    bound = 2 * bound
  refs.assert_within(np.asarray(y, np.float32), want, bound, convention)
  refs.assert_within(np.asarray(y, np.float32), np.asarray(y_x, np.float32), 2 * bound,
                     f"{convention} vs xla")


@pytest.mark.parametrize("name", sorted(NORMS))
def test_jvp_takes_the_xla_tangent_and_hessian_works(name):
  centered = NORMS[name]
  x, r = _inputs("offset", DTYPES["float32"], shape=(5, 24), seed=7)
  rng = np.random.default_rng(8)
  tx, tr = (jnp.asarray(rng.normal(size=x.shape), jnp.float32) for _ in range(2))
  scale, bias = _params(24)
  b = bias if centered else None
  f = lambda impl: lambda x, r: _call(name, x, r, scale, b, implementation=impl)
  (_, h), (ty, th) = jax.jit(lambda *a: jax.jvp(f("pallas"), a[:2], a[2:]))(x, r, tx, tr)
  (_, _), (ty_x, th_x) = jax.jvp(f("xla"), (x, r), (tx, tr))
  np.testing.assert_array_equal(th, th_x)
  np.testing.assert_array_equal(h, x + r)
  h64, t64 = refs.f64(h), refs.f64(th)
  with jax.enable_x64(True):
    want = np.asarray(jax.jvp(lambda h: _norm64(h, jnp.asarray(scale, F64), None if b is None
                                                else jnp.asarray(b, F64), centered),
                              (jnp.asarray(h64),), (jnp.asarray(t64),))[1])
  bound, _, _ = refs.derivative_bounds(h64, -1, -1, scale, t64, 0.0 * t64, centered=centered)
  refs.assert_within(ty, want, bound, "tangent")
  refs.assert_within(ty_x, want, bound, "xla tangent")

  def scalar(v, s):
    y, h = _call(name, v.reshape(2, 8), v.reshape(2, 8)[::-1], s, None, implementation="pallas")
    return jnp.sum(jnp.sin(y)) + jnp.sum(h * h)

  v, s = x[:2, :8].reshape(-1), scale[:8]
  hess = jax.jit(jax.hessian(scalar))(v, s)
  with jax.enable_x64(True):
    def scalar64(v, s):
      hh = v.reshape(2, 8) + v.reshape(2, 8)[::-1]
      return jnp.sum(jnp.sin(_norm64(hh, s, None, centered))) + jnp.sum(hh * hh)
    h64 = jax.hessian(scalar64)(jnp.asarray(v, F64), jnp.asarray(s, F64))
  np.testing.assert_allclose(np.asarray(hess), np.asarray(h64), atol=1e-4 * np.abs(h64).max())


@pytest.mark.parametrize("name", sorted(NORMS))
def test_vmap_equals_the_batched_call(name):
  x, r = _inputs("outlier", DTYPES["float32"], shape=(3, 5, 16), seed=11)
  scale, bias = _params(16)
  b = bias if NORMS[name] else None
  call = functools.partial(_call, name, scale=scale, bias=b, implementation="pallas")
  y, h = jax.vmap(call)(x, r)
  y0, h0 = call(x, r)
  np.testing.assert_array_equal(h, h0)
  h64 = refs.f64(h0)
  want = _ref_y(h64, scale, b, NORMS[name])
  bound = refs.norm_bound(h64, want, scale, centered=NORMS[name])
  refs.assert_within(y, want, bound, "vmap")
  refs.assert_within(y0, want, bound, "batched")


@pytest.mark.parametrize("dtypes", sorted(DTYPES))
@pytest.mark.parametrize("centered", [True, False])
def test_mosaic_residual_kernels_match_float64(dtypes, centered, monkeypatch):
  """The Mosaic residual forward and the backward with dh, in interpret mode, on ragged
  blocks (16 rows a block, 40 rows)."""
  monkeypatch.setattr(_mosaic, "_MAX_BLOCK_ROWS", 16)
  x, r = _inputs("offset", DTYPES[dtypes], shape=(40, 256), seed=13)
  scale, bias = _params(256)
  h_dtype = residual_sum_dtype(x.dtype, r.dtype)
  params = (scale, bias) if centered else (scale,)
  y, h, *stats = _mosaic.add_forward_call(x, r, params, eps=1e-6, centered=centered,
                                          has_scale=True, has_bias=centered, y_dtype=x.dtype,
                                          h_dtype=h_dtype, interpret=True)
  narrow, wide = _mosaic.add_dtypes(x.dtype, r.dtype)
  assert _mosaic.blocking(40, 256, narrow, None, wide)["fwd"] == 16
  h_x = jn.add_layer_norm(x, r)[1]
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_x, np.float32))
  h64 = refs.f64(np.asarray(h, np.float32))
  b = bias if centered else None
  want = _ref_y(h64, scale, b, centered)
  refs.assert_within(np.asarray(y, np.float32), want,
                     refs.norm_bound(h64, want, scale, centered=centered, out_dtype=x.dtype),
                     "mosaic y")
  rng = np.random.default_rng(14)
  wy = jnp.asarray(rng.normal(size=x.shape), x.dtype)
  wh = jnp.asarray(rng.normal(size=x.shape), h_dtype)
  (dx, dr), dscale, _ = _mosaic.backward_call(h, wy, stats, scale, has_bias=centered,
                                              bias_dtype=bias.dtype, centered=centered,
                                              interpret=True, dh2=wh,
                                              out_dtypes=(x.dtype, r.dtype))
  with jax.enable_x64(True):
    _, pull = jax.vjp(lambda h, s: _norm64(h, s, None, centered), jnp.asarray(h64),
                      jnp.asarray(scale, F64))
    dh64, ds64 = (np.asarray(a) for a in pull(jnp.asarray(np.asarray(wy, np.float32), F64)))
  dh64 = dh64 + refs.f64(np.asarray(wh, np.float32))
  bx, bs, _ = refs.derivative_bounds(h64, -1, -1, scale, refs.f64(np.asarray(wy, np.float32)),
                                     0.0 * h64, centered=centered)
  for g, what in ((dx, "mosaic dx"), (dr, "mosaic dresidual")):
    bound = bx + (refs.U32 + refs.unit_roundoff(g.dtype)) * np.abs(dh64)
    refs.assert_within(np.asarray(g, np.float32), dh64, bound, what)
  assert (dx.dtype, dr.dtype) == (x.dtype, r.dtype)
  refs.assert_within(dscale, ds64, bs, "mosaic dscale")


def test_mosaic_supports_the_residual_kernels_where_they_fit():
  assert _mosaic.supports(4096, jnp.bfloat16, wide=jnp.float32)
  assert not _mosaic.supports(4096, jnp.bfloat16, wide=jnp.float16)
  assert _mosaic.add_dtypes(jnp.float32, jnp.bfloat16) == (jnp.bfloat16, jnp.float32)
  # four row arrays take more VMEM than two: never more rows a block
  # a row too long for four blocks in VMEM: the XLA reference on TPU (`supports` False)
  assert not _mosaic.supports(16384, jnp.bfloat16, wide=jnp.float32)
  for f in (512, 4096):
    two = _mosaic.blocking(1 << 20, f, jnp.bfloat16)
    four = _mosaic.blocking(1 << 20, f, jnp.bfloat16, None, jnp.float32)
    assert four["fwd"] <= two["fwd"] and four["bwd"] <= two["bwd"]


def test_the_flax_layers_pass_the_choice_through():
  from flax import linen as nn

  from jaxnorm import linen as jnn
  x, r = _inputs("plain", DTYPES["bfloat16"], shape=(4, 32))
  layer = jnn.AddLayerNorm(implementation="pallas")
  v = layer.init(jax.random.key(0), x, r)
  assert "jaxnorm_add_layer_norm_fwd" in _text(lambda x, r: layer.apply(v, x, r), x, r)
  y, h = layer.apply(v, x, r)
  with jax.numpy_dtype_promotion("standard"):  # flax's unfused layer of the sum
    y_flax = nn.LayerNorm(epsilon=1e-6).apply(v, h)
  assert y.dtype == y_flax.dtype == jnp.float32 and h.dtype == jnp.bfloat16
  h64 = refs.f64(np.asarray(h, np.float32))
  want = refs.ref_layer_norm(h64)
  refs.assert_within(y, want, refs.norm_bound(h64, want), "layer")
