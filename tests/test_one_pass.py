"""The statistics that programs compiled for a GPU compute in one read of x, run here on the CPU.

On a GPU, batch normalization and layer normalization under differentiation compute their
moments by `_stats.shifted_moments` (sums about a shift among the data, the median of a few
leading elements, in one read of x, where the two-pass variance reads it twice). These tests
take the GPU's branch of every per-platform choice on the CPU and hold its results to float64
references within the bounds of `refs.shifted_errors`, at offsets where `E[x²] - E[x]²` fails,
with a shift far from the mean, and through the layers and their derivatives
(tests/test_branch_exactness.py: every branch on adversarial input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
from jaxnorm import _fused, _platform, _stats
from tests import jaxcompat, refs


@pytest.fixture
def on_gpu():
  """Every per-platform choice takes the branch that programs compiled for a GPU take
  (`_platform.forced`: the policy is part of every cached trace's key, so no trace made under
  one policy serves the other)."""
  with _platform.forced(_platform.GPU):
    yield


def _data(shape, offset, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * 2 + offset).astype(np.float32)


@pytest.mark.parametrize("shape,axes", [((16, 96), (1,)), ((512, 16), (0,)),
                                        ((256, 5, 6, 4), (0, 1, 2))])
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("blocked", [False, True])
def test_shifted_moments_within_their_bound(shape, axes, offset, blocked):
  x = _data(shape, offset)
  m = jax.jit(lambda x: _stats.shifted_moments(x, axes, jnp.float32, blocked=blocked))(x)
  count, mean, var = refs.ref_moments(x, axes)
  blocks = _stats.shift_blocks(shape[axes[0]]) if blocked else 1
  mean_err, var_err = refs.shifted_errors(x, axes, blocks=blocks)
  np.testing.assert_array_equal(m.count, count)
  refs.assert_within(m.mean, mean, mean_err, "mean")
  refs.assert_within(m.var, var, var_err, "var")
  # The bound does not grow like E[x²] - E[x]²'s, off by about 1e8 u = 6 at offset 1e4: one
  # shift keeps the precision the variance has at offset 0; blocks add the block means'
  # rounding, about u·1e4 each, at first order.
  assert np.max(var_err / var) < (5e-2 if blocks > 1 else 1e-4)


def test_a_shift_far_from_the_mean_stays_within_the_bound():
  # The 8 leading elements of each row are outliers, so is the median of the first three:
  # D = μ - K is 1e3 σ, and the bound, which grows with D², still holds (the one case where
  # the two-pass variance is the better one).
  x = _data((8, 512), 5.0)
  x[:, :8] += 2e3
  m = _stats.shifted_moments(jnp.asarray(x), (1,), jnp.float32)
  _, mean, var = refs.ref_moments(x, (1,))
  mean_err, var_err = refs.shifted_errors(x, (1,))
  refs.assert_within(m.mean, mean, mean_err, "mean")
  refs.assert_within(m.var, var, var_err, "var")
  assert np.all(m.var >= 0)


def test_one_read_moments_of_narrow_input_accumulate_in_float32():
  # bfloat16 input with an outlier at the head of each column, one of the three elements
  # whose median is the shift.
  x = _data((32, 64), 100.0)
  x[0] += 2e3
  xb = jnp.asarray(x).astype(jnp.bfloat16)
  m = _stats.shifted_moments(xb, (0,), jnp.float32)
  assert m.mean.dtype == m.var.dtype == jnp.float32
  xf = np.asarray(xb, np.float32)
  _, mean, var = refs.ref_moments(xf, (0,))
  mean_err, var_err = refs.shifted_errors(xf, (0,))
  refs.assert_within(m.mean, mean, mean_err, "mean")
  refs.assert_within(m.var, var, var_err, "var")
  assert np.all(m.var >= 0)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_group_moments_within_their_bound(offset):
  # Group normalization of images, channels last: 4 groups of 4 channels, over 3x40 positions.
  x = _data((2, 3, 40, 16), offset, seed=4)
  m = _stats.shifted_moments(jnp.asarray(x), (1, 2, 3), jnp.float32, groups=4)
  xg = x.reshape(2, 3, 40, 4, 4)
  _, mean, var = refs.ref_moments(xg, (1, 2, 4))
  mean_err, var_err = refs.shifted_errors(xg, (1, 2, 4), sample_axes=(1, 2))
  assert m.mean.shape == (2, 4)
  np.testing.assert_array_equal(m.count, 3 * 40 * 4)
  refs.assert_within(m.mean, mean, mean_err, "mean")
  refs.assert_within(m.var, var, var_err, "var")


def test_a_constant_set_has_variance_zero():
  x = jnp.full((4, 64), 1e4 + 0.5, jnp.float32)
  m = _stats.shifted_moments(x, (1,), jnp.float32)
  np.testing.assert_array_equal(m.var, 0.0)
  np.testing.assert_array_equal(m.mean, 1e4 + 0.5)


@pytest.mark.parametrize("shape,axes", [((16, 1024), (1,)), ((96, 16), (0,)),
                                        ((4, 5, 6, 16), (1, 2, 3))])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_shifted_moments_of_rows_within_their_bound(shape, axes, offset):
  x = _data(shape, offset, seed=6)
  m = jax.jit(lambda x: _stats.shifted_moments(x, axes, jnp.float32))(x)
  count, mean, var = refs.ref_moments(x, axes)
  mean_err, var_err = refs.shifted_errors(x, axes)
  np.testing.assert_array_equal(m.count, count)
  refs.assert_within(m.mean, mean, mean_err, "mean")
  refs.assert_within(m.var, var, var_err, "var")
  # E[x²] - E[x]² is off by about c(N)·1e8 at offset 1e4, far beyond the variance itself; the
  # shifted sums' bound stays well below.
  assert np.max(var_err / var) < 0.05


def test_shifted_moments_have_the_moments_derivatives():
  # The shift is held constant, so the sums' derivatives are the moments' own:
  # dμ/dx = 1/N, dσ²/dx = 2(x - μ)/N, and second derivatives through them.
  x = _data((3, 64), 10.0, seed=8)
  f = lambda x: _stats.shifted_moments(x, (1,), jnp.float32)
  cot_mean = np.linspace(-1, 1, 3).astype(np.float32)
  cot_var = np.array([0.5, 1.0, -2.0], np.float32)
  _, pull = jax.vjp(lambda x: tuple(f(x))[1:], jnp.asarray(x))
  (dx,) = pull((jnp.asarray(cot_mean), jnp.asarray(cot_var)))
  _, mean, _ = refs.ref_moments(x, (1,))
  xc = refs.f64(x) - mean[:, None]
  want = cot_mean[:, None] / 64 + cot_var[:, None] * 2 * xc / 64
  # dx rounds the float32 mean (off by mean_error) and a few products: 8 u relative on top.
  mean_err, _ = refs.shifted_errors(x, (1,))
  bound = 2 * np.abs(cot_var)[:, None] * mean_err[:, None] / 64 + 8 * refs.U32 * (
      np.abs(want) + np.abs(cot_var)[:, None] * 2 * np.abs(xc) / 64)
  refs.assert_within(dx, want, bound, "dx")
  # Second derivatives: the Hessian of σ² is 2(I - 1/N)/N, trace 2(N - 1)/N², each entry a
  # few roundings of exact powers of two and their differences (4u relative is generous).
  var_of = lambda v: _stats.shifted_moments(v[None], (1,), jnp.float32).var[0]
  h = np.asarray(jax.hessian(var_of)(jnp.asarray(x[0])), np.float64)
  want_h = 2 * (np.eye(64) - 1 / 64) / 64
  refs.assert_within(h, want_h, 4 * refs.U32 * np.abs(want_h), "hessian")


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_batch_norm_training_on_a_gpu_within_the_bound(on_gpu, offset):
  x = _data((256, 3, 16), offset, seed=1)  # two blocks of the batch
  g = (1 + 0.1 * np.random.default_rng(2).normal(size=16)).astype(np.float32)
  b = np.full(16, 0.25, np.float32)
  state = jn.batch_norm_init(16)
  y, new = jax.jit(lambda x: jn.batch_norm(x, state, g, b, training=True, momentum=0.9))(x)
  axes = (0, 1)
  _, mean, var = refs.ref_moments(x, axes)
  mean_err, var_err = refs.shifted_errors(x, axes, blocks=_stats.shift_blocks(256))
  ref_y = refs.ref_normalize(x, mean, var, g, b, axes, -1, 1e-5)
  bound = refs.output_error(x, mean, var, mean_err, var_err, g, ref_y, axes, -1, 1e-5)
  refs.assert_within(y, ref_y, bound, "y")
  refs.assert_within(new.mean, 0.1 * mean, 0.1 * mean_err + refs.U32 * np.abs(mean), "mean")


def _outputs_and_gradients_gpu_then_cpu(f, args, cot):
  """`[y, *gradients]` of `f(*args)` pulled back from `cot`, first with the GPU's policy, then
  with the CPU's (each a function jitted afresh: a jitted function keeps its first trace)."""
  def run(policy):
    with _platform.forced(policy):
      y, pullback = jax.vjp(jax.jit(lambda *a: f(*a)), *args)
      return [np.asarray(a) for a in (y, *pullback(jnp.asarray(cot)))]

  return run(_platform.GPU), run(_platform.CPU)


