"""The wrappers' constructors are flax's; the two wrapper families agree bitwise; checkpoints
round-trip; the flax import is optional."""

import inspect
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx
from tests import flax_cases as fc
from tests import jaxcompat, refs

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = (jnp.float32, jnp.bfloat16)


def _assert_bitwise(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))


# --- constructors -----------------------------------------------------------------------------

# jaxnorm's constructor arguments beyond flax's, with their defaults, in order: each class's
# docstring documents them, and they come after all of flax's.
EXTRAS = {
    "BatchNorm": {"unbiased_running_var": False, "update_stats": True, "renorm": False,
                  "virtual_batch_size": None, "per_feature_count": False},
    "LayerNorm": {"zero_centered_scale": False, "implementation": None},
    "RMSNorm": {"zero_centered_scale": False, "implementation": None, "convention": None},
    "GroupNorm": {},
    "InstanceNorm": {},
}
# A value other than the default for each extra, to check that the constructor takes it.
_EXTRA_VALUES = {"unbiased_running_var": True, "update_stats": False, "renorm": True,
                 "virtual_batch_size": 2, "zero_centered_scale": True, "implementation": "xla",
                 "per_feature_count": True, "convention": "gemma"}


def _parameters(cls_or_init):
  return [(p.name, p.kind, p.default) for p in
          inspect.signature(cls_or_init).parameters.values()]


