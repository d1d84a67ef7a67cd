"""The Pallas Mosaic (TPU) kernels of jaxnorm/_pallas/_mosaic.py, run on the CPU in Pallas interpret
mode (`interpret=True`; one case in Pallas's TPU interpreter, `pltpu.InterpretParams()`, which
also simulates the TPU's DMAs); no TPU and no libtpu needed. Then their lowering for the TPU
(Mosaic), chosen by `jax.lax.platform_dependent` as a caller dispatching by platform would.

The forward and backward kernels, called through their two entry points, against float64:
feature sizes 128, 384, 1000 (not a multiple of 128: the block's lane dimension is the whole
feature axis) and 4096, float32 and bfloat16, layer and RMS normalization, with and without
scale and bias. Blocks are forced down to 16 rows so that 37 rows make three blocks, the last
one ragged: both interpreters fill its rows past the array with NaN, so a row left out of the
mask of the dγ, dβ sums shows. One case keeps the real blocking (5 rows: one block of all rows).

Tolerances are the error bounds of tests/refs.py evaluated on each case's data (any summation
order), plus half an ulp of the output dtype per value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxnorm._pallas import _mosaic
from tests import refs

EPS = 1e-6
F32 = np.float32

CASES = [  # (rows, features, dtype, centred, scale, bias); 37 rows: 16 + 16 + 5 when forced
    (37, 128, jnp.float32, True, True, True),
    (37, 384, jnp.bfloat16, True, True, True),
    (37, 1000, jnp.float32, False, True, False),
    (37, 1000, jnp.bfloat16, True, False, False),
    (37, 4096, jnp.bfloat16, False, True, True),
    (37, 4096, jnp.float32, True, False, True),
    (37, 384, jnp.float32, False, False, False),
    (37, 128, jnp.bfloat16, False, True, False),
]


def _data(rows, features, dtype, seed=0):
  """x, scale, bias, dy as float32 arrays holding values exactly representable in `dtype`."""
  r = np.random.RandomState(seed)
  as_dtype = lambda a: np.asarray(jnp.asarray(a, F32).astype(dtype).astype(jnp.float32))
  x = as_dtype(r.randn(rows, features) * 2.0 + 0.5)
  scale = as_dtype(r.rand(features) + 0.5)
  bias = as_dtype(r.randn(features))
  dy = as_dtype(r.randn(rows, features))
  return x, scale, bias, dy


def _run(x, scale, bias, dy, dtype, centered, interpret):
  """The kernels' outputs, as float64: (y, stats, dx, dscale, dbias), in one jitted program."""
  has_scale, has_bias = scale is not None, bias is not None
  cast = lambda a: None if a is None else jnp.asarray(a).astype(dtype)
  params = tuple(cast(p) for p in (scale, bias) if p is not None)

  def run(x, dy, params):
    y, *stats = _mosaic.forward_call(x, params, eps=EPS, centered=centered,
                                     has_scale=has_scale, has_bias=has_bias, interpret=interpret)
    s = params[0] if has_scale else None
    grads = _mosaic.backward_call(x, dy, stats, s, has_bias=has_bias,
                                  bias_dtype=jnp.dtype(dtype) if has_bias else None,
                                  centered=centered, interpret=interpret)
    return y, stats, grads

  y, stats, (dx, dscale, dbias) = jax.jit(run)(cast(x), cast(dy), params)
  assert y.dtype == dx.dtype == jnp.dtype(dtype)
  assert all(s.dtype == jnp.float32 and s.shape == (x.shape[0],) for s in stats)
  assert len(stats) == (2 if centered else 1)
  assert (dscale is None) == (scale is None) and (dbias is None) == (bias is None)
  for g in (dscale, dbias):
    assert g is None or (g.dtype == jnp.dtype(dtype) and g.shape == (x.shape[1],))
  f64 = lambda a: None if a is None else np.asarray(a, np.float64)
  return f64(y), [f64(s) for s in stats], f64(dx), f64(dscale), f64(dbias)


