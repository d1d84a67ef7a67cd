"""The fused residual add: `add_rms_norm` and `add_layer_norm` against float64 references (with
`refs` bounds), the unfused composition `h = x + residual; (norm(h), h)` bit for bit on CPU,
its derivative with cotangents on both outputs, the dtype rule, and every transform."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from jaxnorm import _platform, _stats
from tests import refs

F64 = jnp.float64
NORMS = {"add_layer_norm": (jn.add_layer_norm, jn.layer_norm, True),
         "add_rms_norm": (jn.add_rms_norm, jn.rms_norm, False)}


def _grid(rng, shape, scale):
  """Values on a grid of 2**-8 (|v| <= scale), so that x + residual is exact in float32."""
  return (np.round(rng.normal(size=shape) * scale * 256) / 256).astype(np.float32)


def _inputs(kind, shape=(6, 32), seed=0):
  """`(x, residual)` in float32, their sum exact: plain, or adversarial."""
  rng = np.random.default_rng(seed)
  x, r = _grid(rng, shape, 1.0), _grid(rng, shape, 1.0)
  if kind == "outlier":  # a leading outlier in the sum
    x[:, 0] += 512.0
  elif kind == "offset":  # the stream carries a large offset, x the variation
    r = np.full(shape, 1e4, np.float32) + _grid(rng, shape, 0.25)
  elif kind == "constant":  # constant rows of the sum
    r = (3.0 - x).astype(np.float32)
  elif kind == "cancel":  # x = -residual: the sum is 0
    r = -x
  assert np.array_equal(refs.f64(x) + refs.f64(r), refs.f64(x + r))
  return x, r


def _params(c, seed=1):
  rng = np.random.default_rng(seed)
  return (1 + 0.25 * rng.normal(size=c)).astype(np.float32), rng.normal(size=c).astype(np.float32)


def _call(name, x, r, scale, bias, **kw):
  fused, _, centered = NORMS[name]
  return fused(x, r, scale, bias, **kw) if centered else fused(x, r, scale, bias=bias, **kw)


@pytest.mark.parametrize("kind", ["plain", "outlier", "offset", "constant", "cancel"])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_matches_the_float64_reference_within_the_bound(name, kind):
  x, r = _inputs(kind)
  scale, bias = _params(x.shape[-1])
  y, h = _call(name, x, r, scale, bias if name == "add_layer_norm" else None)
  np.testing.assert_array_equal(h, x + r)
  h64 = refs.f64(x) + refs.f64(r)
  if name == "add_layer_norm":
    want = refs.ref_layer_norm(h64, scale, bias)
    bound = refs.norm_bound(h64, want, scale)
  else:
    want = refs.ref_rms_norm(h64, scale)
    bound = refs.norm_bound(h64, want, scale, centered=False)
  refs.assert_within(y, want, bound, f"{name} {kind}")
  assert np.all(np.isfinite(np.asarray(y)))


def _dtypes():
  out = [jnp.float32, jnp.bfloat16]
  return out + ([jnp.float16] if refs.float16_compiles() else [])


RMS_OPTIONS = [{}, {"zero_centered_scale": True}, {"convention": "llama"},
               {"convention": "gemma"}, {"mask": np.arange(32) % 3 != 0}]
LN_OPTIONS = [{}, {"zero_centered_scale": True}, {"mask": np.arange(32) % 3 != 0},
              {"reduction_axes": (0, 1), "feature_axes": 1}]


def _options():
  return ([("add_rms_norm", o) for o in RMS_OPTIONS]
          + [("add_layer_norm", o) for o in LN_OPTIONS])


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("name,options", _options())
@pytest.mark.parametrize("jit", [False, True])
def test_same_dtypes_equal_the_unfused_composition_bit_for_bit(name, options, dtype, jit):
  x, r = (jnp.asarray(a, dtype) for a in _inputs("offset" if dtype == jnp.float32 else "plain"))
  scale, bias = (jnp.asarray(p) for p in _params(x.shape[-1]))
  fused, norm, centered = NORMS[name]
  b = bias if centered else None
  if options.get("convention") == "llama":
    b = None

  def unfused(x, r, scale, b):
    h = x + r
    return norm(h, scale, b, **options), h

  def run(x, r, scale, b):
    return fused(x, r, scale, b, **options) if centered else fused(x, r, scale, bias=b,
                                                                     **options)
  go = (lambda f: jax.jit(f)) if jit else (lambda f: f)
  y, h = go(run)(x, r, scale, b)
  y0, h0 = go(unfused)(x, r, scale, b)
  assert h.dtype == dtype and y.dtype == y0.dtype
  np.testing.assert_array_equal(h, h0)
  np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_a_float32_residual_stream_stays_float32(name, x_dtype):
  if x_dtype == jnp.float16 and not refs.float16_compiles():
    pytest.skip("XLA:CPU cannot run float16 here")
  x, r = _inputs("offset", seed=3)
  xn = jnp.asarray(x, x_dtype)
  scale, bias = (jnp.asarray(p) for p in _params(x.shape[-1]))
  b = bias if name == "add_layer_norm" else None
  y, h = _call(name, xn, r, scale, b)
  assert h.dtype == jnp.float32 and y.dtype == x_dtype
  # The sum in float32, of the narrow x as it is; y the float32 norm of it, rounded once.
  want_h = xn.astype(jnp.float32) + r
  np.testing.assert_array_equal(h, want_h)
  norm = NORMS[name][1]
  np.testing.assert_array_equal(y, norm(want_h, scale, b).astype(x_dtype))


def test_a_wider_residual_under_llama_rounds_the_normalized_value_to_x_dtype():
  x, r = _inputs("plain", seed=4)
  xb = jnp.asarray(x, jnp.bfloat16)
  scale = jnp.asarray(_params(x.shape[-1])[0], jnp.bfloat16)
  y, h = jn.add_rms_norm(xb, r, scale, convention="llama")
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  want = scale * jn.rms_norm(h).astype(jnp.bfloat16)  # HF: weight * hidden.to(input_dtype)
  np.testing.assert_array_equal(y, want)


# --- the derivative: cotangents on both outputs ----------------------------------------------

def _ref_norm64(h, scale, bias, centered, eps=1e-6):
  mean = jnp.mean(h, -1, keepdims=True) if centered else 0.0
  var = jnp.mean((h - mean) ** 2, -1, keepdims=True)
  y = (h - mean) / jnp.sqrt(var + eps) * scale
  return y if bias is None else y + bias


def _loss(fn, wy, wh):
  """A loss with a cotangent on each output: wy + y/2 on y and wh on h."""
  def loss(x, r, scale, bias):
    y, h = fn(x, r, scale, bias)
    return jnp.sum(wy * y + 0.25 * y * y) + jnp.sum(wh * h)
  return loss


# The one-read moments of GPUs and TPUs (shift sampled from x and the residual), run here.
ONE_READ = {"cpu": None, "gpu": _platform.GPU,
            "tpu": _platform.TPU._replace(row_moments_from=0, sample_apart_from=0)}


@pytest.mark.parametrize("policy", sorted(ONE_READ))
@pytest.mark.parametrize("kind", ["plain", "outlier", "offset", "cancel"])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_grad_matches_float64_autodiff_of_the_composition(name, kind, policy):
  if policy != "cpu" and name == "add_rms_norm":
    pytest.skip("RMS normalization has no shift")
  forced = (_platform.forced(ONE_READ[policy]) if ONE_READ[policy] is not None
            else contextlib.nullcontext())
  with forced:
    _check_grad(name, kind)


def test_the_shift_sampled_from_the_parts_is_the_sums():
  # The offset in one part: a shift from either part alone would lose the variance's digits.
  r, x = _inputs("offset", seed=14)
  xb = jnp.asarray(x, jnp.bfloat16)
  for parts in ((x, r), (r, x), (xb, r), (xb, jnp.asarray(r, jnp.bfloat16))):
    h = _stats.residual_sum(*parts)
    for apart in (False, True):
      got = _stats.shifted_moments(h, (1,), jnp.float32, sample_apart=apart, parts=parts)
      want = _stats.shifted_moments(h, (1,), jnp.float32, sample_apart=apart)
      for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["plain", "outlier", "offset", "cancel"])
@pytest.mark.parametrize("rows_forward", [False, True])
def test_a_tpus_forward_pass_takes_the_one_read_moments(rows_forward, kind):
  """`Policy.residual_rows_forward`: the forward pass of `add_layer_norm` alone takes the
  one-read moments (a TPU's) or the two-pass ones, within the bound of either."""
  x, r = _inputs(kind, seed=15)
  scale, bias = _params(x.shape[-1])
  policy = ONE_READ["tpu"]._replace(residual_rows_forward=rows_forward)
  with _platform.forced(policy):
    f = jax.jit(lambda x, r: jn.add_layer_norm(x, r, scale, bias))
    text = f.lower(x, r).as_text(debug_info=True)
    y, h = f(x, r)
  assert ("shifted_moments" in text) == rows_forward
  h64 = refs.f64(h)
  _, mean, var = refs.ref_moments(h64, -1)
  merr, verr = (refs.shifted_errors(h64, (1,)) if rows_forward else
                (refs.mean_error(h64, -1), refs.var_error(h64, -1)))
  want = refs.ref_layer_norm(h64, scale, bias)
  bound = refs.output_error(h64, mean, var, merr, verr, scale, want, -1, -1, 1e-6)
  refs.assert_within(y, want, bound, f"rows_forward={rows_forward}")


def _check_grad(name, kind):
  x, r = _inputs(kind, seed=5)
  c = x.shape[-1]
  scale, bias = _params(c)
  rng = np.random.default_rng(6)
  wy, wh = rng.normal(size=x.shape).astype(np.float32), rng.normal(size=x.shape).astype(
      np.float32)
  centered = NORMS[name][2]
  b = bias if centered else None
  argnums = (0, 1, 2) + ((3,) if centered else ())
  fused = lambda x, r, s, b: _call(name, x, r, s, b)
  got = jax.jit(jax.grad(_loss(fused, wy, wh), argnums))(x, r, scale, b)
  with jax.enable_x64(True):
    ref = lambda x, r, s, b: (_ref_norm64(x + r, s, b, centered), x + r)
    want = jax.grad(_loss(ref, jnp.asarray(wy, F64), jnp.asarray(wh, F64)), argnums)(
        *(None if a is None else jnp.asarray(a, F64) for a in (x, r, scale, b)))
    want = [np.asarray(g) for g in want]
    y64 = np.asarray(_ref_norm64(jnp.asarray(x + r, F64), jnp.asarray(scale, F64),
                                 None if b is None else jnp.asarray(b, F64), centered))
  h64 = refs.f64(x) + refs.f64(r)
  y = refs.ref_layer_norm(h64, scale, b) if centered else refs.ref_rms_norm(h64, scale)
  np.testing.assert_allclose(y, y64, rtol=1e-12, atol=1e-12)
  dy = refs.norm_bound(h64, y, scale, centered=centered)
  cot = refs.f64(wy) + 0.5 * y
  bx, bs, bb = refs.derivative_bounds(h64, -1, -1, scale, cot,
                                      0.5 * dy + 2 * refs.U32 * np.abs(cot), centered=centered)
  # dx = dr = wh + the norm's input cotangent: one more rounding of the sum.
  bx_sum = bx + refs.U32 * (np.abs(want[0]))
  refs.assert_within(got[0], want[0], bx_sum, "dx")
  refs.assert_within(got[1], want[1], bx_sum, "dresidual")
  refs.assert_within(got[2], want[2], bs, "dscale")
  if centered:
    refs.assert_within(got[3], want[3], bb, "dbias")


@pytest.mark.parametrize("name", sorted(NORMS))
def test_jvp_matches_float64_autodiff_of_the_composition(name):
  x, r = _inputs("offset", seed=7)
  rng = np.random.default_rng(8)
  tx, tr = (rng.normal(size=x.shape).astype(np.float32) for _ in range(2))
  scale, bias = _params(x.shape[-1])
  centered = NORMS[name][2]
  b = bias if centered else None
  (y, h), (ty, th) = jax.jvp(lambda x, r: _call(name, x, r, scale, b), (x, r), (tx, tr))
  np.testing.assert_array_equal(h, x + r)
  np.testing.assert_array_equal(y, _call(name, x, r, scale, b)[0])
  with jax.enable_x64(True):
    f = lambda x, r: _ref_norm64(x + r, jnp.asarray(scale, F64),
                                 None if b is None else jnp.asarray(b, F64), centered)
    _, want = jax.jvp(f, (jnp.asarray(x, F64), jnp.asarray(r, F64)),
                      (jnp.asarray(tx, F64), jnp.asarray(tr, F64)))
    want = np.asarray(want)
  np.testing.assert_array_equal(th, tx + tr)
  h64 = refs.f64(x) + refs.f64(r)
  t64 = refs.f64(tx) + refs.f64(tr)  # the tangent of h, rounded once in float32
  bound, _, _ = refs.derivative_bounds(h64, -1, -1, scale, t64, refs.U32 * np.abs(t64),
                                       centered=centered)
  refs.assert_within(ty, want, bound, "tangent")


@pytest.mark.parametrize("name", sorted(NORMS))
def test_mixed_dtype_gradients_are_the_compositions(name):
  x, r = _inputs("plain", seed=9)
  xb = jnp.asarray(x, jnp.bfloat16)
  scale, bias = (jnp.asarray(p) for p in _params(x.shape[-1]))
  _, norm, centered = NORMS[name]
  b = bias if centered else None
  wy, wh = jnp.asarray(_grid(np.random.default_rng(10), x.shape, 1.0)), jnp.ones(x.shape)

  def unfused(x, r, scale, b):
    h = x.astype(jnp.float32) + r
    return norm(h, scale, b).astype(x.dtype), h

  def loss(fn):
    return lambda *a: (jnp.sum(wy * fn(*a)[0].astype(jnp.float32)) + jnp.sum(wh * fn(*a)[1]))
  argnums = (0, 1, 2)
  got = jax.jit(jax.grad(loss(lambda x, r, s, b: _call(name, x, r, s, b)), argnums))(
      xb, r, scale, b)
  want = jax.jit(jax.grad(loss(unfused), argnums))(xb, r, scale, b)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g, w)


