"""`jaxnorm.linen.fold_norms_into_dense` on a small pre-LN transformer written with flax.linen:
every norm's scale and offset go into the Dense layers that read it (q, k and v; the MLP's
first layer; the logits layer), and the logits stay the same."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxnorm import linen as jnn
from tests import jaxcompat
from tests.flax_cases import standard_promotion
from tests.refs import U32, assert_within, f64, staged_error
from tests.test_fold_norm_nnx import STAGES

U64 = 2.0 ** -53


class _Block(nn.Module):
  heads: int = 2

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_attn")(x)
    q, k, v = (nn.Dense(x.shape[-1], name=n)(h) for n in ("q", "k", "v"))
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)
    w = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(x.shape[-1] // self.heads)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(w, axis=-1), split(v))
    x = x + nn.Dense(x.shape[-1], name="out")(a.reshape(x.shape))
    h = jnn.RMSNorm(zero_centered_scale=True, name="rms_mlp")(x)
    return x + nn.Dense(x.shape[-1], name="down")(nn.gelu(nn.Dense(16, name="up")(h)))


class _Transformer(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8, name="embed")(tokens)
    for i in range(2):
      x = _Block(name=f"block{i}")(x)
    return nn.Dense(11, name="logits")(jnn.LayerNorm(name="ln_final")(x))


def _random(model, x, seed=0):
  """The model's variables with every leaf random (a norm's scale around 1, its offset around
  0), so that nothing folds trivially."""
  with standard_promotion():
    variables = model.init(jax.random.key(0), x)
  rs = np.random.RandomState(seed)

  def fill(path, a):
    name = jax.tree_util.keystr(path)
    base = 1.0 if "scale" in name and "rms_mlp" not in name else 0.0
    return jnp.asarray(base + 0.5 * rs.randn(*a.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, jax.tree.map(np.asarray, variables))


def test_pre_ln_transformer_folds_every_norm_and_keeps_its_logits():
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 11, (2, 5)))
  model = _Transformer()
  variables = _random(model, tokens)
  with standard_promotion():
    folding = jnn.fold_norms_into_dense(model, variables, tokens)
  assert folding.unfolded == {}
  expected = {}
  for b in ("block0", "block1"):
    expected.update({f"{b}/{n}": f"{b}/ln_attn" for n in ("q", "k", "v")})
    expected[f"{b}/up"] = f"{b}/rms_mlp"
  expected["logits"] = "ln_final"
  assert folding.folded == expected
  p = folding.variables["params"]
  np.testing.assert_array_equal(p["block0"]["ln_attn"]["scale"], np.ones(8, np.float32))
  np.testing.assert_array_equal(p["block0"]["ln_attn"]["bias"], np.zeros(8, np.float32))
  np.testing.assert_array_equal(p["block1"]["rms_mlp"]["scale"], np.zeros(8, np.float32))
  assert folding.apply == model.apply
  assert variables["params"]["ln_final"]["scale"] is not p["ln_final"]["scale"]  # not modified

  # float64: the folded model is the same function, so the logits agree to float64 rounding.
  # A missing or wrong term (or a float32 rounding anywhere) would show at >= u32 = 2**-24
  # relative; float64 rounding through these 8 layers stays far below u32·2**-6 = 2**-30.
  with jaxcompat.enable_x64(True), standard_promotion():
    to64 = lambda v: jax.tree.map(lambda a: jnp.asarray(f64(a)), v)
    f64_folded = jnn.fold_norms_into_dense(model, to64(variables), tokens).variables
    y0 = f64(model.apply(to64(variables), tokens))
    y1 = f64(model.apply(f64_folded, tokens))
  scale = np.abs(y0).max()
  assert np.abs(y1 - y0).max() <= U32 * 2.0 ** -6 * scale

  with standard_promotion():
    z0 = f64(jax.jit(model.apply)(variables, tokens))
    z1 = f64(jax.jit(folding.apply)(folding.variables, tokens))
  # float32: both are float32 evaluations of the float64 function y0; neither should be off
  # by more than a few hundred ulps of the logits' scale through 8 layers of fan-in <= 16.
  bound = staged_error(STAGES, scale)  # its stages are those of the nnx test's model
  assert_within(z0, y0, bound, "the original float32 logits")
  assert_within(z1, y0, bound, "the folded float32 logits")
  print(f"\nfloat32 logits: max|folded - original| = {np.abs(z1 - z0).max():.3g}, "
        f"max|original - float64| = {np.abs(z0 - y0).max():.3g}, "
        f"max|folded - float64| = {np.abs(z1 - y0).max():.3g}, max|logits| = {scale:.3g}; "
        f"float64 max|folded - original| = {np.abs(y1 - y0).max():.3g}")


class _Mixed(nn.Module):
  """One norm of each kind that must stay, and one with an offset but no scale that folds."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="also_residual")(x)
    x = h + nn.Dense(6, name="d0")(h)  # h is also the residual: its scale must stay
    x = x + nn.Dense(6, use_bias=False, name="d1")(nn.LayerNorm(name="no_bias_reader")(x))
    shared = nn.RMSNorm(name="twice")
    x = nn.Dense(6, name="d2")(shared(x)) + nn.Dense(6, name="d3")(shared(x + 1))
    x = nn.Dense(6, name="d4")(nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=-2,
                                            name="axis")(x))
    x = nn.Dense(6, name="d5")(nn.gelu(nn.LayerNorm(name="activation")(x)))
    return nn.Dense(6, name="d6")(nn.LayerNorm(use_scale=False, name="offset_only")(x))


