"""fold_batch_norm and linen.fold_batch_norms against a float64 reference of layer -> BatchNorm."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxnorm as jn
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx
from tests import jaxcompat
from tests.refs import U32, assert_within, f64

EPS32 = float(np.finfo(np.float32).eps)


def _data(kernel_shape, seed=0):
  rs = np.random.RandomState(seed)
  f = kernel_shape[-1]
  return {
      "kernel": rs.randn(*kernel_shape).astype(np.float32),
      "bias": rs.randn(f).astype(np.float32),
      "mean": (rs.randn(f) * 3).astype(np.float32),
      "var": (rs.rand(f) * 4 + 0.1).astype(np.float32),
      "scale": rs.randn(f).astype(np.float32),
      "offset": rs.randn(f).astype(np.float32),
  }


def _ref_fold(d, use, epsilon):
  """Folded kernel and bias in float64: s = γ / sqrt(σ² + ε), W s, (b - μ) s + β."""
  s = 1 / np.sqrt(f64(d["var"]) + epsilon)
  if use["scale"]:
    s = s * f64(d["scale"])
  b = -f64(d["mean"]) + (f64(d["bias"]) if use["bias"] else 0.0)
  b = b * s + (f64(d["offset"]) if use["offset"] else 0.0)
  return f64(d["kernel"]) * s, b


@pytest.mark.parametrize("use_bias,use_scale,use_offset",
                         list(itertools.product([True, False], repeat=3)))
def test_fold_matches_float64_reference_under_jit(use_bias, use_scale, use_offset):
  d = _data((3, 3, 4, 5))
  use = {"bias": use_bias, "scale": use_scale, "offset": use_offset}
  args = [d["kernel"], d["bias"] if use_bias else None, d["mean"], d["var"],
          d["scale"] if use_scale else None, d["offset"] if use_offset else None]
  names = ("kernel", "bias", "mean", "var", "scale", "offset")
  k, b = jax.jit(lambda *a: jn.fold_batch_norm(
      a[0], a[1], **dict(zip(names[2:], a[2:], strict=True)), epsilon=1e-3))(*args)
  rk, rb = _ref_fold(d, use, 1e-3)
  assert k.dtype == jnp.float32 and b.dtype == jnp.float32
  assert k.shape == (3, 3, 4, 5) and b.shape == (5,)
  # Each entry is a product / sum of a few float32-rounded factors: a few ulps of its terms.
  np.testing.assert_allclose(f64(k), rk, rtol=8 * EPS32, atol=0)
  terms = np.abs(f64(d["mean"])) + np.abs(f64(d["bias"])) * use_bias
  s = np.abs(rk[0, 0, 0] / f64(d["kernel"])[0, 0, 0])
  bound = 8 * EPS32 * (terms * s + np.abs(f64(d["offset"])) * use_offset)
  assert np.all(np.abs(f64(b) - rb) <= bound)


@pytest.mark.parametrize("kernel_shape,spatial", [((6, 5), 0), ((3, 4, 5), 1),
                                                  ((3, 3, 4, 5), 2), ((2, 2, 2, 3, 5), 3)])
def test_folded_layer_equals_layer_then_batch_norm(kernel_shape, spatial):
  """Dense and 1-, 2-, 3-d convolutions: the folded layer equals layer -> BatchNorm (eval)."""
  d = _data(kernel_shape, seed=1)
  rs = np.random.RandomState(2)
  x = rs.randn(2, *([6] * spatial), kernel_shape[-2]).astype(np.float32)
  dn = ("N" + "DHW"[3 - spatial:] + "C", "DHW"[3 - spatial:] + "IO",
        "N" + "DHW"[3 - spatial:] + "C") if spatial else None

  def layer(x, k, b):
    if not spatial:
      return x @ k + b
    return jax.lax.conv_general_dilated(x, k, (1,) * spatial, "SAME",
                                        dimension_numbers=dn) + b

  def original(x):
    z = layer(x, d["kernel"], d["bias"])
    state = jn.BatchNormState(jnp.asarray(d["mean"]), jnp.asarray(d["var"]),
                              jnp.zeros((), jnp.int32))
    return jn.batch_norm(z, state, d["scale"], d["offset"], training=False,
                         epsilon=1e-5)[0]

  def folded(x):
    k, b = jn.fold_batch_norm(d["kernel"], d["bias"], mean=d["mean"], var=d["var"],
                              scale=d["scale"], offset=d["offset"], epsilon=1e-5)
    return layer(x, k, b)

  y0, y1 = jax.jit(original)(x), jax.jit(folded)(x)
  # float64 reference of layer -> BN, and a bound from the magnitudes of the summed terms:
  # a float32 sum of n products is off by at most n·eps·Σ|terms| (here n <= 72).
  with jaxcompat.enable_x64(True):
    x64 = jnp.asarray(f64(x))
    ref = np.asarray(layer(x64, jnp.asarray(f64(d["kernel"])), f64(d["bias"])))
    mag = np.asarray(layer(jnp.abs(x64), jnp.abs(jnp.asarray(f64(d["kernel"]))), 0.0))
  s = f64(d["scale"]) / np.sqrt(f64(d["var"]) + 1e-5)
  ref = (ref - f64(d["mean"])) * s + f64(d["offset"])
  n = int(np.prod(kernel_shape[:-1]))
  bound = (n + 8) * EPS32 * ((mag + np.abs(f64(d["bias"])) + np.abs(f64(d["mean"])))
                             * np.abs(s) + np.abs(f64(d["offset"])))
  for y in (y0, y1):
    assert np.all(np.abs(f64(y) - ref) <= bound)


def test_fold_keeps_the_kernel_dtype():
  d = _data((4, 3))
  k, b = jn.fold_batch_norm(jnp.asarray(d["kernel"], jnp.bfloat16), None, mean=d["mean"],
                            var=d["var"], scale=d["scale"], offset=d["offset"], epsilon=1e-5)
  assert k.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16
  rk, _ = _ref_fold({**d, "kernel": f64(jnp.asarray(d["kernel"], jnp.bfloat16))},
                    {"bias": False, "scale": True, "offset": True}, 1e-5)
  np.testing.assert_allclose(f64(k), rk, rtol=2 ** -8, atol=0)  # one bfloat16 rounding
  k, b = jn.fold_batch_norm(d["kernel"], jnp.asarray(d["bias"], jnp.bfloat16), mean=d["mean"],
                            var=d["var"], scale=None, offset=None, epsilon=1e-5)
  assert k.dtype == jnp.float32 and b.dtype == jnp.bfloat16


class _Block(nn.Module):
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=self.folded)(x)
    if not self.folded:
      x = jnn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.relu(x)


class _Net(nn.Module):
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _Block(self.folded)(x, train)
    x = _Block(self.folded)(x, train)
    x = nn.Dense(3)(x.mean(axis=(1, 2)))
    if not self.folded:
      x = jnn.BatchNorm(use_running_average=not train, use_scale=False, epsilon=1e-3)(x)
    return x


def _random_variables(model, x):
  """Random parameters and statistics (variances positive) in the tree of `model.init`,
  without compiling anything."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rs = np.random.RandomState(0)

  def fill(path, a):
    v = rs.randn(*a.shape).astype(a.dtype)
    return np.abs(v) + 0.1 if path[-1].key == "var" else v

  return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def test_linen_fold_batch_norms_gives_the_folded_architecture():
  x = jnp.asarray(np.random.RandomState(0).randn(8, 6, 6, 2), jnp.float32)
  model = _Net()
  variables = _random_variables(model, x)
  pairs = {"_Block_0/Conv_0": "_Block_0/BatchNorm_0", "_Block_1/Conv_0": "_Block_1/BatchNorm_0",
           "Dense_0": "BatchNorm_0"}
  eps = {"_Block_0/BatchNorm_0": 1e-5, "_Block_1/BatchNorm_0": 1e-5, "BatchNorm_0": 1e-3}
  folded = jnn.fold_batch_norms(variables, pairs, epsilon=eps)
  target = jax.eval_shape(_Net(folded=True).init, jax.random.key(1), x)
  assert jax.tree.structure(folded) == jax.tree.structure(dict(target))
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), folded)
          == jax.tree.map(lambda a: (a.shape, a.dtype), dict(target)))
  assert "batch_stats" in variables and "BatchNorm_0" in variables["params"]  # input intact
  y = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  yf = jax.jit(lambda v, x: _Net(folded=True).apply(v, x))(folded, x)
  # Two 3x3x4 convolutions deep: float32 rounding of sums of ~36 terms of order 1 per layer.
  scale = float(jnp.abs(y).max()) + 1.0
  np.testing.assert_allclose(np.asarray(yf), np.asarray(y), rtol=0, atol=200 * EPS32 * scale)


