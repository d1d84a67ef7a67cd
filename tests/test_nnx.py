"""jaxnorm.nnx against flax.nnx itself: state, outputs, statistics, mode switching, extras."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import nnx as jnnx
from tests import flax_cases as fc
from tests import jaxcompat, refs

DTYPES = (jnp.float32, jnp.bfloat16)


def _pair(name, seed=0, **kw):
  kw = {**fc.KWARGS[name], **kw}
  theirs = getattr(nnx, name)(fc.CHANNELS, use_fast_variance=False, rngs=nnx.Rngs(seed), **kw)
  ours = getattr(jnnx, name)(fc.CHANNELS, rngs=nnx.Rngs(seed), **kw)
  return theirs, ours


def _run_flax(module, *args, **kw):
  with fc.standard_promotion():
    return module(*args, **kw)


@pytest.mark.parametrize("name", fc.NNX_NAMES)
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_flax_train_and_eval(name, x_dtype, param_dtype, masked):
  theirs, ours = _pair(name, param_dtype=param_dtype)
  fc.assert_trees_identical(nnx.state(ours), nnx.state(theirs))
  x, x2 = fc.data(x_dtype), fc.data(x_dtype, seed=5, offset=-0.3)
  m = fc.mask() if masked else None
  fc.assert_close(ours(x, mask=m), _run_flax(theirs, x, mask=m))  # BatchNorm: training
  fc.assert_trees_close(nnx.state(ours), nnx.state(theirs))
  theirs.eval()
  ours.eval()
  fc.assert_close(ours(x2), _run_flax(theirs, x2))


@pytest.mark.parametrize("name", fc.NNX_NAMES)
@pytest.mark.parametrize("x_dtype,dtype", [(jnp.float32, jnp.bfloat16),
                                           (jnp.bfloat16, jnp.float32)])
def test_matches_flax_with_dtype_argument(name, x_dtype, dtype):
  theirs, ours = _pair(name, dtype=dtype)
  state = nnx.to_pure_dict(nnx.state(ours))
  x = fc.data(x_dtype)
  y = ours(x)
  assert y.dtype == dtype
  with fc.standard_promotion():
    holds_x = jnp.promote_types(x_dtype, dtype) == dtype
  if holds_x:  # dtype holds every value of x: flax.nnx computes as we do
    fc.assert_close(y, _run_flax(theirs, x))
    fc.assert_trees_close(nnx.state(ours), nnx.state(theirs))
    return
  # A narrower dtype is the output's dtype only (the module docstring): flax.linen's rule,
  # where flax.nnx rounds x and the parameters to dtype first.
  linen = getattr(nn, name)(dtype=dtype, use_fast_variance=False, **fc.KWARGS[name])
  variables = {"params": {k: v for k, v in state.items() if k in ("scale", "bias")}}
  call = {}
  if name == "BatchNorm":
    variables["batch_stats"] = {"mean": state["mean"], "var": state["var"]}
    call = {"use_running_average": False}
  with fc.standard_promotion():
    y_linen, upd = linen.apply(variables, x, mutable=["batch_stats"], **call)
  fc.assert_close(y, y_linen)
  if name == "BatchNorm":
    fc.assert_trees_close((ours.mean[...], ours.var[...]),
                          (upd["batch_stats"]["mean"], upd["batch_stats"]["var"]))


def test_layer_norm_with_several_feature_axes_matches_flax():
  x = fc.data(shape=(4, 3, 5, 6))
  kw = dict(reduction_axes=(1, 2, 3), feature_axes=(-2, -1), **fc.KWARGS["LayerNorm"])
  theirs = nnx.LayerNorm(30, use_fast_variance=False, rngs=nnx.Rngs(0), **kw)
  ours = jnnx.LayerNorm(30, rngs=nnx.Rngs(0), **kw)
  fc.assert_close(ours(x), _run_flax(theirs, x))


# --- a whole model: flax's state loads into the model built with ours ------------------------

class _Net(nnx.Module):
  def __init__(self, ns, rngs):
    kw = dict(use_fast_variance=False) if ns is nnx else {}  # flax's stable variance
    init = nnx.initializers.normal(0.5)
    self.lin1 = nnx.Linear(3, 8, kernel_init=init, rngs=rngs)
    self.inorm = ns.InstanceNorm(8, rngs=rngs, **kw)
    self.lin2 = nnx.Linear(8, 8, kernel_init=init, rngs=rngs)
    self.bn = ns.BatchNorm(8, momentum=0.9, rngs=rngs, **kw)
    self.gn = ns.GroupNorm(8, num_groups=4, rngs=rngs, **kw)
    self.lin3 = nnx.Linear(8, 8, kernel_init=init, rngs=rngs)
    self.ln = ns.LayerNorm(8, rngs=rngs, **kw)
    self.lin4 = nnx.Linear(8, 8, kernel_init=init, rngs=rngs)
    self.rms = ns.RMSNorm(8, rngs=rngs, **kw)
    self.out = nnx.Linear(8, 3, kernel_init=init, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.lin2(nnx.relu(self.inorm(self.lin1(x)))))
    x = nnx.relu(self.gn(nnx.relu(self.bn(x))))
    x = self.ln(self.lin3(x.mean((1, 2))))
    return self.out(self.rms(self.lin4(nnx.relu(x))))


@nnx.jit
def _forward(model, x):
  return model(x)


@jaxcompat.NEEDS_FLAX_INSTANCE_NORM  # the model has one
def test_flax_model_state_loads_into_ours():
  x = fc.data(shape=(6, 7, 7, 3))
  theirs = _Net(nnx, nnx.Rngs(0))
  ours = _Net(jnnx, nnx.Rngs(1))  # other weights, then flax's state
  nnx.update(ours, nnx.state(theirs))
  fc.assert_trees_identical(nnx.state(ours), nnx.state(theirs))
  with fc.standard_promotion():
    y_t = _forward(theirs, x)
  fc.assert_close(_forward(ours, x), y_t)
  fc.assert_trees_close(nnx.state(ours), nnx.state(theirs))
  theirs.eval()
  ours.eval()
  with fc.standard_promotion():
    e_t = _forward(theirs, x)
  fc.assert_close(_forward(ours, x), e_t)


# --- mode switching and nnx.jit --------------------------------------------------------------

def test_train_eval_view_and_call_argument():
  x = fc.data()
  bn = jnnx.BatchNorm(fc.CHANNELS, rngs=nnx.Rngs(0))
  assert bn.use_running_average is False
  before = nnx.clone(nnx.state(bn, nnx.BatchStat))
  bn.eval()
  assert bn.use_running_average is True
  bn(x)
  fc.assert_trees_identical(nnx.state(bn, nnx.BatchStat), before)
  bn(x, use_running_average=False)  # the call argument takes precedence
  assert not np.array_equal(bn.mean[...], before["mean"][...])
  bn.train()
  assert bn.use_running_average is False
  no_mode = jnnx.BatchNorm(fc.CHANNELS, use_running_average=None, rngs=nnx.Rngs(0))
  switch = r"nnx\.view" if jaxcompat.flax_at_least("0.12.4") else r"model\.eval\(\)"
  with pytest.raises(ValueError, match=f"use_running_average.*{switch}"):
    no_mode(x)


@jaxcompat.NEEDS_FLAX_VIEW
def test_view_sets_the_mode_of_a_copy():
  bn = jnnx.BatchNorm(fc.CHANNELS, rngs=nnx.Rngs(0))
  view = nnx.view(bn, use_running_average=True)
  assert view.use_running_average is True and bn.use_running_average is False


def test_training_updates_inside_nnx_jit_without_retracing():
  bn = jnnx.BatchNorm(fc.CHANNELS, rngs=nnx.Rngs(0))
  ref = nnx.BatchNorm(fc.CHANNELS, use_fast_variance=False, rngs=nnx.Rngs(0))
  traces = []

  @nnx.jit
  def step(model, x):
    traces.append(1)
    return model(x)

  for s in range(3):
    x = fc.data(seed=s)
    step(bn, x)
    _run_flax(ref, x)
  assert len(traces) == 1
  fc.assert_trees_close(nnx.state(bn), nnx.state(ref))


# --- where jaxnorm is better -----------------------------------------------------------------

def test_group_norm_with_custom_reduction_axes_is_correct():
  x = fc.data(shape=(4, 3, 5, 6))
  ours = jnnx.GroupNorm(6, num_groups=3, reduction_axes=(2, 3), rngs=nnx.Rngs(0))
  theirs = nnx.GroupNorm(6, num_groups=3, reduction_axes=(2, 3), use_fast_variance=False,
                         rngs=nnx.Rngs(0))
  linen = nn.GroupNorm(num_groups=3, reduction_axes=(2, 3), use_fast_variance=False)
  with fc.standard_promotion():
    v = linen.init(jax.random.key(0), x)
    y_linen = linen.apply(v, x)
    y_nnx = theirs(x)
  fc.assert_close(ours(x), y_linen)
  assert np.abs(np.asarray(y_nnx) - np.asarray(y_linen)).max() > 0.5  # flax.nnx's defect


def test_eval_in_bfloat16_uses_float32_running_statistics():
  kw = dict(dtype=jnp.bfloat16, momentum=0.0, rngs=nnx.Rngs(0))
  bn, theirs = jnnx.BatchNorm(fc.CHANNELS, **kw), nnx.BatchNorm(fc.CHANNELS, **kw)
  x = fc.data(offset=30.0)
  bn(x)
  _run_flax(theirs, x)
  bn.eval()
  theirs.eval()
  ref = refs.ref_normalize(x, bn.mean[...], bn.var[...], None, None, (0, 1), -1, 1e-5)
  # ours: the float32 input (dtype is the output's dtype only), given statistics, float32
  # arithmetic, one bfloat16 rounding of the output; flax: x rounded to bfloat16 and
  # x - mean in bfloat16 (ulp 0.125 at 30), far outside that bound.
  bound = refs.output_error(x, bn.mean[...], bn.var[...], 0.0, 0.0, None,
                            ref, (0, 1), -1, 1e-5, out_dtype=jnp.bfloat16)
  refs.assert_within(bn(x).astype(jnp.float32), ref, bound, "ours")
  y_flax = _run_flax(theirs, x)
  if jaxcompat.FLAX_NNX_ROUNDS_INPUT:
    assert (np.abs(np.asarray(y_flax, np.float64) - ref) > bound).any()
  else:  # flax 0.11's nnx rounds only the output, as jaxnorm.nnx
    refs.assert_within(y_flax.astype(jnp.float32), ref, bound, "flax 0.11 nnx")


def test_offset_1e4_input_is_exact():
  x = fc.data(offset=1e4, shape=(16, 64))
  y = jnnx.LayerNorm(64, rngs=nnx.Rngs(0))(x)
  with fc.standard_promotion():
    y_flax = nnx.LayerNorm(64, rngs=nnx.Rngs(0))(x)
  ref = refs.ref_layer_norm(x)
  bound = refs.norm_bound(x, ref)
  refs.assert_within(y, ref, bound, "ours")
  assert (np.abs(np.asarray(y_flax, np.float64) - ref) > bound).any()  # E[x²] - E[x]²


def _vmapped(model, x, m):
  graphdef, state = nnx.split(model)

  def step(state, xi, mi):
    module = nnx.merge(graphdef, state)
    return module(xi, mask=mi), nnx.state(module)

  return jax.vmap(step, in_axes=(None, 0, 0), axis_name="d")(state, x, m)


def test_uneven_masks_across_vmapped_devices_match_the_concatenated_batch():
  x, m = fc.uneven()
  bn = jnnx.BatchNorm(3, momentum=0.0, axis_name="d", rngs=nnx.Rngs(0))
  y, state = _vmapped(bn, x, m)
  one = jnnx.BatchNorm(3, momentum=0.0, rngs=nnx.Rngs(0))
  y_one = one(x.reshape(-1, 3), mask=m.reshape(-1, 1))
  full_mask = np.broadcast_to(np.asarray(m), x.shape)
  flat_x, flat_m = np.asarray(x).reshape(-1, 3), full_mask.reshape(-1, 3)
  _, mean, var = refs.ref_moments(flat_x, 0, flat_m)
  mean_err, var_err = refs.mean_error(flat_x, 0, flat_m), refs.var_error(flat_x, 0, flat_m)
  for i in range(x.shape[0]):
    refs.assert_within(state["mean"][...][i], mean, mean_err, "mean")
    refs.assert_within(state["var"][...][i], var, var_err, "var")
  ref_y = refs.ref_batch_norm_train(flat_x, mask=flat_m)[0]
  bound = refs.norm_bound(flat_x, ref_y, None, 0, -1, 1e-5, flat_m).reshape(x.shape)
  refs.assert_within(np.asarray(y)[full_mask], np.asarray(y_one).reshape(x.shape)[full_mask],
                     2 * bound[full_mask], "y")
  with fc.standard_promotion():
    _, state_flax = _vmapped(nnx.BatchNorm(3, momentum=0.0, axis_name="d", rngs=nnx.Rngs(0)),
                             x, m)
  assert (np.abs(np.asarray(state_flax["mean"][...][0]) - mean) > mean_err).any()  # of means


# --- extras flax lacks -----------------------------------------------------------------------

def test_fully_masked_batch_leaves_batch_stats_unchanged():
  bn = jnnx.BatchNorm(fc.CHANNELS, rngs=nnx.Rngs(0))
  x = fc.data()
  bn(x)
  before = nnx.clone(nnx.state(bn))
  y = bn(x, mask=jnp.zeros(x.shape, bool))
  fc.assert_trees_identical(nnx.state(bn), before)
  assert np.isfinite(np.asarray(y)).all()


def test_momentum_none_adds_a_count_and_averages_exactly():
  bn = jnnx.BatchNorm(fc.CHANNELS, momentum=None, rngs=nnx.Rngs(0))
  assert set(nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat))) == {"mean", "var", "count"}
  xs = [fc.data(seed=s, offset=s) for s in range(3)]
  for x in xs:
    bn(x)
  stats = [refs.ref_moments(x, (0, 1)) for x in xs]
  mean_err = refs.cumulative_average_error([s[1] for s in stats],
                                           [refs.mean_error(x, (0, 1)) for x in xs])
  var_err = refs.cumulative_average_error([s[2] for s in stats],
                                          [refs.var_error(x, (0, 1)) for x in xs])
  refs.assert_within(bn.mean[...], np.mean([s[1] for s in stats], 0), mean_err, "mean")
  refs.assert_within(bn.var[...], np.mean([s[2] for s in stats], 0), var_err, "var")
  assert bn.count[...].dtype == jnp.int32 and int(bn.count[...]) == 3
  default = jnnx.BatchNorm(fc.CHANNELS, rngs=nnx.Rngs(0))
  assert set(nnx.to_pure_dict(nnx.state(default))) == {"mean", "var", "scale", "bias"}


def test_unbiased_running_var_and_update_stats_false():
  x = fc.data()
  bn = jnnx.BatchNorm(fc.CHANNELS, momentum=0.0, unbiased_running_var=True, rngs=nnx.Rngs(0))
  y = bn(x)
  n = x.shape[0] * x.shape[1]
  var = np.var(refs.f64(x), (0, 1))
  bessel_err = (refs.var_error(x, (0, 1)) + 2 * refs.U32 * var) * n / (n - 1)
  refs.assert_within(bn.var[...], var * n / (n - 1), bessel_err, "var")
  frozen = jnnx.BatchNorm(fc.CHANNELS, update_stats=False, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(frozen(x), y)  # batch statistics, biased variance
  np.testing.assert_array_equal(frozen.mean[...], np.zeros(fc.CHANNELS))
  frozen(x, update_stats=True)
  assert not np.array_equal(frozen.mean[...], np.zeros(fc.CHANNELS))


def test_batch_norm_with_several_feature_axes_works_where_flax_nnx_does_not():
  x = fc.data(shape=(4, 3, 5))
  ours = jnnx.BatchNorm(15, axis=(1, 2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError):  # flax.nnx 0.12 cannot broadcast its (15,) statistics
    _run_flax(nnx.BatchNorm(15, axis=(1, 2), rngs=nnx.Rngs(0)), x)
  linen = nn.BatchNorm(axis=(1, 2), use_running_average=False, use_fast_variance=False)
  with fc.standard_promotion():
    v = linen.init(jax.random.key(0), x)
    y_linen, upd = linen.apply(v, x, mutable=["batch_stats"])
  fc.assert_close(ours(x), y_linen)
  fc.assert_close(ours.mean[...], upd["batch_stats"]["mean"].reshape(15))
  fc.assert_close(ours.var[...], upd["batch_stats"]["var"].reshape(15))


@jaxcompat.NEEDS_FLAX_VIEW
def test_view_can_turn_statistics_updates_off():
  bn = jnnx.BatchNorm(fc.CHANNELS, rngs=nnx.Rngs(0))
  frozen = nnx.view(bn, update_stats=False)
  frozen(fc.data())
  np.testing.assert_array_equal(bn.mean[...], np.zeros(fc.CHANNELS))
  bn(fc.data())
  assert not np.array_equal(bn.mean[...], np.zeros(fc.CHANNELS))


def test_momentum_one_freezes_batch_stats_as_flax_does():
  """momentum=1.0 (frozen running statistics, e.g. for fine-tuning) is accepted, as flax does."""
  x = fc.data(seed=5, offset=-0.3)
  ours = jnnx.BatchNorm(fc.CHANNELS, momentum=1.0, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(fc.CHANNELS, momentum=1.0, rngs=nnx.Rngs(0))
  before = nnx.clone(nnx.state(theirs, nnx.BatchStat))
  fc.assert_close(ours(x), _run_flax(theirs, x))
  fc.assert_trees_identical(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))
  fc.assert_trees_identical(nnx.state(ours, nnx.BatchStat), before)


def test_per_feature_count_keeps_hidden_features_out_of_the_cumulative_average():
  """momentum=None, feature 1 hidden by the mask in the first batch: its average is the
  second batch's (mean 30, variance 100), not mixed with the initial 0 and 1."""
  bn = jnnx.BatchNorm(2, momentum=None, per_feature_count=True, rngs=nnx.Rngs(0))
  bn(jnp.float32([[1.0, 7.0], [3.0, 7.0]]), mask=jnp.asarray([[True, False]] * 2))
  bn(jnp.float32([[20.0, 20.0], [40.0, 40.0]]))
  np.testing.assert_array_equal(bn.mean[...], [16.0, 30.0])
  np.testing.assert_array_equal(bn.var[...], [50.5, 100.0])
  np.testing.assert_array_equal(bn.count[...], [2, 1])