@pytest.mark.parametrize("name", ["layer_norm", "batch_norm", "group_norm"])
def test_gpu_derivatives_equal_the_cpus(name):
  """Gradients through the one-read statistics: the CPU's own within twice the bound."""
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(12, 32)) * 2 + 3).astype(np.float32)
  g = (1 + 0.1 * rng.normal(size=32)).astype(np.float32)
  b = (0.1 * rng.normal(size=32)).astype(np.float32)
  cot = rng.normal(size=(12, 32)).astype(np.float32)
  state = jn.batch_norm_init(32)
  if name == "layer_norm":
    f, red, eps = (lambda x, g, b: jn.layer_norm(x, g, b)), -1, 1e-6
  elif name == "group_norm":
    # Rows of 32 channels in 4 groups: per example, like layer norm, but with groups.
    f, red, eps = (lambda x, g, b: jn.group_norm(x, g, b, num_groups=4)), -1, 1e-6
  else:
    f = lambda x, g, b: jn.batch_norm(x, state, g, b, training=True, epsilon=1e-5)[0]
    red, eps = 0, 1e-5

  on_gpu_, on_cpu = _outputs_and_gradients_gpu_then_cpu(f, (x, g, b), cot)
  if name == "group_norm":  # statistics over each group's 8 channels, axes made explicit
    xg, cg = x.reshape(12, 4, 8), cot.reshape(12, 4, 8)
    dx_b, dg_b, db_b = refs.derivative_bounds(xg, -1, (1, 2), g.reshape(4, 8), cg,
                                              np.zeros_like(cg), eps, None, True)
    y_b = refs.group_norm_bound(x, on_cpu[0], 4, g, eps)
  else:
    dx_b, dg_b, db_b = refs.derivative_bounds(x, red, -1, g, cot, np.zeros_like(cot), eps,
                                              None, True)
    y_b = refs.norm_bound(x, on_cpu[0], g, red, -1, eps)
  refs.assert_within(on_gpu_[0], on_cpu[0], 2 * y_b, "y")
  for what, a, c, bound in (("dx", on_gpu_[1], on_cpu[1], dx_b),
                            ("dscale", on_gpu_[2], on_cpu[2], dg_b),
                            ("dbias", on_gpu_[3], on_cpu[3], db_b)):
    refs.assert_within(a, c, 2 * bound, what)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_gpu_parameter_gradients_in_blocks_of_rows(name):
  """On a GPU, layer and RMS norm broadcast the parameters' tangents over blocks of rows
  (reverse mode: per-block partial sums of dγ and dβ, then their sum): the CPU's gradients
  within twice the bound, at a shape that splits (640 rows, 4 blocks of 160)."""
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(5, 128, 32)) * 2 + 3).astype(np.float32)
  g = (1 + 0.1 * rng.normal(size=32)).astype(np.float32)
  b = (0.1 * rng.normal(size=32)).astype(np.float32)
  cot = rng.normal(size=x.shape).astype(np.float32)
  centered = name == "layer_norm"
  r = _fused.Reduction((2,), (2,), x.shape, None, None, centered, None, jnp.float32,
                       _platform.GPU)
  assert _fused._row_blocks(r, jnp.zeros((1, 1, 32))) == (4, 160)
  if centered:
    f, params = (lambda x, g, b: jn.layer_norm(x, g, b)), (g, b)
  else:
    f, params = (lambda x, g: jn.rms_norm(x, g)), (g,)

  on_gpu_, on_cpu = _outputs_and_gradients_gpu_then_cpu(f, (x, *params), cot)
  dx_b, dg_b, db_b = refs.derivative_bounds(x, -1, -1, g, cot, np.zeros_like(cot), 1e-6, None,
                                            centered)
  refs.assert_within(on_gpu_[0], on_cpu[0],
                     2 * refs.norm_bound(x, on_cpu[0], g, -1, -1, 1e-6, centered=centered), "y")
  names = ("dx", "dscale", "dbias")[:1 + len(params)]
  assert len(on_cpu) == 1 + len(names)
  bounds = (dx_b, dg_b, db_b)[:len(names)]
  for what, a, c, bound in zip(names, on_gpu_[1:], on_cpu[1:], bounds, strict=True):
    refs.assert_within(a, c, 2 * bound, what)