# --- transforms --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(NORMS))
def test_vmap_equals_the_batched_call(name):
  x, r = _inputs("offset", shape=(3, 4, 16), seed=11)
  scale, bias = _params(16)
  b = bias if NORMS[name][2] else None
  call = functools.partial(_call, name, scale=scale, bias=b)
  y, h = jax.vmap(lambda x, r: call(x, r))(x, r)
  y0, h0 = call(x, r)
  np.testing.assert_array_equal(h, h0)
  h64 = refs.f64(h0)
  want = refs.ref_layer_norm(h64, scale, b) if b is not None else refs.ref_rms_norm(h64, scale)
  bound = refs.norm_bound(h64, want, scale, centered=b is not None)
  refs.assert_within(y, want, bound, "vmap")
  refs.assert_within(y0, want, bound, "batched")


@pytest.mark.parametrize("name", sorted(NORMS))
def test_the_pallas_kernels_normalize_the_sum(name):
  x, r = _inputs("offset", seed=12)
  scale, bias = _params(x.shape[-1])
  b = bias if NORMS[name][2] else None
  y, h = _call(name, x, r, scale, b, implementation="pallas")
  np.testing.assert_array_equal(h, x + r)
  h64 = refs.f64(h)
  want = refs.ref_layer_norm(h64, scale, b) if b is not None else refs.ref_rms_norm(h64, scale)
  refs.assert_within(y, want, refs.norm_bound(h64, want, scale, centered=b is not None),
                     "pallas")