class _ResBlock(nn.Module):
  """conv → BN → relu → conv (no bias) → BN, plus the block's input."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(jnn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    y = jnn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3), use_bias=False)(y))
    return nn.relu(x + y)


class _ResNet(nn.Module):
  """A small ResNet-like model written plainly, with no thought of folding."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    ura = not train
    x = nn.relu(nn.BatchNorm(use_running_average=ura)(nn.Conv(4, (3, 3), use_bias=False)(x)))
    x = _ResBlock()(x, train)
    z = nn.Conv(4, (1, 1))(x)
    x = jnn.BatchNorm(use_running_average=ura)(z) + z          # z is used twice: not folded
    x = jnn.BatchNorm(use_running_average=ura)(nn.relu(x))     # a relu in between: not folded
    shared = nn.Dense(4)
    h = jnn.BatchNorm(use_running_average=ura)(shared(x.mean(axis=(1, 2))))  # shared: not folded
    h = nn.relu(shared(h))
    return jnn.BatchNorm(use_running_average=ura, use_scale=False, epsilon=0.5)(nn.Dense(3)(h))


_RES_FOLDED = {"Conv_0": "BatchNorm_0", "_ResBlock_0/Conv_0": "_ResBlock_0/BatchNorm_0",
               "_ResBlock_0/Conv_1": "_ResBlock_0/BatchNorm_1", "Dense_1": "BatchNorm_4"}