def test_parameter_gradients_in_blocks_only_on_a_gpu():
  """The blocks of rows are in programs compiled for a GPU (a barrier between the two sums of
  each parameter's gradient), not in those for the CPU or a TPU."""
  x = jax.ShapeDtypeStruct((5, 128, 32), jnp.float32)
  p = jax.ShapeDtypeStruct((32,), jnp.float32)
  grad = jax.grad(lambda x, g, b: jn.layer_norm(x, g, b).sum(), argnums=(0, 1, 2))

  def barriers(platform):
    text = jax.jit(grad).trace(x, p, p).lower(lowering_platforms=(platform,)).as_text()
    return [line for line in text.splitlines() if "optimization_barrier" in line]

  assert [line for line in barriers("cuda") if "tensor<4x32xf32>" in line]
  assert not [line for line in barriers("cpu") if "tensor<4x32xf32>" in line]
  assert not barriers("tpu")


@pytest.mark.parametrize("shape,param,expected", [
    ((12, 32), (1, 32), None),  # one block: nothing to split
    ((640, 32), (1, 32), (4, 160)),
    ((4096, 512), (1, 512), (16, 256)),
    ((8, 512, 1024), (1, 1, 1024), (16, 256)),
    ((1031, 64), (1, 64), None),  # a prime number of rows
    ((640, 32), (640, 32), None),  # a parameter per row
])
def test_row_blocks(shape, param, expected):
  r = _fused.Reduction((len(shape) - 1,), (len(shape) - 1,), shape, None, None, True, None,
                       jnp.float32, _platform.GPU)
  assert _fused._row_blocks(r, jnp.zeros(param)) == expected