def test_the_residual_keyword_order_is_the_issues():
  x, r = _inputs("plain")
  scale, bias = _params(x.shape[-1])
  y1, _ = jn.add_layer_norm(x, r, scale, bias, epsilon=1e-6)
  y2, _ = jn.add_layer_norm(x, residual=r, scale=scale, bias=bias)
  np.testing.assert_array_equal(y1, y2)
  with pytest.raises(TypeError):
    jn.add_rms_norm(x, r, scale, bias)  # type: ignore[misc]  # bias is keyword-only


# --- the layers: the unfused layers of the sum, bit for bit ----------------------------------

LAYER_DTYPES = [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")]


def _pair(dtypes, shape=(3, 5, 16)):
  x, r = _inputs("offset", shape=shape, seed=13)
  return jnp.asarray(x, dtypes[0]), jnp.asarray(r, dtypes[1])


FLAX_OPTIONS = [{}, {"dtype": jnp.bfloat16}, {"param_dtype": jnp.bfloat16},
                {"zero_centered_scale": True}]


@pytest.mark.parametrize("options", FLAX_OPTIONS)
@pytest.mark.parametrize("dtypes", LAYER_DTYPES)
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_linen_layers_equal_the_unfused_layer_of_the_sum(kind, dtypes, options):
  from jaxnorm import linen as jnn
  x, r = _pair(dtypes)
  fused, plain = getattr(jnn, "Add" + kind)(**options), getattr(jnn, kind)(**options)
  h0 = x.astype(jnp.float32) + r.astype(jnp.float32) if x.dtype != r.dtype else x + r
  variables = fused.init(jax.random.key(0), x, r)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, plain.init(jax.random.key(0), h0))
  variables = jax.tree.map(lambda p: p + 0.25, variables)  # away from the identity

  def both(x, r, variables):
    y, h = fused.apply(variables, x, r)
    return y, h, plain.apply(variables, x + r if x.dtype == r.dtype else h0)
  y, h, y0 = both(x, r, variables)
  np.testing.assert_array_equal(h, h0)
  assert y.dtype == y0.dtype
  np.testing.assert_array_equal(y, y0)
  loss = lambda f: lambda x, r, v: sum(jnp.sum(a.astype(jnp.float32)) for a in f(x, r, v))
  got = jax.grad(loss(lambda x, r, v: fused.apply(v, x, r)), (0, 1, 2))(x, r, variables)
  def unfused(x, r, v):
    h = (x.astype(r.dtype) if x.dtype != r.dtype else x) + r
    return plain.apply(v, h), h
  want = jax.grad(loss(unfused), (0, 1, 2))(x, r, variables)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("options", FLAX_OPTIONS)