_RES_UNFOLDED = {"BatchNorm_1": "also used elsewhere", "BatchNorm_2": "not exactly the output",
                 "BatchNorm_3": "'Dense_0' is called 2 times"}


def _res_variables(model, x):
  """Random variables whose layers have small gains in the max norm (kernels divided by three
  times their fan-in, BatchNorm variances >= 1 and |scale| <= 1), so that the rounding error
  bound of `_res_bound` stays far below what a wrong fold changes."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rs = np.random.RandomState(3)

  def fill(path, a):
    name = path[-1].key
    if name == "kernel":
      return (rs.randn(*a.shape) / (3 * np.prod(a.shape[:-1]))).astype(a.dtype)
    if name == "var":
      return (rs.rand(*a.shape) + 1.0).astype(a.dtype)
    if name == "scale":
      return rs.uniform(-1, 1, a.shape).astype(a.dtype)
    return (rs.randn(*a.shape) * 0.5).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def _res_bound(model, variables, x):
  """float64 output of `model` and a bound on the error of any float32 evaluation of it, folded
  or not.

  Each layer (a Dense or Conv with n = fan-in terms, its bias, and the BatchNorm after it, or
  the folded layer) computes from exact inputs a value off by at most γ(n + 5)·(Σ|W||a| + |b| +
  |μ|)|s| + |β|) ≤ γ(n + 5)·(g·A + C), with g the largest gain Σ|W|·|s|, A the largest layer
  input and C the largest (|b| + |μ|)|s| + |β|. An error entering a later layer is multiplied by
  at most 1 + g (its gain, plus the identity of a residual sum); with D layers on the longest
  path the output is off by at most D·(1 + g)^D·γ(n + 5)·(g·A + C)."""
  params, stats = variables["params"], variables["batch_stats"]
  kernels = [np.abs(f64(p["kernel"])) for p in jax.tree.leaves(
      params, is_leaf=lambda t: isinstance(t, dict) and "kernel" in t) if "kernel" in p]
  gain_w = max(float(k.reshape(-1, k.shape[-1]).sum(0).max()) for k in kernels)
  bns = jax.tree.leaves(stats, is_leaf=lambda t: isinstance(t, dict) and "var" in t)
  s = max(float(np.max(1 / np.sqrt(f64(b["var"])))) for b in bns)  # |scale| <= 1
  g = gain_w * max(s, 1.0)
  biases = [np.abs(f64(a)).max() for a in jax.tree.leaves(params) if a.ndim == 1]
  c = (max(biases) + max(float(np.abs(f64(b["mean"])).max()) for b in bns)) * max(s, 1.0)
  c += max(biases)
  n = max(int(np.prod(k.shape[:-1])) for k in kernels)
  with jaxcompat.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(f64(a)), variables)
    y64, state = model.apply(v64, jnp.asarray(f64(x)), capture_intermediates=True,
                             mutable=["intermediates"])
  a = 2 * max([float(np.abs(f64(x)).max())]
              + [float(np.abs(f64(t)).max()) for t in jax.tree.leaves(state)])  # sums of two
  depth = 7  # stem, two block convolutions, the 1x1 convolution, Dense_0 twice, Dense_1
  gamma = (n + 5) * U32 / (1 - (n + 5) * U32)
  return f64(y64), depth * (1 + g) ** depth * gamma * (g * a + c)


def test_fold_model_folds_a_model_as_written():
  x = jnp.asarray(np.random.RandomState(0).randn(4, 6, 6, 2), jnp.float32)
  model = _ResNet()
  variables = _res_variables(model, x)
  folding = jnn.fold_model(model, variables, x)
  assert folding.folded == _RES_FOLDED
  assert sorted(folding.unfolded) == sorted(_RES_UNFOLDED)
  for bn, why in _RES_UNFOLDED.items():
    assert why in folding.unfolded[bn]
  stats = folding.variables["batch_stats"]
  assert sorted(stats) == ["BatchNorm_1", "BatchNorm_2", "BatchNorm_3"]  # _ResBlock_0 is gone
  assert "BatchNorm_4" not in folding.variables["params"]
  assert folding.variables["params"]["_ResBlock_0"]["Conv_1"]["bias"].shape == (4,)
  assert "batch_stats" in variables and "BatchNorm_0" in variables["batch_stats"]  # input intact
  ref, bound = _res_bound(model, variables, x)
  y = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  yf = jax.jit(folding.apply)(folding.variables, x)
  assert yf.dtype == y.dtype and yf.shape == y.shape
  assert_within(f64(y), ref, bound, "unfolded")
  assert_within(f64(yf), ref, bound, "folded")
  # The bound is tight enough to see a fold that ignores a BatchNorm's epsilon (0.5 on the last).
  wrong = jnn.fold_batch_norms(variables, folding.folded, epsilon=1e-5)
  assert np.abs(f64(folding.apply(wrong, x)) - ref).max() > 10 * bound


def test_fold_model_leaves_a_training_mode_model_unfolded():
  x = jnp.ones((2, 6, 6, 2), jnp.float32)
  model = _ResNet()
  variables = _res_variables(model, x)
  folding = jnn.fold_model(model, variables, x, train=True, mutable=["batch_stats"])
  assert folding.folded == {}
  assert all("training mode" in why for why in folding.unfolded.values())
  assert len(folding.unfolded) == 7
  assert jax.tree.structure(folding.variables) == jax.tree.structure(variables)


class _NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.conv0 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.bn0 = jnnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.conv1 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = jnnx.BatchNorm(4, use_running_average=True, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn0(self.conv0(x)))
    return nnx.relu(x + self.bn1(self.conv1(y)))


class _NNXResNet(nnx.Module):
  """`_ResNet` in nnx, written plainly."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.block = _NNXBlock(rngs)
    self.conv = nnx.Conv(4, 4, (1, 1), rngs=rngs)
    self.bn_twice = jnnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.bn_relu = jnnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.shared = nnx.Linear(4, 4, rngs=rngs)
    self.bn_shared = jnnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)
    self.bn_head = jnnx.BatchNorm(3, use_running_average=True, use_scale=False, epsilon=0.5,
                                  rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    x = self.block(x)
    z = self.conv(x)
    x = self.bn_relu(nnx.relu(self.bn_twice(z) + z))
    h = nnx.relu(self.shared(self.bn_shared(self.shared(x.mean(axis=(1, 2))))))
    return self.bn_head(self.head(h))


_NNX_NAMES = {"Conv_0": "stem", "BatchNorm_0": "stem_bn", "_ResBlock_0/Conv_0": "block/conv0",
              "_ResBlock_0/BatchNorm_0": "block/bn0", "_ResBlock_0/Conv_1": "block/conv1",
              "_ResBlock_0/BatchNorm_1": "block/bn1", "Conv_1": "conv",
              "BatchNorm_1": "bn_twice", "BatchNorm_2": "bn_relu", "Dense_0": "shared",
              "BatchNorm_3": "bn_shared", "Dense_1": "head", "BatchNorm_4": "bn_head"}


def _nnx_with(variables):
  """`_NNXResNet` holding the linen `_ResNet`'s variables."""
  model = _NNXResNet(nnx.Rngs(0))
  for linen_path, attr in _NNX_NAMES.items():
    module = model
    for name in attr.split("/"):
      module = getattr(module, name)
    for col in ("params", "batch_stats"):
      node = variables[col]
      for name in linen_path.split("/"):
        node = node.get(name, {})
      for key, value in node.items():
        getattr(module, key)[...] = jnp.asarray(value)
  return model


def test_nnx_fold_model_folds_in_place():
  x = jnp.asarray(np.random.RandomState(0).randn(4, 6, 6, 2), jnp.float32)
  variables = _res_variables(_ResNet(), x)
  model = _nnx_with(variables)
  y = model(x)
  assert np.array_equal(np.asarray(y), np.asarray(_ResNet().apply(variables, x)))
  folded, unfolded = jnnx.fold_model(model, x)
  assert folded == {_NNX_NAMES[k]: _NNX_NAMES[v] for k, v in _RES_FOLDED.items()}
  assert {_NNX_NAMES[k]: v for k, v in _RES_UNFOLDED.items()}.keys() == unfolded.keys()
  for bn, why in _RES_UNFOLDED.items():
    assert why.replace("'Dense_0'", "'shared'") in unfolded[_NNX_NAMES[bn]]
  assert isinstance(model.block.bn1, jnnx.FoldedBatchNorm)
  assert isinstance(model.bn_relu, jnnx.BatchNorm)
  assert model.block.conv1.bias is not None and model.block.conv1.bias[...].shape == (4,)
  ref, bound = _res_bound(_ResNet(), variables, x)
  yf = nnx.jit(lambda m, x: m(x))(model, x)
  assert yf.dtype == y.dtype
  assert_within(f64(yf), ref, bound, "folded nnx")


def test_fold_model_adds_the_bias_in_the_layer_dtype():
  """A bfloat16 layer built without bias gets the folded bias rounded to bfloat16 and added as
  flax adds a bias (strict promotion refuses bfloat16 + float32)."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(3, use_bias=False, dtype=jnp.bfloat16)(x)
      return jnn.BatchNorm(use_running_average=True, dtype=jnp.bfloat16)(h)

  x = jnp.asarray(np.random.RandomState(0).randn(2, 4), jnp.float32)
  variables = Net().init(jax.random.key(0), x)
  folding = jnn.fold_model(Net(), variables, x)
  assert folding.folded == {"Dense_0": "BatchNorm_0"}
  y = folding.apply(folding.variables, x)
  assert y.dtype == jnp.bfloat16
  # Kernel, product and bias each rounded to bfloat16 (u = 2**-8), on terms of |x||W| + |b'|.
  k, b = (f64(folding.variables["params"]["Dense_0"][n]) for n in ("kernel", "bias"))
  ref = f64(x) @ k + b
  bound = 6 * 2.0 ** -8 * (np.abs(f64(x)) @ np.abs(k) + np.abs(b))
  assert_within(f64(y), ref, bound, "bfloat16 folded")