@pytest.mark.parametrize("name", fc.NAMES)
@pytest.mark.parametrize("family", ["linen", "nnx"])
def test_constructor_is_flax_s_then_jaxnorm_s_documented_extras(family, name):
  if family == "linen":  # a dataclass: flax's fields, ours, then linen's parent and name
    ours, theirs = getattr(jnn, name), getattr(nn, name)
    got, flax_params = _parameters(ours), _parameters(theirs)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    extras = [(k, kind, v) for k, v in EXTRAS[name].items()]
    expected = flax_params[:-2] + extras + flax_params[-2:]
  else:
    if name == "InstanceNorm" and not hasattr(nnx, "InstanceNorm"):
      pytest.skip(jaxcompat.NEEDS_FLAX_INSTANCE_NORM.kwargs["reason"])
    ours, theirs = getattr(jnnx, name), getattr(nnx, name)
    kind = inspect.Parameter.KEYWORD_ONLY
    extras = [(k, kind, v) for k, v in EXTRAS[name].items()]
    got, expected = _parameters(ours.__init__), _parameters(theirs.__init__) + extras
  assert [p[:2] for p in got] == [p[:2] for p in expected]
  for (n, _, d), (_, _, d_flax) in zip(got, expected, strict=True):
    assert d is d_flax or d == d_flax, (n, d, d_flax)
  for extra in EXTRAS[name]:
    assert f"{extra}:" in ours.__doc__, f"{name}'s docstring does not document {extra}"
  # The signature is what the constructor accepts: flax's arguments reach flax's attributes,
  # and each extra is kept.
  kw = {"epsilon": 0.25, **{k: _EXTRA_VALUES[k] for k in EXTRAS[name]}}
  if family == "linen":
    layer = ours(**kw)
  else:
    layer = ours(*((fc.CHANNELS, 3) if name == "GroupNorm" else (fc.CHANNELS,)),
                 rngs=nnx.Rngs(0), **kw)
    if name == "GroupNorm":  # flax.nnx keeps the groups, not num_features
      assert (layer.num_groups, layer.group_size) == (3, fc.CHANNELS // 3)
    else:
      assert layer.num_features == fc.CHANNELS
  assert isinstance(layer, theirs)
  for k, v in kw.items():
    assert getattr(layer, k) == v, k


# (input shape, dtype, mask) of the product: the shared 3-d data with flax's default dtype, and
# rank-2 input with a dtype narrower than float32 and a mask over the features.
LAYOUTS = {"rank_3": (fc.SHAPE, None, fc.mask), "rank_2_float16": ((10, 6), jnp.float16,
                                                                   lambda: MASK_2D)}
MASK_2D = jnp.asarray(np.array([True, False] * 3))


@pytest.mark.parametrize("name", fc.NNX_NAMES)
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linen_and_nnx_agree_bitwise(name, x_dtype, param_dtype, masked, layout):
  shape, dtype, make_mask = LAYOUTS[layout]
  if dtype == jnp.float16 and not refs.float16_compiles():
    pytest.skip("XLA:CPU compiles no float16 code without F16C (see tests/refs.py)")
  kw = {**fc.KWARGS[name], "param_dtype": param_dtype}
  if dtype is not None:
    kw["dtype"] = dtype
  mod_nnx = getattr(jnnx, name)(fc.CHANNELS, rngs=nnx.Rngs(0), **kw)
  mod_linen = getattr(jnn, name)(**kw)
  state = nnx.to_pure_dict(nnx.state(mod_nnx))
  params = {k: v for k, v in state.items() if k in ("scale", "bias")}
  variables = {"params": params}
  call = {}
  if name == "BatchNorm":
    variables["batch_stats"] = {"mean": state["mean"], "var": state["var"]}
    call = {"use_running_average": False}
  x, m = fc.data(x_dtype, shape=shape), (make_mask() if masked else None)
  y_linen, upd = mod_linen.apply(variables, x, mask=m, mutable=["batch_stats"], **call)
  y_nnx = mod_nnx(x, mask=m)
  # flax.nnx promotes bfloat16 input with the float32 running statistics; linen does not.
  _assert_bitwise(y_nnx.astype(y_linen.dtype), y_linen)
  if name == "BatchNorm":
    _assert_bitwise(mod_nnx.mean[...], upd["batch_stats"]["mean"])
    _assert_bitwise(mod_nnx.var[...], upd["batch_stats"]["var"])
    mod_nnx.eval()
    e_linen = mod_linen.apply({**variables, **upd}, x, use_running_average=True)
    _assert_bitwise(mod_nnx(x).astype(e_linen.dtype), e_linen)


@pytest.mark.skipif(not refs.float16_compiles(),
                    reason="XLA:CPU compiles no float16 code without F16C (see tests/refs.py)")
@pytest.mark.parametrize("name", fc.NNX_NAMES)
def test_dtype_narrower_than_input_is_the_output_dtype_only(name):
  """`dtype=float16` on float32 input of rank 2, masked, for every layer.

  jaxnorm.linen is flax.linen bit for bit (where flax is finite). flax.nnx casts `x` and the
  parameters to float16 before it normalizes; jaxnorm.nnx does not (it is jaxnorm.linen, see
  the product above), so it differs from flax.nnx exactly by that rounding: flax.nnx is
  jaxnorm.nnx on the rounded input and parameters.
  """
  kw = {**fc.KWARGS[name], "dtype": jnp.float16}
  x = fc.data(shape=(10, 6))
  m = MASK_2D
  mod_nnx = getattr(jnnx, name)(fc.CHANNELS, rngs=nnx.Rngs(0), **kw)
  mod_linen = getattr(jnn, name)(**kw)
  flax_nnx = getattr(nnx, name)(fc.CHANNELS, rngs=nnx.Rngs(0), **kw)
  flax_linen = getattr(nn, name)(**kw)
  state = nnx.to_pure_dict(nnx.state(mod_nnx))
  variables = {"params": {k: v for k, v in state.items() if k in ("scale", "bias")}}
  call = {}
  if name == "BatchNorm":
    variables["batch_stats"] = {"mean": state["mean"], "var": state["var"]}
    call = {"use_running_average": False}

  def linen(mod, x, variables=variables):
    return mod.apply(variables, x, mask=m, mutable=["batch_stats"], **call)[0]

  y_nnx = mod_nnx(x, mask=m)
  cast = {**variables, "params": jax.tree.map(lambda p: p.astype(jnp.float16),
                                              variables["params"])}
  y_rounded = linen(mod_linen, x.astype(jnp.float16), cast)
  with fc.standard_promotion():
    y_flax_nnx, y_flax_linen = flax_nnx(x, mask=m), linen(flax_linen, x)
  # flax.nnx (0.12) is jaxnorm.nnx on the rounded input; flax 0.11's nnx rounds nothing before
  # it normalizes, as jaxnorm.nnx: with it, it is jaxnorm.nnx's result.
  nnx_twin = y_rounded if jaxcompat.FLAX_NNX_ROUNDS_INPUT else y_nnx
  # flax gives NaN where a masked reduction has no valid element; jaxnorm stays finite there.
  for ours, theirs in ((linen(mod_linen, x), y_flax_linen), (nnx_twin, y_flax_nnx)):
    finite = np.isfinite(np.asarray(theirs, np.float32))
    assert finite.any() and np.isfinite(np.asarray(ours, np.float32)).all()
    _assert_bitwise(np.asarray(ours)[finite], np.asarray(theirs)[finite])
  assert not np.array_equal(np.asarray(y_nnx), np.asarray(y_rounded))  # the rounding shows


def test_nnx_float16_output_of_offset_data_is_exact_where_flax_nnx_is_not():
  """LayerNorm, `dtype=float16`, float32 input of mean 300, std 1.5: flax.nnx rounds `x` to
  float16 first (spacing 0.25 at 300), so `x - mean` keeps about 3 bits; jaxnorm.nnx
  normalizes the float32 input and rounds once."""
  if not refs.float16_compiles():
    pytest.skip("XLA:CPU compiles no float16 code without F16C (see tests/refs.py)")
  x = fc.data(shape=(16, 64), offset=300.0)
  ours = jnnx.LayerNorm(64, dtype=jnp.float16, rngs=nnx.Rngs(0))
  theirs = nnx.LayerNorm(64, dtype=jnp.float16, use_fast_variance=False, rngs=nnx.Rngs(0))
  ref = refs.ref_layer_norm(x)
  y = ours(x)
  assert y.dtype == jnp.float16
  bound = refs.norm_bound(x, ref, out_dtype=np.float16)
  refs.assert_within(y, ref, bound, "jaxnorm.nnx")
  with fc.standard_promotion():
    y_theirs = theirs(x)
  if jaxcompat.FLAX_NNX_ROUNDS_INPUT:
    err_theirs = np.abs(refs.f64(y_theirs) - ref).max()
    assert err_theirs > 0.05, err_theirs  # flax.nnx's input rounding: about 0.1 of a std
  else:  # flax 0.11's nnx rounds only the output, as jaxnorm.nnx
    refs.assert_within(y_theirs, ref, bound, "flax 0.11 nnx")


# --- checkpoints -----------------------------------------------------------------------------

class _Net(nn.Module):
  momentum: float | None = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = jnn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
    x = jnn.LayerNorm()(nn.relu(x))
    return nn.Dense(3)(x)


def _trainer(model, tx):
  @jax.jit
  def step(state, x, y):
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "batch_stats": upd["batch_stats"], "opt_state": opt_state}

  return step


