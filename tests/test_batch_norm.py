"""batch_norm, its state and update_running_stats: references, conventions and contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from tests import refs


def _x(shape, offset=0.0, seed=0):
  return (np.random.RandomState(seed).randn(*shape) * 3.0 + offset).astype(np.float32)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
def test_training_step_matches_float64(offset):
  x = _x((16, 4, 4, 3), offset=offset)
  scale, bias = np.float32([1.0, 2.0, 0.5]), np.float32([0.0, -1.0, 3.0])
  state = jn.batch_norm_init(3)
  y, new = jn.batch_norm(x, state, scale, bias, training=True, momentum=0.9)
  ref_y, _, mean, var = refs.ref_batch_norm_train(x, scale, bias)
  red = (0, 1, 2)
  # Bounds from the data's magnitude (offset + 3·N(0, 1)), valid for every summation order.
  refs.assert_within(y, ref_y, refs.norm_bound(x, ref_y, scale, red, -1, 1e-5), "y")
  refs.assert_within(new.mean, 0.1 * mean,
                     refs.ema_error(0.9, 0.0, mean, refs.mean_error(x, red)), "mean")
  refs.assert_within(new.var, 0.9 + 0.1 * var,
                     refs.ema_error(0.9, 1.0, var, refs.var_error(x, red)), "var")
  assert int(new.count) == 1


def test_evaluation_uses_running_statistics_and_returns_state_unchanged():
  x = _x((8, 3), offset=2.0)
  state = jn.BatchNormState(jnp.float32([1.0, 2.0, 3.0]), jnp.float32([4.0, 1.0, 0.25]),
                            jnp.int32(7))
  y, same = jn.batch_norm(x, state, training=False, epsilon=0.0)
  mean, var = np.float32([1, 2, 3]), np.float32([4.0, 1.0, 0.25])
  ref = refs.ref_normalize(x, mean, var, None, None, 0, -1, 0.0)
  # Given statistics: only the output's own roundings remain.
  refs.assert_within(y, ref, refs.output_error(x, mean, var, 0.0, 0.0, None, ref, 0, -1, 0.0))
  assert same is state


def test_eval_before_train_is_finite_and_near_identity():
  x = _x((4, 5))
  y, _ = jn.batch_norm(x, jn.batch_norm_init(5), training=False)
  ref = refs.f64(x) / np.sqrt(1.0 + 1e-5)
  refs.assert_within(y, ref, refs.output_error(x, np.zeros(5), np.ones(5), 0.0, 0.0, None, ref,
                                               0, -1, 1e-5))


def test_feature_axes_nchw():
  x = _x((4, 3, 5, 5), offset=1.0)  # NCHW: features on axis 1
  y, new = jn.batch_norm(x, jn.batch_norm_init(3), training=True, feature_axes=1)
  ref_y, _, mean, _ = refs.ref_batch_norm_train(x, feature_axes=1)
  red = (0, 2, 3)
  refs.assert_within(y, ref_y, refs.norm_bound(x, ref_y, None, red, 1, 1e-5), "y")
  refs.assert_within(new.mean, 0.01 * mean,
                     refs.ema_error(0.99, 0.0, mean, refs.mean_error(x, red)), "mean")


def test_mask_is_count_weighted_and_nan_safe():
  x = _x((10, 2))
  mask = (np.arange(10) < 6)[:, None]
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  y, new = jn.batch_norm(poisoned, jn.batch_norm_init(2), training=True, mask=mask,
                         momentum=0.5)
  ref_y, _, mean, var = refs.ref_batch_norm_train(x, mask=mask)
  bound = refs.norm_bound(x, ref_y, None, 0, -1, 1e-5, mask)
  refs.assert_within(np.asarray(y)[:6], ref_y[:6], bound[:6], "y")
  refs.assert_within(new.mean, 0.5 * mean,
                     refs.ema_error(0.5, 0.0, mean, refs.mean_error(x, 0, mask)), "mean")
  refs.assert_within(new.var, 0.5 + 0.5 * var,
                     refs.ema_error(0.5, 1.0, var, refs.var_error(x, 0, mask)), "var")


def test_all_masked_batch_leaves_running_statistics_unchanged():
  x = np.full((4, 3), np.nan, np.float32)
  state = jn.BatchNormState(jnp.float32([1.0, 2.0, 3.0]), jnp.float32([2.0, 2.0, 2.0]),
                            jnp.int32(5))
  _, new = jn.batch_norm(x, state, training=True, mask=np.zeros((4, 1), bool))
  np.testing.assert_array_equal(new.mean, state.mean)
  np.testing.assert_array_equal(new.var, state.var)
  assert int(new.count) == 5
  # The output at masked (NaN) positions is NaN, but nothing else is: the stats stay finite.
  assert np.isfinite(np.asarray(new.mean)).all()
  _, new2 = jn.batch_norm(np.ones((4, 3), np.float32), state, training=True,
                          mask=np.zeros((4, 1), bool))
  np.testing.assert_array_equal(new2.mean, state.mean)


def test_momentum_none_is_the_exact_cumulative_average():
  batches = [_x((6, 2), offset=o, seed=i) for i, o in enumerate([1.0, 5.0, -3.0, 10.0])]
  state = jn.batch_norm_init(2)
  for b in batches:
    _, state = jn.batch_norm(b, state, training=True, momentum=None)
  means = [refs.ref_moments(b, 0)[1] for b in batches]
  variances = [refs.ref_moments(b, 0)[2] for b in batches]
  mean_err = refs.cumulative_average_error(means, [refs.mean_error(b, 0) for b in batches])
  var_err = refs.cumulative_average_error(variances, [refs.var_error(b, 0) for b in batches])
  refs.assert_within(state.mean, np.mean(means, 0), mean_err, "mean")
  refs.assert_within(state.var, np.mean(variances, 0), var_err, "var")
  assert int(state.count) == 4


def test_unbiased_running_var_is_pytorch_convention():
  x = _x((5, 3), offset=1.0)
  _, _, mean, var = refs.ref_batch_norm_train(x)
  torch_momentum = 0.1
  m = jn.momentum_from_torch(torch_momentum)
  assert m == 0.9
  y, new = jn.batch_norm(x, jn.batch_norm_init(3), training=True, momentum=m,
                         unbiased_running_var=True)
  # PyTorch: running_var = (1 - 0.1) * 1 + 0.1 * var * n / (n - 1); normalize with biased var.
  # The Bessel factor adds a product and a division (2u).
  unbiased_err = (refs.var_error(x, 0) + 2 * refs.U32 * var) * 5 / 4
  refs.assert_within(new.var, 0.9 + 0.1 * var * 5 / 4,
                     refs.ema_error(0.9, 1.0, var * 5 / 4, unbiased_err), "var")
  refs.assert_within(new.mean, 0.1 * mean,
                     refs.ema_error(0.9, 0.0, mean, refs.mean_error(x, 0)), "mean")
  ref_y = refs.ref_batch_norm_train(x)[0]
  refs.assert_within(y, ref_y, refs.norm_bound(x, ref_y, None, 0, -1, 1e-5), "y")


def test_ema_runs_in_float32_for_bfloat16_input_and_state():
  x = jnp.asarray(_x((32, 2), offset=20.0), jnp.bfloat16)
  state = jn.batch_norm_init(2)
  y, new = jn.batch_norm(x, state, training=True, momentum=0.999)
  assert y.dtype == jnp.bfloat16 and new.mean.dtype == jnp.float32
  # In bfloat16 the decay 0.999 rounds to 1.0 and nothing would move: here it does.
  x32 = np.asarray(x.astype(jnp.float32))
  mean = refs.ref_moments(x32, 0)[1]
  refs.assert_within(new.mean, 0.001 * mean,
                     refs.ema_error(0.999, 0.0, mean, refs.mean_error(x32, 0)), "mean")
  assert np.isfinite(np.asarray(new.var)).all()
  bstate = jn.batch_norm_init(2, dtype=jnp.bfloat16)
  _, bnew = jn.batch_norm(x, bstate, training=True, momentum=0.999)
  assert bnew.mean.dtype == jnp.bfloat16 and bnew.var.dtype == jnp.bfloat16
  assert np.all(np.asarray(bnew.mean.astype(jnp.float32)) > 0.0)


def test_state_keeps_structure_through_lax_cond_and_scan():
  x = _x((8, 4))
  state = jn.batch_norm_init(4)

  def step(s, xb):
    y, s2 = jn.batch_norm(xb, s, training=True, momentum=0.9)
    return s2, y.sum()

  # Both branches of a cond must return identical structures, shapes and dtypes.
  pick = jax.jit(lambda p, s: jax.lax.cond(p, lambda s: step(s, x)[0], lambda s: s, s))
  for p in (True, False):
    out = pick(p, state)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    assert [a.dtype for a in out] == [a.dtype for a in state]
    assert [a.shape for a in out] == [a.shape for a in state]
  final, _ = jax.lax.scan(step, state, np.stack([x, x + 1.0, x - 1.0]))
  assert int(final.count) == 3
  assert isinstance(final, jn.BatchNormState)


def test_jit_traces_once_for_repeated_calls_of_the_same_shape():
  traces = []

  @jax.jit
  def step(x, state):
    traces.append(1)
    return jn.batch_norm(x, state, training=True)

  state = jn.batch_norm_init(3)
  for i in range(4):
    _, state = step(_x((5, 3), seed=i), state)
  ln = jax.jit(lambda x: (traces.append(1), jn.layer_norm(x))[1])
  for i in range(3):
    ln(_x((5, 3), seed=i))
  assert len(traces) == 2
  assert int(state.count) == 4


def test_state_round_trips_through_numpy_bit_for_bit(tmp_path):
  _, state = jn.batch_norm(_x((9, 3), offset=1e3), jn.batch_norm_init(3), training=True)
  path = tmp_path / "state.npz"
  np.savez(path, **state._asdict())
  loaded = np.load(path)
  restored = jn.BatchNormState(**{k: jnp.asarray(loaded[k]) for k in state._fields})
  for a, b in zip(state, restored, strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_momentum_one_freezes_the_running_statistics():
  """momentum=1.0 (PyTorch's 0.0): the running statistics stay as they are (fine-tuning)."""
  state = jn.BatchNormState(jnp.float32([1.0, -2.0]), jnp.float32([3.0, 0.5]),
                            jnp.asarray(4, jnp.int32))
  x = _x((8, 2), offset=5.0)
  _, new = jn.batch_norm(x, state, training=True, momentum=1.0)
  np.testing.assert_array_equal(new.mean, state.mean)
  np.testing.assert_array_equal(new.var, state.var)
  upd = jn.update_running_stats(state, jn.moments(x, 0), momentum=1.0)
  np.testing.assert_array_equal(upd.mean, state.mean)
  np.testing.assert_array_equal(upd.var, state.var)
  assert jn.momentum_from_torch(0.0) == 1.0


@pytest.mark.parametrize("momentum", [0.99, 0.999])
def test_bfloat16_state_keeps_converging_over_3000_steps(momentum):
  """A bfloat16 state whose increments are below half its spacing still moves: the update
  rounds it stochastically, so it tracks the float64 average (round-to-nearest stuck at 4.0
  for decay 0.99 and 1.46 for 0.999)."""
  x = jnp.asarray([[4.0], [6.0]] * 4, jnp.bfloat16)  # mean exactly 5, variance exactly 1
  steps = 3000

  @jax.jit
  def run(state):
    step = lambda s, _: (jn.batch_norm(x, s, training=True, momentum=momentum)[1], None)
    return jax.lax.scan(step, state, None, length=steps)[0]

  final = run(jn.batch_norm_init(1, dtype=jnp.bfloat16))
  assert final.mean.dtype == jnp.bfloat16
  refs.assert_within(final.mean, 5.0 * (1 - momentum**steps),
                     refs.stochastic_ema_error(momentum, steps, 5.0, jnp.bfloat16), "mean")
  np.testing.assert_array_equal(final.var, [1.0])


def test_per_feature_count_keeps_hidden_features_out_of_the_cumulative_average():
  """momentum=None with a per-feature mask: feature 1, hidden in the first update, averages
  only the second batch (mean 30, variance 100), not the initial mean 0 / variance 1."""
  x1 = jnp.float32([[1.0, 7.0], [3.0, 7.0]])
  m1 = jnp.asarray([[True, False], [True, False]])
  x2 = jnp.float32([[20.0, 20.0], [40.0, 40.0]])
  state = jn.batch_norm_init(2, per_feature_count=True)
  assert state.count.shape == (2,) and state.count.dtype == jnp.int32
  _, s1 = jn.batch_norm(x1, state, training=True, momentum=None, mask=m1)
  _, s2 = jn.batch_norm(x2, s1, training=True, momentum=None)
  # Feature 0: the average of the batches' moments (2, 1) and (30, 100); feature 1: (30, 100).
  np.testing.assert_array_equal(s2.mean, [16.0, 30.0])
  np.testing.assert_array_equal(s2.var, [50.5, 100.0])
  np.testing.assert_array_equal(s2.count, [2, 1])
  u1 = jn.update_running_stats(state, jn.moments(x1, 0, mask=m1), momentum=None)
  u2 = jn.update_running_stats(u1, jn.moments(x2, 0), momentum=None)
  for a, b in zip(u2, s2, strict=True):
    np.testing.assert_array_equal(a, b)
  # The structure, shapes and dtypes pass through lax.cond.
  out = jax.lax.cond(True, lambda s: s, lambda s: s1, s2)
  assert [a.shape for a in out] == [a.shape for a in s2]


def test_a_scalar_count_refuses_a_mask_that_can_hide_one_feature():
  """momentum=None, the default scalar count and a mask that differs between features: the
  update whose next batch averaged in the initial statistics (mean 15, variance 50.5 where 30
  and 100 are right) is refused, naming the fix; a mask that is the same for every feature
  (here a row mask) keeps the scalar count exact and is accepted."""
  x1 = jnp.float32([[1.0, 7.0], [3.0, 7.0]])
  m1 = jnp.asarray([[True, False], [True, False]])
  with pytest.raises(ValueError, match=r"per_feature_count=True.*\(2, 1\)"):
    jn.batch_norm(x1, jn.batch_norm_init(2), training=True, momentum=None, mask=m1)
  rows = jnp.asarray([[True], [False]])
  _, s = jn.batch_norm(x1, jn.batch_norm_init(2), training=True, momentum=None, mask=rows)
  np.testing.assert_array_equal(s.mean, [1.0, 7.0])
  np.testing.assert_array_equal(s.var, [0.0, 0.0])
  assert int(s.count) == 1


def test_a_scalar_count_state_still_loads_and_updates_as_before():
  """A state of the layout without per-feature counts (old checkpoints) stays scalar."""
  state = jn.BatchNormState(jnp.zeros(2), jnp.ones(2), jnp.asarray(3, jnp.int32))
  _, new = jn.batch_norm(jnp.float32([[1.0, 2.0], [3.0, 4.0]]), state, training=True,
                         momentum=None)
  assert new.count.shape == () and int(new.count) == 4


def _normal(shape, seed=0, offset=0.0):
  return (np.random.default_rng(seed).normal(size=shape) + offset).astype(np.float32)


def test_batch_renorm_stores_the_unbiased_running_variance_as_batch_norm_does():
  x = _normal((16, 4), offset=2.0)
  state = jn.BatchNormState(jnp.full(4, 1.0), jnp.full(4, 2.0), jnp.array(3))
  kw = dict(training=True, momentum=0.9, unbiased_running_var=True)
  _, bn = jn.batch_norm(x, state, **kw)
  _, rn = jn.batch_renorm(x, state, r_max=3.0, d_max=5.0, **kw)
  for a, b in zip(bn, rn, strict=True):
    np.testing.assert_array_equal(a, b)
  _, biased = jn.batch_renorm(x, state, r_max=3.0, d_max=5.0, training=True, momentum=0.9)
  # Bessel's factor n / (n - 1) on the batch's share of the update.
  n = 16
  batch_var = np.var(refs.f64(x), 0)
  np.testing.assert_allclose(rn.var - biased.var, 0.1 * batch_var / (n - 1), rtol=1e-4)