def test_which_normalizations_read_once_on_a_gpu():
  """The one-read statistics appear in programs for a GPU where they save a read, and not in
  layer normalization's forward pass, masked statistics or statistics across devices."""
  x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  state = jn.batch_norm_init(16)

  def has_shift(f, *args, platform="cuda"):
    lowered = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))
    return "jaxnorm.shifted_moments" in lowered.as_text(debug_info=True)

  bn = lambda x: jn.batch_norm(x, state, training=True)[0]
  ln = lambda x: jn.layer_norm(x)
  masked = lambda x: jn.batch_norm(x, state, training=True, mask=jnp.ones((8, 1), bool))[0]
  assert has_shift(bn, x)
  # Layer norm under differentiation (its forward pass alone is one kernel already).
  assert has_shift(lambda x: jax.grad(lambda x: ln(x).sum())(x), x)
  assert not has_shift(ln, x)
  assert not has_shift(masked, x)
  images = jax.ShapeDtypeStruct((2, 4, 4, 16), jnp.float32)
  assert has_shift(lambda x: jn.group_norm(x, num_groups=4), images)
  assert has_shift(lambda x: jn.instance_norm(x), images)
  # On a TPU: float32 layer norm of rows of 4096 elements or more under differentiation only.
  ln_grad = lambda x: jax.grad(lambda x: ln(x).sum())(x)
  wide = jax.ShapeDtypeStruct((2, 4096), jnp.float32)
  assert has_shift(ln_grad, wide, platform="tpu")
  assert not has_shift(ln_grad, x, platform="tpu")
  assert not has_shift(ln_grad, jax.ShapeDtypeStruct((2, 4096), jnp.bfloat16), platform="tpu")
  assert not has_shift(bn, x, platform="tpu")
  assert not has_shift(ln_grad, wide, platform="cpu")
  # Input split along the batch by an Explicit mesh axis: the sample would have to travel.
  mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  split = jax.ShapeDtypeStruct((8, 16), jnp.float32,
                               sharding=jax.sharding.NamedSharding(mesh, P("batch")))
  with jaxcompat.set_mesh(mesh):
    assert not has_shift(bn, split)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_group_norm_on_a_gpu_within_the_bound(on_gpu, offset):
  x = _data((2, 3, 40, 16), offset, seed=5)
  g = np.linspace(0.5, 1.5, 16).astype(np.float32)
  y = jax.jit(lambda x: jn.group_norm(x, g, num_groups=4))(x)
  xg = x.reshape(2, 3, 40, 4, 4)
  axes = (1, 2, 4)
  _, mean, var = refs.ref_moments(xg, axes)
  mean_err, var_err = refs.shifted_errors(xg, axes, sample_axes=(1, 2))
  ref_y = refs.ref_group_norm(x, 4, g).reshape(xg.shape)
  bound = refs.output_error(xg, mean, var, mean_err, var_err, g.reshape(4, 4), ref_y, axes,
                            (3, 4), 1e-6)
  refs.assert_within(np.asarray(y).reshape(xg.shape), ref_y, bound, "y")