def _float64(x, scale, bias, dy, centered):
  """y, mean, rstd and the vjp of dy (dx, dscale, dbias) in NumPy float64."""
  x, dy = refs.f64(x), refs.f64(dy)
  gamma = np.ones(x.shape[-1]) if scale is None else refs.f64(scale)
  if centered:
    _, mean, var = refs.ref_moments(x, -1)
    y = refs.ref_layer_norm(x, scale, bias, epsilon=EPS)
  else:
    mean, var = np.zeros(x.shape[0]), (x * x).mean(-1)
    y = refs.ref_rms_norm(x, scale, epsilon=EPS) + (0.0 if bias is None else refs.f64(bias))
  rstd = 1 / np.sqrt(var + EPS)
  xhat = (x - mean[:, None]) * rstd[:, None]
  # y = x̂ γ + β with x̂ = (x - μ) r: dx = r (g - x̂ mean(g x̂) - mean(g)), g = dy γ.
  g = dy * gamma
  dx = g - xhat * (g * xhat).mean(-1, keepdims=True)
  if centered:
    dx = dx - g.mean(-1, keepdims=True)
  grads = [dx * rstd[:, None], (dy * xhat).sum(0), dy.sum(0)]
  return y, mean, rstd, grads


def _check(what, got, want, bound):
  refs.assert_within(got, want, bound, what)


def _assert_matches_float64(rows, features, dtype, centered, with_scale, with_bias, seed=0,
                            interpret=True):
  x, scale, bias, dy = _data(rows, features, dtype, seed)
  scale = scale if with_scale else None
  bias = bias if with_bias else None
  y, stats, dx, dscale, dbias = _run(x, scale, bias, dy, dtype, centered, interpret)
  y64, mean64, rstd64, (dx64, dscale64, dbias64) = _float64(x, scale, bias, dy, centered)
  u_out = refs.unit_roundoff(dtype) if jnp.dtype(dtype).itemsize < 4 else 0.0

  # Forward: y within `norm_bound` (float32 statistics, then one rounding to the dtype).
  _check("y", y, y64, refs.norm_bound(x, y64, scale, centered=centered, out_dtype=dtype))
  # The statistics: the mean's bound, and r's relative error ρ of `output_error`.
  _, _, var = refs.ref_moments(x, -1)
  if centered:
    _check("mean", stats[0], mean64, refs.mean_error(x, -1))
    var_err = refs.var_error(x, -1)
  else:
    var = (refs.f64(x) ** 2).mean(-1)
    var_err = refs.mean_square_error(x, -1)
  rho = var_err / (2 * (var + EPS)) + 4 * refs.U32
  _check("rstd", stats[-1], rstd64, rstd64 * rho)

  # Backward: `derivative_bounds` (max-norm, float32), plus the rounding of each output.
  bx, bscale, bbias = refs.derivative_bounds(x, -1, -1, scale, dy, np.zeros_like(dy), EPS,
                                             centered=centered)
  _check("dx", dx, dx64, bx + u_out * np.abs(dx64))
  if scale is not None:
    _check("dscale", dscale, dscale64, bscale + u_out * np.abs(dscale64))
  if bias is not None:
    _check("dbias", dbias, dbias64, bbias + u_out * np.abs(dbias64))


@pytest.mark.parametrize("rows,features,dtype,centered,with_scale,with_bias", CASES)
def test_ragged_blocks_match_float64(monkeypatch, rows, features, dtype, centered, with_scale,
                                     with_bias):
  monkeypatch.setattr(_mosaic, "_MAX_BLOCK_ROWS", 16)
  blk = _mosaic.blocking(rows, features, dtype, "v5e")
  assert blk == {"fwd": 16, "bwd": 16} and rows % 16, blk  # three blocks, the last ragged
  _assert_matches_float64(rows, features, dtype, centered, with_scale, with_bias)


def test_tpu_interpreter_matches_float64(monkeypatch):
  monkeypatch.setattr(_mosaic, "_MAX_BLOCK_ROWS", 16)
  _assert_matches_float64(37, 1000, jnp.bfloat16, True, True, True, seed=2,
                          interpret=pltpu.InterpretParams())