def test_fold_norms_leaves_what_it_cannot_fold_with_the_reason():
  x = jnp.asarray(np.random.RandomState(2).randn(3, 4, 6), jnp.float32)
  model = _Mixed()
  variables = _random(model, x, seed=3)
  with standard_promotion():
    folding = jnn.fold_norms_into_dense(model, variables, x)
    y0 = f64(model.apply(variables, x))
    y1 = f64(model.apply(folding.variables, x))
  assert folding.folded == {"d6": "offset_only"}
  reasons = folding.unfolded
  assert set(reasons) == {"also_residual", "no_bias_reader", "twice", "axis", "activation"}
  assert "also used by something other than a Dense" in reasons["also_residual"]
  assert "no bias to fold it into" in reasons["no_bias_reader"]
  assert "called 2 times" in reasons["twice"]
  assert "feature_axes is -2" in reasons["axis"]
  assert "no Dense layer reads its output as is" in reasons["activation"]
  params, old = folding.variables["params"], variables["params"]
  for norm in reasons:
    for key, value in old[norm].items():
      np.testing.assert_array_equal(params[norm][key], value)
  np.testing.assert_array_equal(params["offset_only"]["bias"], np.zeros(6, np.float32))
  # Only d6 computes differently: (n + β)·W + b against n·W + (β·W + b), with the normalized n
  # the same in both (no scale; adding an offset of 0 is exact). Each side is a float32 dot of
  # 6 products plus a bias, around one more rounding (n + β) or a 7-term sum (β·W + b): off by at
  # most (γ(7) + γ(7) + u)·Σ|terms| < 2·(6 + 4)·u·Σ|terms|, with |n| <= sqrt(6) for 6 features.
  w = np.abs(f64(old["d6"]["kernel"]))
  terms = ((np.sqrt(6) + np.abs(f64(old["offset_only"]["bias"]))) @ w
           + np.abs(f64(old["d6"]["bias"])))
  assert_within(y1, y0, 2 * (6 + 4) * U32 * terms, "d6 with the offset folded")


class _Gemma(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5, name="d")(jnn.RMSNorm(convention="gemma", name="norm")(x))


def test_a_gemma_convention_norm_folds_its_scale_as_one_plus_the_stored_weight():
  """`convention="gemma"` stores γ - 1 without `zero_centered_scale=True`: the fold must take
  1 + scale (and reset the scale to 0), or the folded model computes another function."""
  x = jnp.asarray(np.random.RandomState(4).randn(3, 6))
  with jax.enable_x64(True), standard_promotion():
    variables = _random(_Gemma(), x, seed=5)
    variables = jax.tree.map(lambda a: jnp.asarray(f64(a)), variables)
    folding = jnn.fold_norms_into_dense(_Gemma(), variables, x)
    y0 = f64(_Gemma().apply(variables, x))
    y1 = f64(_Gemma().apply(folding.variables, x))
  assert folding.folded == {"d": "norm"}
  np.testing.assert_array_equal(folding.variables["params"]["norm"]["scale"], np.zeros(6))
  # Both are float64 evaluations of one function: a 6-term dot of normalized values (|n| <=
  # sqrt(6)) against O(1) weights, off by far less than 2**-40 of its scale.
  assert np.abs(y1 - y0).max() <= 2.0 ** -40 * np.abs(y0).max()