def test_layer_norm_of_rows_split_across_devices_on_a_gpu(on_gpu):
  """Tensor parallelism: the features of each row split over 4 devices by an Auto mesh axis
  under plain `jit`, which jaxnorm does not see at trace time (an Explicit one keeps the two-pass
  variance). XLA partitions the shifted sums: the first device sends each row's leading
  elements to the others (collective-permutes), each reduces its part of every row about the
  shift, and the partial sums are all-reduced; within the bound."""
  mesh = jax.make_mesh((4,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  x = _data((16, 256), 1e4, seed=9)
  g = np.linspace(0.5, 1.5, 256).astype(np.float32)
  split = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(None, "model")))
  f = jax.jit(lambda x: jax.vjp(lambda x: jn.layer_norm(x, g), x)[0])
  lowered = f.lower(split)
  assert "jaxnorm.shifted_moments" in lowered.as_text(debug_info=True)
  compiled = lowered.compile().as_text()
  assert "collective-permute" in compiled and "all-reduce" in compiled
  y = f(split)
  _, mean, var = refs.ref_moments(x, (1,))
  mean_err, var_err = refs.shifted_errors(x, (1,))
  ref_y = refs.ref_normalize(x, mean, var, g, None, (1,), -1, 1e-6)
  bound = refs.output_error(x, mean, var, mean_err, var_err, g, ref_y, (1,), -1, 1e-6)
  refs.assert_within(y, ref_y, bound, "y")
