"""`rms_norm(convention=...)` against Hugging Face transformers' RMSNorm formulas, in torch.

The two forward functions below are HF's `LlamaRMSNorm.forward` and `GemmaRMSNorm.forward` as
transformers writes them (its `_norm` inlined). The claim under test: in bfloat16 and float16
at least 99.9% of outputs equal torch's bit for bit, and the rest are within one unit in the
last place (the float32 mean square may be summed in another order, which moves a value that
lies next to a rounding boundary across it).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
import jaxnorm.equinox as jne
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx
from tests import refs

torch = pytest.importorskip("torch")

EPS = 1e-6
LOW = [(jnp.bfloat16, "bfloat16"),
       pytest.param((jnp.float16, "float16"), marks=pytest.mark.skipif(
           not refs.float16_compiles(), reason="XLA:CPU compiles no float16 code without F16C"))]


def hf_llama(hidden_states, weight, eps):
  """transformers' LlamaRMSNorm.forward (also Mistral's, Qwen2's; T5's rounds alike)."""
  input_dtype = hidden_states.dtype
  hidden_states = hidden_states.to(torch.float32)
  variance = hidden_states.pow(2).mean(-1, keepdim=True)
  hidden_states = hidden_states * torch.rsqrt(variance + eps)
  return weight * hidden_states.to(input_dtype)


def hf_gemma(x, weight, eps):
  """transformers' GemmaRMSNorm.forward (weight stored as w - 1)."""
  output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
  output = output * (1.0 + weight.float())
  return output.type_as(x)


def _case(dtype, tname, rows=256, features=1024, seed=0):
  """Input and weight in `dtype` for jax and torch, the same bits."""
  r = np.random.RandomState(seed)
  x = (r.randn(rows, features) * 3.0).astype(np.float32)
  w = (r.randn(features) * 0.5 + 1.0).astype(np.float32)
  jx, jw = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  tdt = getattr(torch, tname)
  tx = torch.tensor(np.asarray(jx, np.float32)).to(tdt)
  tw = torch.tensor(np.asarray(jw, np.float32)).to(tdt)
  return jx, jw, tx, tw


def _ordered(a):
  """The bits of a 16-bit float as integers that count units in the last place."""
  bits = np.asarray(a).view(np.uint16).astype(np.int64)
  return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def _assert_hf_parity(ours, theirs, max_ulps=1):
  """≥ 99.9% of outputs bit for bit, every other one within `max_ulps` units in the last
  place."""
  assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
  ulps = np.abs(_ordered(ours) - _ordered(theirs))
  equal = float(np.mean(ulps == 0))
  assert equal >= 0.999, f"{equal:.5f} of outputs equal HF's bit for bit"
  assert ulps.max() <= max_ulps, f"an output is {ulps.max()} units in the last place from HF's"


def _torch_out(t, dtype):
  return np.asarray(jnp.asarray(t.float().numpy()).astype(dtype))


@pytest.mark.parametrize("dt", LOW)
def test_llama_convention_is_llama_rms_norm_bit_for_bit(dt):
  dtype, tname = dt
  jx, jw, tx, tw = _case(dtype, tname)
  ours = np.asarray(jn.rms_norm(jx, jw, epsilon=EPS, convention="llama"))
  theirs = _torch_out(hf_llama(tx, tw, EPS), dtype)
  # The normalized value, HF's `hidden_states.to(input_dtype)`, is within one unit in the last
  # place; a weight of magnitude up to 2 can make that one unit two of the product's.
  _assert_hf_parity(ours, theirs, max_ulps=int(np.ceil(np.abs(np.asarray(jw, np.float32)).max())))
  ones = torch.ones_like(tw)
  _assert_hf_parity(np.asarray(jn.rms_norm(jx, None, epsilon=EPS, convention="llama")),
                    _torch_out(hf_llama(tx, ones, EPS), dtype))


@pytest.mark.parametrize("dt", LOW)
def test_gemma_convention_is_gemma_rms_norm_bit_for_bit(dt):
  dtype, tname = dt
  jx, jw, tx, tw = _case(dtype, tname)
  jw, tw = jw - 1, tw - 1  # Gemma stores w - 1
  ours = np.asarray(jn.rms_norm(jx, jw, epsilon=EPS, convention="gemma"))
  _assert_hf_parity(ours, _torch_out(hf_gemma(tx, tw, EPS), dtype))
  # "gemma" is zero_centered_scale=True, the same program.
  same = jn.rms_norm(jx, jw, epsilon=EPS, zero_centered_scale=True)
  np.testing.assert_array_equal(ours.view(np.uint16), np.asarray(same).view(np.uint16))


def test_llama_output_dtype_is_torch_s_promotion():
  """A float32 weight on bfloat16 input gives float32, as `weight * hidden` does in torch."""
  jx, jw, tx, tw = _case(jnp.bfloat16, "bfloat16", rows=8, features=64)
  jw32 = jnp.asarray(np.asarray(jw, np.float32))
  ours = jn.rms_norm(jx, jw32, epsilon=EPS, convention="llama")
  theirs = hf_llama(tx, tw.float(), EPS)
  assert ours.dtype == jnp.float32 and theirs.dtype == torch.float32
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
  assert jn.rms_norm(jx, None, epsilon=EPS, convention="llama").dtype == jnp.bfloat16