def test_one_block_of_all_rows_matches_float64():
  assert _mosaic.blocking(5, 1000, jnp.bfloat16, "v5e") == {"fwd": 5, "bwd": 5}
  _assert_matches_float64(5, 1000, jnp.bfloat16, True, True, True, seed=1)


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocking_fits_the_scoped_vmem_in_whole_tiles(generation, dtype):
  sub = 8 * 4 // jnp.dtype(dtype).itemsize
  budget = _mosaic._VMEM_FRACTION * _mosaic.SCOPED_VMEM[generation]
  for features in (128, 384, 1000, 1024, 4096, 8192, 16384):
    for rows in (1, 7, 37, 4096, 1 << 20):
      blk = _mosaic.blocking(rows, features, dtype, generation)
      for name, block in blk.items():
        assert block == rows or (block % sub == 0 and block < rows), (features, rows, blk)
        assert _mosaic._vmem_bytes(block, features, dtype, name == "bwd") <= budget
      if rows == 1 << 20:  # a tile more would not fit, or the cap
        for name, block in blk.items():
          assert block == _mosaic._row_cap(features, dtype) or _mosaic._vmem_bytes(
              block + sub, features, dtype, name == "bwd") > budget


def _forward_backward(x, g, interpret):
  y, *stats = _mosaic.forward_call(x, (g, g), eps=EPS, centered=True, has_scale=True,
                                   has_bias=True, interpret=interpret)
  return (y, *_mosaic.backward_call(x, y, stats, g, has_bias=True, bias_dtype=g.dtype,
                                    centered=True, interpret=interpret))


def _on_platform(x, g):
  """Interpret mode in programs compiled for the CPU, the Mosaic kernels in those for a TPU."""
  return jax.lax.platform_dependent(x, g, cpu=lambda x, g: _forward_backward(x, g, True),
                                    tpu=lambda x, g: _forward_backward(x, g, False))


def test_supports_says_where_the_kernels_trace():
  assert _mosaic.supports(16384, jnp.bfloat16, "v5e") and _mosaic.supports(1000, jnp.float32)
  assert not _mosaic.supports(1 << 20, jnp.float32, "v6e")
  assert not _mosaic.supports(128, jnp.float16, "v6e")
  assert not _mosaic.supports(128, jnp.float32, "v4")


def test_one_kernel_call_per_pass_lowered_through_mosaic_for_tpu():
  """Without a TPU or libtpu: the kernels pass the Pallas Mosaic lowering (one call each)."""
  x = jax.ShapeDtypeStruct((37, 1000), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((1000,), jnp.bfloat16)
  text = str(jax.make_jaxpr(lambda x, g: _forward_backward(x, g, True))(x, g))
  assert text.count("pallas_call[") == 2, text
  text = jax.jit(_on_platform).trace(x, g).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count('kernel_name = "jaxnorm_layer_norm_fwd"') == 1
  assert text.count('kernel_name = "jaxnorm_layer_norm_bwd"') == 1
  assert text.count("tpu_custom_call") == 2


def test_platform_dependent_runs_interpret_mode_on_cpu():
  x, scale, _, _ = _data(5, 128, jnp.float32, seed=3)
  got = jax.jit(_on_platform)(x, scale)
  want = jax.jit(lambda x, g: _forward_backward(x, g, True))(x, scale)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_blocks_fit_every_generation_and_no_device_is_asked(monkeypatch):
  """Without a generation the blocks fit the smallest scoped VMEM, so they fit every generation,
  and tracing the kernels asks no device which generation it is: a program may be compiled for
  a device other than the one JAX runs on (`jax.export`, a CPU host compiling for TPUs)."""
  def no_device(*args, **kwargs):
    raise AssertionError("a device was asked for while tracing")

  monkeypatch.setattr(jax, "devices", no_device)
  monkeypatch.setattr(jax, "local_devices", no_device)
  for dtype in (jnp.float32, jnp.bfloat16):
    for features in (128, 1000, 4096, 16384):
      blk = _mosaic.blocking(1 << 20, features, dtype)
      assert blk == _mosaic.blocking(1 << 20, features, dtype, "v5e"), (features, blk)
      for generation, limit in _mosaic.SCOPED_VMEM.items():
        for name, block in blk.items():
          assert _mosaic._vmem_bytes(block, features, dtype, name == "bwd") <= (
              _mosaic._VMEM_FRACTION * limit), (generation, features, blk)
  x = jax.ShapeDtypeStruct((4099, 4096), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
  text = str(jax.make_jaxpr(lambda x, g: _forward_backward(x, g, False))(x, g))
  assert text.count("pallas_call[") == 2, text