@pytest.mark.parametrize("dtypes", LAYER_DTYPES)
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_nnx_layers_equal_the_unfused_layer_of_the_sum(kind, dtypes, options):
  from flax import nnx

  from jaxnorm import nnx as jnnx
  x, r = _pair(dtypes)
  fused = getattr(jnnx, "Add" + kind)(16, rngs=nnx.Rngs(0), **options)
  plain = getattr(jnnx, kind)(16, rngs=nnx.Rngs(0), **options)
  fused.scale[...] = plain.scale[...] = (1 + jnp.linspace(-0.5, 0.5, 16)).astype(
      plain.scale[...].dtype)
  y, h = fused(x, r)
  h0 = x.astype(r.dtype) + r if x.dtype != r.dtype else x + r
  np.testing.assert_array_equal(h, h0)
  y0 = plain(h0)
  assert y.dtype == y0.dtype
  np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("dtypes", LAYER_DTYPES)
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_equinox_layers_equal_the_unfused_layer_of_the_sum(kind, dtypes):
  import jaxnorm.equinox as jne
  x, r = _pair(dtypes, shape=(6, 16))
  fused, plain = getattr(jne, "Add" + kind)(16), getattr(jne, kind)(16)
  y, h = jax.vmap(fused)(x, r)
  h0 = x.astype(r.dtype) + r if x.dtype != r.dtype else x + r
  np.testing.assert_array_equal(h, h0)
  assert y.dtype == x.dtype
  np.testing.assert_array_equal(y, jax.vmap(plain)(h0).astype(x.dtype))
  (y, h), state = jax.vmap(fused, in_axes=(0, 0, None), out_axes=((0, 0), None))(x, r, None)
  assert state is None and y.shape == x.shape


