"""`jaxnorm.nnx.fold_norms_into_dense` on a small pre-LN transformer written with flax.nnx:
every norm's scale and offset go into the Linear layers that read it (q, k and v; the MLP's
first layer; the logits layer), in place, and the logits stay the same."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnorm import nnx as jnnx
from tests.flax_cases import standard_promotion
from tests.refs import U32, assert_within, f64, staged_error

D, HEADS, VOCAB = 8, 2, 11
# The float32 evaluation's stages (their fan-ins), per block: the norm (8), q·k (4 per head),
# the softmax-weighted sum (5 keys), each projection (8; the MLP's down: 16), the MLP's norm and
# up (8); then the final norm and the logits (8). tests/test_fold_norm_linen.py's model too.
STAGES = 2 * [8, 4, 5, 8, 8, 8, 8, 8, 16] + [8, 8]


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.ln_attn = nnx.LayerNorm(D, rngs=rngs)
    self.q, self.k, self.v, self.out = (nnx.Linear(D, D, rngs=rngs) for _ in range(4))
    self.rms_mlp = jnnx.RMSNorm(D, convention="gemma", rngs=rngs)  # scale stores γ - 1
    self.up = nnx.Linear(D, 16, rngs=rngs)
    self.down = nnx.Linear(16, D, rngs=rngs)

  def __call__(self, x):
    h = self.ln_attn(x)
    split = lambda t: t.reshape(*t.shape[:-1], HEADS, -1)
    w = jnp.einsum("bqhd,bkhd->bhqk", split(self.q(h)), split(self.k(h))) / np.sqrt(D // HEADS)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(w, axis=-1), split(self.v(h)))
    x = x + self.out(a.reshape(x.shape))
    return x + self.down(nnx.gelu(self.up(self.rms_mlp(x))))


class _Transformer(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.blocks = nnx.List([_Block(rngs) for _ in range(2)])
    self.ln_final = jnnx.LayerNorm(D, rngs=rngs)
    self.logits = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.logits(self.ln_final(x))


def _randomize(model, seed=0, zero_centered=("rms_mlp",)):
  """Every parameter random (a norm's scale around 1, or 0 where it stores γ - 1; an offset
  around 0), so that nothing folds trivially."""
  rs = np.random.RandomState(seed)

  def fill(path, a):
    name = jax.tree_util.keystr(path)
    base = 1.0 if "scale" in name and not any(z in name for z in zero_centered) else 0.0
    return jnp.asarray(base + 0.5 * rs.randn(*a.shape), a.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model, nnx.Param)))
  return model


def _to64(model):
  copy = nnx.clone(model)
  nnx.update(copy, jax.tree.map(lambda a: jnp.asarray(f64(a)), nnx.state(copy, nnx.Param)))
  return copy


def test_pre_ln_transformer_folds_every_norm_in_place_and_keeps_its_logits():
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (2, 5)))
  model = _randomize(_Transformer(nnx.Rngs(0)))
  with jax.enable_x64(True), standard_promotion():
    model64 = _to64(model)
    y0 = f64(model64(tokens))
    folded64, unfolded64 = jnnx.fold_norms_into_dense(model64, tokens)
    y1 = f64(model64(tokens))
  with standard_promotion():
    z0 = f64(model(tokens))
    folded, unfolded = jnnx.fold_norms_into_dense(model, tokens)
    z1 = f64(model(tokens))
  assert unfolded == {} == unfolded64
  expected = {}
  for b in ("blocks/0", "blocks/1"):
    expected.update({f"{b}/{n}": f"{b}/ln_attn" for n in ("q", "k", "v")})
    expected[f"{b}/up"] = f"{b}/rms_mlp"
  expected["logits"] = "ln_final"
  assert folded == expected == folded64
  block = model.blocks[0]
  np.testing.assert_array_equal(block.ln_attn.scale[...], np.ones(D, np.float32))
  np.testing.assert_array_equal(block.ln_attn.bias[...], np.zeros(D, np.float32))
  np.testing.assert_array_equal(block.rms_mlp.scale[...], np.zeros(D, np.float32))
  assert block.q.kernel[...].dtype == jnp.float32 and isinstance(block.rms_mlp, jnnx.RMSNorm)

  # float64: the folded model is the same function, so the logits agree to float64 rounding.
  # A missing or wrong term (a zero-centred scale taken as γ, say) or a float32 rounding
  # anywhere would show at >= u32 = 2**-24 relative; float64 rounding stays far below 2**-30.
  scale = np.abs(y0).max()
  assert np.abs(y1 - y0).max() <= U32 * 2.0 ** -6 * scale

  # float32: both are float32 evaluations of the float64 function y0, of the stages STAGES.
  # The parameters are O(1) and the activations normalized before every Linear (see
  # `staged_error` for the bound and what it assumes).
  bound = staged_error(STAGES, scale)
  assert_within(z0, y0, bound, "the original float32 logits")
  assert_within(z1, y0, bound, "the folded float32 logits")
  print(f"\nfloat32 logits: max|folded - original| = {np.abs(z1 - z0).max():.3g}, "
        f"max|original - float64| = {np.abs(z0 - y0).max():.3g}, "
        f"max|folded - float64| = {np.abs(z1 - y0).max():.3g} (bound {bound:.3g}), "
        f"max|logits| = {scale:.3g}; float64 max|folded - original| = "
        f"{np.abs(y1 - y0).max():.3g}")


class _Mixed(nnx.Module):
  """One norm of each kind that must stay, and one with an offset but no scale that folds."""

  def __init__(self, rngs):
    lin = lambda use_bias=True: nnx.Linear(6, 6, use_bias=use_bias, rngs=rngs)
    self.also_residual, self.d0 = nnx.LayerNorm(6, rngs=rngs), lin()
    self.no_bias_reader, self.d1 = jnnx.LayerNorm(6, rngs=rngs), lin(use_bias=False)
    self.twice, self.d2, self.d3 = nnx.RMSNorm(6, rngs=rngs), lin(), lin()
    self.axis = nnx.LayerNorm(4, reduction_axes=(-2, -1), feature_axes=-2, rngs=rngs)
    self.d4 = lin()
    self.activation, self.d5 = nnx.LayerNorm(6, rngs=rngs), lin()
    self.shared_reader, self.d6 = jnnx.RMSNorm(6, rngs=rngs), lin()
    self.offset_only = nnx.LayerNorm(6, use_scale=False, rngs=rngs)
    self.d7 = lin()

  def __call__(self, x):
    h = self.also_residual(x)
    x = h + self.d0(h)  # h is also the residual: its scale must stay
    x = x + self.d1(self.no_bias_reader(x))
    x = self.d2(self.twice(x)) + self.d3(self.twice(x + 1))
    x = self.d4(self.axis(x))
    x = self.d5(nnx.gelu(self.activation(x)))
    x = self.d6(self.shared_reader(x)) + self.d6(x)  # d6 also reads x unnormalized
    return self.d7(self.offset_only(x))


def test_fold_norms_leaves_what_it_cannot_fold_with_the_reason():
  x = jnp.asarray(np.random.RandomState(2).randn(3, 4, 6), jnp.float32)
  model = _randomize(_Mixed(nnx.Rngs(0)), seed=3, zero_centered=())
  old = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  with standard_promotion():
    y0 = f64(model(x))
    folded, reasons = jnnx.fold_norms_into_dense(model, x)
    y1 = f64(model(x))
  assert folded == {"d7": "offset_only"}
  assert set(reasons) == {"also_residual", "no_bias_reader", "twice", "axis", "activation",
                          "shared_reader"}
  assert "also used by something other than a Dense" in reasons["also_residual"]
  assert "no bias to fold it into" in reasons["no_bias_reader"]
  assert "called 2 times" in reasons["twice"]
  assert "feature_axes is -2" in reasons["axis"]
  assert "no Dense layer reads its output as is" in reasons["activation"]
  assert "'d6' that reads it is called 2 times" in reasons["shared_reader"]
  new = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for path, value in old.items():
    if path[0] in ("offset_only", "d7"):
      continue
    np.testing.assert_array_equal(new[path], value, err_msg=str(path))
  np.testing.assert_array_equal(model.offset_only.bias[...], np.zeros(6, np.float32))
  # Only d7 computes differently: (n + β)·W + b against n·W + (β·W + b), with the normalized n
  # the same in both (no scale; adding an offset of 0 is exact). Each side is a float32 dot of
  # 6 products plus a bias, around one more rounding (n + β) or a 7-term sum (β·W + b): off by at
  # most (γ(7) + γ(7) + u)·Σ|terms| < 2·(6 + 4)·u·Σ|terms|, with |n| <= sqrt(6) for 6 features.
  w = np.abs(old[("d7", "kernel")])
  terms = (np.sqrt(6) + np.abs(old[("offset_only", "bias")])) @ w + np.abs(old[("d7", "bias")])
  assert_within(y1, y0, 2 * (6 + 4) * U32 * terms, "d7 with the offset folded")
