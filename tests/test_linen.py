"""jaxnorm.linen against flax.linen itself: variables, outputs, statistics, and the extras."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import linen as jnn
from tests import flax_cases as fc
from tests import refs

KEY = jax.random.key(0)
DTYPES = (jnp.float32, jnp.bfloat16)


def _pair(name, **kw):
  kw = {**fc.KWARGS[name], **kw}
  return getattr(nn, name)(use_fast_variance=False, **kw), getattr(jnn, name)(**kw)


def _call_kw(name, train):
  return {"use_running_average": not train} if name == "BatchNorm" else {}


@pytest.mark.parametrize("name", fc.NAMES)
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_flax_train_and_eval(name, x_dtype, param_dtype, masked):
  theirs, ours = _pair(name, param_dtype=param_dtype)
  x, x2 = fc.data(x_dtype), fc.data(x_dtype, seed=5, offset=-0.3)
  m = fc.mask() if masked else None
  with fc.standard_promotion():
    v_theirs = theirs.init(KEY, x, **_call_kw(name, True))
  v_ours = ours.init(KEY, x, **_call_kw(name, True))
  fc.assert_trees_identical(v_ours, v_theirs)

  # Training step, both from flax's variables.
  with fc.standard_promotion():
    y_t, upd_t = theirs.apply(v_theirs, x, mask=m, mutable=["batch_stats"],
                              **_call_kw(name, True))
  y_o, upd_o = ours.apply(v_theirs, x, mask=m, mutable=["batch_stats"], **_call_kw(name, True))
  fc.assert_close(y_o, y_t)
  fc.assert_trees_close(upd_o, upd_t)

  # Evaluation with the updated statistics, on other data.
  v_next = {**v_theirs, **upd_t}
  with fc.standard_promotion():
    e_t = theirs.apply(v_next, x2, **_call_kw(name, False))
  fc.assert_close(ours.apply(v_next, x2, **_call_kw(name, False)), e_t)


@pytest.mark.parametrize("name", fc.NAMES)
@pytest.mark.parametrize("x_dtype,dtype", [(jnp.float32, jnp.bfloat16),
                                           (jnp.bfloat16, jnp.float32)])
def test_matches_flax_with_dtype_argument(name, x_dtype, dtype):
  theirs, ours = _pair(name, dtype=dtype)
  x = fc.data(x_dtype)
  with fc.standard_promotion():
    v = theirs.init(KEY, x, **_call_kw(name, True))
    y_t, upd_t = theirs.apply(v, x, mutable=["batch_stats"], **_call_kw(name, True))
  y_o, upd_o = ours.apply(v, x, mutable=["batch_stats"], **_call_kw(name, True))
  assert y_o.dtype == dtype
  fc.assert_close(y_o, y_t)
  fc.assert_trees_close(upd_o, upd_t)


@pytest.mark.parametrize("name", fc.NAMES)
def test_without_scale_and_bias(name):
  kw = dict(use_scale=False) if name == "RMSNorm" else dict(use_scale=False, use_bias=False)
  theirs, ours = _pair(name, **kw)
  x = fc.data(jnp.bfloat16)
  with fc.standard_promotion():
    v = theirs.init(KEY, x, **_call_kw(name, True))
    y_t, _ = theirs.apply(v, x, mutable=["batch_stats"], **_call_kw(name, True))
  assert jax.tree.structure(ours.init(KEY, x, **_call_kw(name, True))) == jax.tree.structure(v)
  y_o, _ = ours.apply(v, x, mutable=["batch_stats"], **_call_kw(name, True))
  fc.assert_close(y_o, y_t)  # bfloat16 out: no parameter to promote with


def test_axes_options_match_flax():
  x = fc.data(shape=(4, 3, 5, 6))
  cases = [
      (nn.BatchNorm, jnn.BatchNorm, dict(axis=(1, 3)), dict(use_running_average=False)),
      (nn.LayerNorm, jnn.LayerNorm, dict(reduction_axes=(1, 2, 3), feature_axes=(-2, -1)), {}),
      (nn.RMSNorm, jnn.RMSNorm, dict(reduction_axes=(2, 3), feature_axes=2), {}),
      (nn.GroupNorm, jnn.GroupNorm, dict(num_groups=None, group_size=2,
                                         reduction_axes=(2, 3)), {}),
      (nn.InstanceNorm, jnn.InstanceNorm, dict(feature_axes=(1, 3)), {}),
  ]
  for flax_cls, our_cls, kw, call in cases:
    theirs, ours = flax_cls(use_fast_variance=False, **kw), our_cls(**kw)
    with fc.standard_promotion():
      v = theirs.init(KEY, x, **call)
      y_t, upd_t = theirs.apply(v, x, mutable=["batch_stats"], **call)
    fc.assert_trees_identical(ours.init(KEY, x, **call), v)
    y_o, upd_o = ours.apply(v, x, mutable=["batch_stats"], **call)
    fc.assert_close(y_o, y_t)
    fc.assert_trees_close(upd_o, upd_t)


def test_force_float32_reductions_false_keeps_flax_variables():
  theirs, ours = _pair("BatchNorm", param_dtype=jnp.bfloat16, force_float32_reductions=False)
  x = fc.data()
  with fc.standard_promotion():
    v = theirs.init(KEY, x, use_running_average=False)
  fc.assert_trees_identical(ours.init(KEY, x, use_running_average=False), v)
  assert v["batch_stats"]["mean"].dtype == jnp.bfloat16
  y, upd = ours.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  assert upd["batch_stats"]["var"].dtype == jnp.bfloat16 and y.dtype == jnp.float32


# --- a whole model: flax's variables run in the model built with ours, and back ------------

def _net(ns):
  norm = {name: getattr(ns, name) for name in fc.NAMES}
  if ns is nn:  # flax with its stable variance, for the 1e-5 comparison
    norm = {k: functools.partial(v, use_fast_variance=False) for k, v in norm.items()}

  dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(0.5))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = norm["InstanceNorm"]()(dense(8)(x))
      x = nn.relu(x)
      x = dense(8)(x)
      x = norm["BatchNorm"](use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(norm["GroupNorm"](num_groups=4)(nn.relu(x)))
      x = norm["LayerNorm"]()(dense(8)(x.mean((1, 2))))
      x = norm["RMSNorm"]()(dense(8)(nn.relu(x)))
      return dense(3)(x)

  return Net()


def test_flax_model_variables_load_into_ours_and_back():
  x = fc.data(shape=(6, 7, 7, 3))
  theirs, ours = _net(nn), _net(jnn)
  run_t = jax.jit(theirs.apply, static_argnames=("train", "mutable"))
  run_o = jax.jit(ours.apply, static_argnames=("train", "mutable"))
  with fc.standard_promotion():
    v_t = jax.jit(theirs.init, static_argnames="train")(KEY, x, train=False)
    out_t, upd_t = run_t(v_t, x, train=True, mutable=("batch_stats",))
    ev_t = run_t({**v_t, **upd_t}, x, train=False)
  v_o = jax.jit(ours.init, static_argnames="train")(KEY, x, train=False)
  fc.assert_trees_identical(v_o, v_t)
  out_o, upd_o = run_o(v_t, x, train=True, mutable=("batch_stats",))
  atol = 1e-5
  fc.assert_close(out_o, out_t, atol)
  fc.assert_trees_close(upd_o, upd_t, atol)
  fc.assert_close(run_o({**v_t, **upd_t}, x, train=False), ev_t, atol)
  # ... and ours' variables run in flax's model.
  with fc.standard_promotion():
    back = run_t({**v_o, **upd_o}, x, train=False)
  fc.assert_close(run_o({**v_o, **upd_o}, x, train=False), back, atol)


# --- where jaxnorm is better -----------------------------------------------------------------

def test_offset_1e4_input_is_exact_where_flax_default_is_not():
  x = fc.data(offset=1e4, shape=(16, 64))
  ours = jnn.LayerNorm(epsilon=1e-6)
  v = ours.init(KEY, x)
  ref = refs.ref_layer_norm(x, epsilon=1e-6)
  bound = refs.norm_bound(x, ref, epsilon=1e-6)
  refs.assert_within(ours.apply(v, x), ref, bound, "ours")
  with fc.standard_promotion():
    y_flax = np.asarray(nn.LayerNorm().apply(v, x), np.float64)
  assert (np.abs(y_flax - ref) > bound).any()  # E[x²] - E[x]²: outside what rounding explains

  bn = jnn.BatchNorm(use_running_average=False)
  vb = bn.init(KEY, x)
  _, upd = bn.apply(vb, x, mutable=["batch_stats"])
  _, mean, var = refs.ref_moments(x, 0)
  refs.assert_within(upd["batch_stats"]["var"], 0.99 + 0.01 * var,
                     refs.ema_error(0.99, 1.0, var, refs.var_error(x, 0)), "var")
  refs.assert_within(upd["batch_stats"]["mean"], 0.01 * mean,
                     refs.ema_error(0.99, 0.0, mean, refs.mean_error(x, 0)), "mean")


def test_uneven_masks_across_vmapped_devices_match_the_concatenated_batch():
  x, m = fc.uneven()  # 4 devices with 2, 4, 6, 8 valid rows
  bn = jnn.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0)
  v = bn.init(KEY, x[0])

  def step(xi, mi):
    return bn.apply(v, xi, mask=mi, mutable=["batch_stats"])

  y, upd = jax.vmap(step, axis_name="d")(x, m)
  y_one, upd_one = jnn.BatchNorm(use_running_average=False, momentum=0.0).apply(
      v, x.reshape(-1, 3), mask=m.reshape(-1, 1), mutable=["batch_stats"])
  flat_x, flat_m = np.asarray(x).reshape(-1, 3), np.broadcast_to(m, x.shape).reshape(-1, 3)
  _, mean, var = refs.ref_moments(flat_x, 0, flat_m)
  mean_err, var_err = refs.mean_error(flat_x, 0, flat_m), refs.var_error(flat_x, 0, flat_m)
  for i in range(x.shape[0]):
    refs.assert_within(upd["batch_stats"]["mean"][i], mean, mean_err, "mean")
    refs.assert_within(upd["batch_stats"]["var"][i], var, var_err, "var")
  refs.assert_within(upd_one["batch_stats"]["var"], var, var_err, "one device var")
  valid = np.asarray(jnp.broadcast_to(m, x.shape))
  ref_y = refs.ref_batch_norm_train(flat_x, mask=flat_m)[0]
  bound = refs.norm_bound(flat_x, ref_y, None, 0, -1, 1e-5, flat_m).reshape(x.shape)
  refs.assert_within(np.asarray(y)[valid], np.asarray(y_one).reshape(x.shape)[valid],
                     2 * bound[valid], "y")

  # flax averages the per-device means: wrong here.
  with fc.standard_promotion():
    _, upd_flax = jax.vmap(lambda xi, mi: nn.BatchNorm(
        use_running_average=False, axis_name="d", momentum=0.0).apply(
            v, xi, mask=mi, mutable=["batch_stats"]), axis_name="d")(x, m)
  assert (np.abs(np.asarray(upd_flax["batch_stats"]["mean"][0]) - mean) > mean_err).any()


def test_device_with_no_valid_element_gives_finite_statistics():
  x, m = fc.uneven()
  m = m.at[0].set(False)
  bn = jnn.BatchNorm(use_running_average=False, axis_name="d")
  v = bn.init(KEY, x[0])
  y, upd = jax.vmap(lambda xi, mi: bn.apply(v, xi, mask=mi, mutable=["batch_stats"]),
                    axis_name="d")(x, m)
  assert np.isfinite(np.asarray(y)).all()
  assert np.isfinite(np.asarray(upd["batch_stats"]["var"])).all()


# --- extras flax lacks -----------------------------------------------------------------------

def test_fully_masked_batch_leaves_batch_stats_unchanged():
  bn = jnn.BatchNorm(use_running_average=False)
  x = fc.data()
  v = bn.init(KEY, x)
  v = {**v, "batch_stats": {"mean": jnp.full((6,), 0.5), "var": jnp.full((6,), 2.0)}}
  y, upd = bn.apply(v, x, mask=jnp.zeros(x.shape, bool), mutable=["batch_stats"])
  fc.assert_trees_identical(upd["batch_stats"], v["batch_stats"])
  assert np.isfinite(np.asarray(y)).all()


def test_masked_positions_may_hold_nan():
  bn = jnn.BatchNorm(use_running_average=False)
  x, m = fc.data(), fc.mask()
  v = bn.init(KEY, x)
  _, clean = bn.apply(v, jnp.where(m, x, 0.0), mask=m, mutable=["batch_stats"])
  _, poisoned = bn.apply(v, jnp.where(m, x, jnp.nan), mask=m, mutable=["batch_stats"])
  fc.assert_trees_identical(poisoned, clean)


def test_momentum_none_is_the_cumulative_average_with_a_count():
  bn = jnn.BatchNorm(use_running_average=False, momentum=None)
  xs = [fc.data(seed=s, offset=s) for s in range(3)]
  v = bn.init(KEY, xs[0])
  assert v["batch_stats"]["count"].dtype == jnp.int32 and v["batch_stats"]["count"] == 0
  for x in xs:
    _, upd = bn.apply(v, x, mutable=["batch_stats"])
    v = {**v, **upd}
  stats = [refs.ref_moments(x, (0, 1)) for x in xs]
  mean_err = refs.cumulative_average_error([s[1] for s in stats],
                                           [refs.mean_error(x, (0, 1)) for x in xs])
  var_err = refs.cumulative_average_error([s[2] for s in stats],
                                          [refs.var_error(x, (0, 1)) for x in xs])
  refs.assert_within(v["batch_stats"]["mean"], np.mean([s[1] for s in stats], 0), mean_err)
  refs.assert_within(v["batch_stats"]["var"], np.mean([s[2] for s in stats], 0), var_err)
  assert int(v["batch_stats"]["count"]) == 3


def test_default_momentum_keeps_flax_variable_tree():
  x = fc.data()
  v = jnn.BatchNorm(use_running_average=False).init(KEY, x)
  assert set(v["batch_stats"]) == {"mean", "var"}


def test_unbiased_running_var_stores_bessel_corrected_variance():
  bn = jnn.BatchNorm(use_running_average=False, momentum=0.0, unbiased_running_var=True)
  x = fc.data()
  v = bn.init(KEY, x)
  y, upd = bn.apply(v, x, mutable=["batch_stats"])
  n = x.shape[0] * x.shape[1]
  # The Bessel factor n / (n - 1) adds a product and a division (2u).
  var = np.var(refs.f64(x), (0, 1))
  bessel_err = (refs.var_error(x, (0, 1)) + 2 * refs.U32 * var) * n / (n - 1)
  refs.assert_within(upd["batch_stats"]["var"], var * n / (n - 1), bessel_err)
  y_biased, _ = jnn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(y, y_biased)  # normalization uses the biased variance


def test_update_stats_false_trains_without_a_mutable_collection():
  x = fc.data()
  bn = jnn.BatchNorm(use_running_average=False)
  v = bn.init(KEY, x)
  with pytest.raises(Exception, match=r"immutable|batch_stats"):
    bn.apply(v, x)  # as in flax
  y = bn.apply(v, x, update_stats=False)
  y_ref, _ = bn.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(y, y_ref)
  y2, upd = jnn.BatchNorm(use_running_average=False, update_stats=False).apply(
      v, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(y2, y_ref)
  fc.assert_trees_identical(upd["batch_stats"], v["batch_stats"])


def test_train_step_under_jit_does_not_retrace():
  bn = jnn.BatchNorm(use_running_average=False)
  x = fc.data()
  v = bn.init(KEY, x)
  traces = []

  @jax.jit
  def step(v, x):
    traces.append(1)
    y, upd = bn.apply(v, x, mutable=["batch_stats"])
    return {**v, **upd}, y

  for s in range(3):
    v, _ = step(v, fc.data(seed=s))
  assert len(traces) == 1


def test_integer_input_follows_flax():
  x = jnp.arange(24, dtype=jnp.int32).reshape(4, 6) % 7
  theirs, ours = _pair("LayerNorm")
  with fc.standard_promotion():
    v = theirs.init(KEY, x)
    y_t = theirs.apply(v, x)
  fc.assert_close(ours.apply(v, x), y_t)


def test_momentum_one_freezes_batch_stats_as_flax_does():
  """momentum=1.0 (frozen running statistics, e.g. for fine-tuning) is accepted, as flax does."""
  theirs, ours = _pair("BatchNorm", momentum=1.0)
  x, x2 = fc.data(), fc.data(seed=5, offset=-0.3)
  with fc.standard_promotion():
    v = theirs.init(KEY, x, use_running_average=False)
    y_t, upd_t = theirs.apply(v, x2, use_running_average=False, mutable=["batch_stats"])
  y_o, upd_o = ours.apply(v, x2, use_running_average=False, mutable=["batch_stats"])
  fc.assert_trees_identical(upd_o, upd_t)
  fc.assert_trees_identical(upd_o["batch_stats"], v["batch_stats"])
  fc.assert_close(y_o, y_t)


def test_per_feature_count_keeps_hidden_features_out_of_the_cumulative_average():
  """momentum=None, feature 1 hidden by the mask in the first batch: its average is the
  second batch's (mean 30, variance 100), not mixed with the initial 0 and 1."""
  bn = jnn.BatchNorm(use_running_average=False, momentum=None, per_feature_count=True)
  x1, m1 = jnp.float32([[1.0, 7.0], [3.0, 7.0]]), jnp.asarray([[True, False]] * 2)
  x2 = jnp.float32([[20.0, 20.0], [40.0, 40.0]])
  v = bn.init(KEY, x1)
  assert v["batch_stats"]["count"].shape == (2,)
  _, upd = bn.apply(v, x1, mask=m1, mutable=["batch_stats"])
  _, upd = bn.apply({**v, **upd}, x2, mutable=["batch_stats"])
  np.testing.assert_array_equal(upd["batch_stats"]["mean"], [16.0, 30.0])
  np.testing.assert_array_equal(upd["batch_stats"]["var"], [50.5, 100.0])
  np.testing.assert_array_equal(upd["batch_stats"]["count"], [2, 1])
