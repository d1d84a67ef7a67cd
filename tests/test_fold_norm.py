"""`jaxnorm.fold_norm_into_dense`: a layer or RMS norm's scale and offset folded into the Dense
layer after it, exact in float64 and within float32 rounding bounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from tests import jaxcompat
from tests.refs import U32, assert_within, f64, sum_factor

U64 = 2.0 ** -53


def _data(kernel_shape, seed=0):
  rs = np.random.RandomState(seed)
  f, out = kernel_shape[0], kernel_shape[1:]
  return {
      "kernel": rs.randn(*kernel_shape).astype(np.float32),
      "bias": rs.randn(*out).astype(np.float32),
      "scale": (rs.randn(f) + 1).astype(np.float32),
      "offset": rs.randn(f).astype(np.float32),
  }


def _ref(d, use_bias, use_offset):
  """W' = diag(γ) W and b' = β W + b in float64, with Σ|terms| of b' for its bound."""
  k = f64(d["kernel"])
  rk = f64(d["scale"]).reshape((-1,) + (1,) * (k.ndim - 1)) * k
  b = f64(d["bias"]) if use_bias else np.zeros(k.shape[1:])
  off = f64(d["offset"]) if use_offset else np.zeros(k.shape[0])
  rb = np.tensordot(off, k, axes=(0, 0)) + b
  mag = np.tensordot(np.abs(off), np.abs(k), axes=(0, 0)) + np.abs(b)
  return rk, rb, mag


@pytest.mark.parametrize("kernel_shape", [(6, 5), (6, 2, 3)])
@pytest.mark.parametrize("use_bias,use_offset",
                         [(True, True), (True, False), (False, True), (False, False)])
def test_fold_norm_matches_float64_reference_under_jit(kernel_shape, use_bias, use_offset):
  d = _data(kernel_shape)
  bias = d["bias"] if use_bias else None
  offset = d["offset"] if use_offset else None
  k, b = jax.jit(lambda k, b, s, o: jn.fold_norm_into_dense(k, b, scale=s, offset=o))(
      d["kernel"], bias, d["scale"], offset)
  rk, rb, mag = _ref(d, use_bias, use_offset)
  assert k.dtype == jnp.float32 and b.dtype == jnp.float32
  assert k.shape == kernel_shape and b.shape == kernel_shape[1:]
  # W': one float32 rounding of γ·W. b': float32 products (one rounding each) summed over
  # features + 1 terms in any order.
  assert_within(k, rk, U32 * np.abs(rk), "folded kernel")
  n = kernel_shape[0] + 1
  assert_within(b, rb, (U32 + sum_factor(n)) * mag, "folded bias")


def _norm_then_dense(kind, x, d, folded):
  """norm(x) @ W + b in the working precision, with or without the norm's affine part."""
  if folded:
    k, b = jn.fold_norm_into_dense(d["kernel"], d["bias"], scale=d["scale"],
                                   offset=d["offset"] if kind == "layer" else None)
    y = jn.layer_norm(x) if kind == "layer" else jn.rms_norm(x)
  else:
    k, b = d["kernel"], d["bias"]
    y = (jn.layer_norm(x, d["scale"], d["offset"]) if kind == "layer"
         else jn.rms_norm(x, d["scale"]))
  return jnp.matmul(y, k, precision=jax.lax.Precision.HIGHEST) + b


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_folded_dense_equals_norm_then_dense_in_float64(kind):
  d32 = _data((8, 5), seed=1)
  x32 = (np.random.RandomState(2).randn(4, 8) * 3 + 1).astype(np.float32)
  with jaxcompat.enable_x64(True):
    d = {n: jnp.asarray(f64(a)) for n, a in d32.items()}
    x = jnp.asarray(f64(x32))
    z0 = _norm_then_dense(kind, x, d, folded=False)
    z1 = _norm_then_dense(kind, x, d, folded=True)
    assert z0.dtype == z1.dtype == jnp.float64
    y = jn.layer_norm(x) if kind == "layer" else jn.rms_norm(x)
  # The two differ only by float64 rounding: |n(x)|·|γ|·|W| products and their sums, plus β·W
  # and b, each off by at most (features + 3)·u64 of the magnitudes.
  mag = (np.abs(f64(y)) @ (np.abs(f64(d32["scale"]))[:, None] * np.abs(f64(d32["kernel"])))
         + np.abs(f64(d32["offset"])) @ np.abs(f64(d32["kernel"])) + np.abs(f64(d32["bias"])))
  assert_within(z1, z0, 2 * (8 + 3) * U64 * mag, f"{kind} norm folded, float64")


def test_fold_norm_keeps_the_kernel_dtype():
  d = _data((4, 3))
  k, b = jn.fold_norm_into_dense(jnp.asarray(d["kernel"], jnp.bfloat16), None,
                                 scale=d["scale"], offset=d["offset"])
  assert k.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16
  k, b = jn.fold_norm_into_dense(d["kernel"], jnp.asarray(d["bias"], jnp.bfloat16),
                                 scale=d["scale"])
  assert k.dtype == jnp.float32 and b.dtype == jnp.bfloat16


def test_fold_norm_of_a_stack_of_kernels_runs_under_vmap():
  """A stack of kernels (layers, features, out) folds under jax.vmap, each with its scale (the
  unmapped call is refused, naming jax.vmap: tests/test_bad_inputs.py)."""
  stacked = np.ones((2, 4, 3), np.float32)
  folded = jax.vmap(lambda k, s: jn.fold_norm_into_dense(k, scale=s))(
      stacked, np.full((2, 4), 2.0, np.float32))
  np.testing.assert_array_equal(folded[0], 2 * stacked)
  assert folded[1].shape == (2, 3)