@pytest.mark.parametrize("momentum", [0.9, None])
def test_orbax_checkpoint_round_trips_bitwise_and_resumes_identically(tmp_path, momentum):
  model, tx = _Net(momentum), optax.adam(1e-2)
  with fc.standard_promotion():  # optax.adam mixes int and float scalars
    _train_save_restore_resume(model, tx, tmp_path, momentum)


def _train_save_restore_resume(model, tx, tmp_path, momentum):
  rs = np.random.RandomState(0)
  batches = [(jnp.asarray(rs.randn(32, 5).astype(np.float32) + 3.0),
              jnp.asarray(rs.randint(0, 3, 32))) for _ in range(6)]
  variables = model.init(jax.random.key(0), batches[0][0], train=False)
  state = {**variables, "opt_state": tx.init(variables["params"])}
  step = _trainer(model, tx)
  for x, y in batches[:3]:
    state = step(state, x, y)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  fc.assert_trees_identical(restored, state)
  if momentum is None:
    assert restored["batch_stats"]["BatchNorm_0"]["count"].dtype == jnp.int32
    assert int(restored["batch_stats"]["BatchNorm_0"]["count"]) == 3

  for x, y in batches[3:]:
    state = step(state, x, y)
    restored = step(restored, x, y)
  fc.assert_trees_identical(restored, state)
  x = batches[0][0]
  eval_vars = lambda s: {"params": s["params"], "batch_stats": s["batch_stats"]}
  _assert_bitwise(model.apply(eval_vars(restored), x, train=False),
                  model.apply(eval_vars(state), x, train=False))


def test_orbax_checkpoint_of_nnx_state_round_trips_bitwise(tmp_path):
  model = jnnx.BatchNorm(4, momentum=None, rngs=nnx.Rngs(0))
  x = fc.data(shape=(16, 4), offset=2.0)

  @nnx.jit
  def step(model, x):
    return model(x)

  step(model, x)
  state = nnx.state(model)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "nnx", nnx.to_pure_dict(state))
  checkpointer.wait_until_finished()
  fresh = jnnx.BatchNorm(4, momentum=None, rngs=nnx.Rngs(1))
  restored = checkpointer.restore(tmp_path / "nnx", nnx.to_pure_dict(nnx.state(fresh)))
  nnx.replace_by_pure_dict(state_fresh := nnx.state(fresh), restored)
  nnx.update(fresh, state_fresh)
  fc.assert_trees_identical(nnx.state(fresh), nnx.state(model))
  for s in range(2):
    xs = fc.data(shape=(16, 4), seed=s)
    _assert_bitwise(step(fresh, xs), step(model, xs))
  fc.assert_trees_identical(nnx.state(fresh), nnx.state(model))


# --- the flax dependency is optional ---------------------------------------------------------

def test_jaxnorm_imports_without_flax_and_the_wrappers_say_how_to_install_it():
  code = """
import sys
import jaxnorm
assert not any(m.split('.')[0] == 'flax' for m in sys.modules), 'import jaxnorm imported flax'
sys.modules['flax'] = None  # as if flax were not installed
for name in ('jaxnorm.linen', 'jaxnorm.nnx'):
  try:
    __import__(name)
  except ImportError as e:
    assert 'pip install -e ".[flax]"' in str(e), str(e)  # from a clone
    assert 'pip install "jaxnorm[flax]"' in str(e), str(e)  # from an index
    assert name in str(e), str(e)
  else:
    raise AssertionError(name + ' imported without flax')
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