@pytest.mark.parametrize("name", sorted(NORMS))
def test_features_split_across_devices_with_axis_name(name):
  """Tensor parallelism: the feature axis split over 8 devices (`shard_map`), the statistics
  reduced across them by `axis_name`; the sum and output are the unsplit call's, within the
  bound, and so are the gradients."""
  from jax.sharding import PartitionSpec as P
  x, r = _inputs("offset", shape=(4, 64), seed=16)
  scale, bias = _params(64)
  b = bias if NORMS[name][2] else None
  mesh = jax.make_mesh((8,), ("d",))
  spec = P(None, "d")
  split = jax.jit(jax.shard_map(
      lambda x, r, s, *b: _call(name, x, r, s, b[0] if b else None, axis_name="d"), mesh=mesh,
      in_specs=(spec, spec, P("d")) + ((P("d"),) if b is not None else ()),
      out_specs=(spec, spec)))
  from jax.sharding import NamedSharding
  args = tuple(jax.device_put(a, NamedSharding(mesh, spec if a.ndim == 2 else P("d")))
               for a in (x, r, scale) + ((b,) if b is not None else ()))
  y, h = split(*args)
  np.testing.assert_array_equal(h, x + r)
  h64 = refs.f64(h)
  want = refs.ref_layer_norm(h64, scale, b) if b is not None else refs.ref_rms_norm(h64, scale)
  refs.assert_within(y, want, refs.norm_bound(h64, want, scale, centered=b is not None),
                     "split")
  loss = lambda f: lambda *a: sum(jnp.sum(o * o) for o in f(*a))
  with jax.set_mesh(mesh):
    got = jax.jit(jax.grad(loss(split), (0, 1)))(*args)
  want_g = jax.grad(loss(lambda x, r, s, *b: _call(name, x, r, s, b[0] if b else None)),
                    (0, 1))(x, r, scale, *(() if b is None else (b,)))
  # Both within the derivative's bound of the exact one (cotangent 2y of y, plus 2h on h).
  nb = refs.norm_bound(h64, want, scale, centered=b is not None)
  bx, _, _ = refs.derivative_bounds(h64, -1, -1, scale, 2 * want,
                                    2 * nb + 2 * refs.U32 * np.abs(2 * want),
                                    centered=b is not None)
  for g, w in zip(got, want_g, strict=True):
    refs.assert_within(g, w, 2 * (bx + refs.U32 * np.abs(refs.f64(w))), "gradient")


@pytest.mark.parametrize("name", sorted(NORMS))
def test_a_wider_dtype_normalizes_the_sum_with_one_rounding(name):
  x, r = (jnp.asarray(a, jnp.bfloat16) for a in _inputs("plain", seed=17))
  scale, bias = (jnp.asarray(p) for p in _params(x.shape[-1]))
  b = bias if NORMS[name][2] else None
  y, h = _call(name, x, r, scale, b, dtype=jnp.float32)
  assert (y.dtype, h.dtype) == (jnp.float32, jnp.bfloat16)
  np.testing.assert_array_equal(y, NORMS[name][1](h.astype(jnp.float32), scale, b))
  y16, _ = _call(name, x, r, scale, b, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(y16, _call(name, x, r, scale, b)[0])