def test_llama_convention_runs_the_scale_along_feature_axes():
  """A scale along axis 0 multiplies along axis 0 (reduction over axis 1)."""
  jx, _, _, _ = _case(jnp.bfloat16, "bfloat16", rows=16, features=64)
  w = jnp.asarray(np.linspace(0.5, 2.0, 16), jnp.bfloat16)
  ours = jn.rms_norm(jx, w, epsilon=EPS, reduction_axes=1, feature_axes=0, convention="llama")
  plain = jn.rms_norm(jx, None, epsilon=EPS, reduction_axes=1, feature_axes=0)
  np.testing.assert_array_equal(np.asarray(ours).view(np.uint16),
                                np.asarray(w[:, None] * plain).view(np.uint16))


# --- derivatives: straight through the roundings, as autodiff of HF's formula in JAX ---------

def jnp_llama(x, w, eps):
  h = x.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + eps)
  return w * h.astype(x.dtype)


def jnp_gemma(x, w, eps):
  h = x.astype(jnp.float32)
  out = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + eps)
  return (out * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


@pytest.mark.parametrize("convention", ["llama", "gemma"])
def test_gradients_match_autodiff_of_hf_formula(convention):
  dtype = jnp.bfloat16
  jx, jw, _, _ = _case(dtype, "bfloat16", rows=32, features=256)
  if convention == "gemma":
    jw = jw - 1
  cot = jnp.asarray(np.random.RandomState(2).randn(32, 256), dtype)
  ref = jnp_llama if convention == "llama" else jnp_gemma

  def loss(f):
    return lambda x, w: jnp.vdot(f(x, w).astype(jnp.float32), cot.astype(jnp.float32))

  ours = jax.grad(loss(lambda x, w: jn.rms_norm(x, w, epsilon=EPS, convention=convention)),
                  (0, 1))(jx, jw)
  theirs = jax.grad(loss(lambda x, w: ref(x, w, EPS)), (0, 1))(jx, jw)
  ub = refs.unit_roundoff(dtype)
  # Both differentiate the float32 normalization with the same bfloat16 cotangent h = γ g
  # (llama: rounded to bfloat16 before it, in both), each within `derivative_bounds` of the
  # exact derivative, then round once to bfloat16.
  f64 = refs.f64
  if convention == "llama":
    h, scale = f64((jw * cot).astype(dtype)), None
  else:
    h, scale = f64(cot), 1.0 + f64(jw)
  bx, bs, _ = refs.derivative_bounds(f64(jx), -1, -1, scale, h, np.zeros(h.shape), EPS,
                                     centered=False)
  (dx, dw), (rx, rw) = (tuple(f64(a) for a in ours), tuple(f64(a) for a in theirs))
  refs.assert_within(dx, rx, 2 * bx + ub * (np.abs(dx) + np.abs(rx)), "d/dx")
  if convention == "llama":  # both sum g · round(x r) over the rows, in bfloat16
    y = f64(jn.rms_norm(jx, None, epsilon=EPS))
    terms = np.abs(f64(cot) * y)
    bound = 2 * (refs.sum_factor(32, dtype) + ub) * terms.sum(0) + ub * (np.abs(dw) + np.abs(rw))
  else:
    bound = 2 * bs + ub * (np.abs(dw) + np.abs(rw))
  refs.assert_within(dw, rw, bound, "d/dw")


# --- arguments and layers ---------------------------------------------------------------------

@pytest.mark.parametrize("convention", ["llama", "gemma"])
def test_layers_take_the_convention(convention):
  """linen, nnx and equinox RMSNorm with bfloat16 parameters give `rms_norm`'s bits."""
  jx, jw, _, _ = _case(jnp.bfloat16, "bfloat16", rows=4, features=32)
  want = np.asarray(jn.rms_norm(jx, jw, epsilon=EPS, convention=convention)).view(np.uint16)
  lin = jnn.RMSNorm(epsilon=EPS, param_dtype=jnp.bfloat16, convention=convention)
  got = lin.apply({"params": {"scale": jw}}, jx)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want)
  layer = jnnx.RMSNorm(32, epsilon=EPS, param_dtype=jnp.bfloat16, convention=convention,
                       rngs=nnx.Rngs(0))
  layer.scale[...] = jw
  np.testing.assert_array_equal(np.asarray(layer(jx)).view(np.uint16), want)
  eq = eqx.tree_at(lambda m: m.weight, jne.RMSNorm(32, eps=EPS, use_bias=False), jw)
  got = jax.vmap(lambda r: eq(r, convention=convention))(jx)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want)


def test_gemma_layers_start_at_the_identity():
  """`convention="gemma"` stores γ - 1, so the flax layers' default scale starts at zeros, as
  with `zero_centered_scale=True`; "llama" keeps ones. (equinox's takes the convention in
  the call, its fields staying equinox's.)"""
  x = jnp.ones((1, 8))
  for convention, start in (("gemma", 0.0), ("llama", 1.0)):
    params = jnn.RMSNorm(convention=convention).init(jax.random.key(0), x)
    np.testing.assert_array_equal(params["params"]["scale"], np.full(8, start))
    layer = jnnx.RMSNorm(8, convention=convention, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer.scale[...], np.full(8, start))
  with pytest.raises(ValueError, match=r"convention='t5' is not one of None"):
    jne.RMSNorm(8)(jnp.ones(8), convention="t5")
