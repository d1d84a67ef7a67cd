"""recompute_batch_stats (linen and nnx) against float64 NumPy references of population stats.

The model: Dense -> BatchNorm -> relu -> Dense -> BatchNorm(momentum=None,
unbiased_running_var=True) -> Dense, with a mask that leaves 8, 6 and 3 valid rows in three
batches. In evaluation mode the reference re-estimates the layers in order, the second seeing
the first normalized with its new statistics; in training mode every batch is normalized by its
own statistics (fvcore's method).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx
from tests.refs import f64

EPS32 = float(np.finfo(np.float32).eps)
VALID = (8, 6, 3)


class Net(nn.Module):
  @nn.compact
  def __call__(self, batch, train: bool):
    mask = batch.get("mask")
    h = nn.Dense(6)(batch["x"])
    h = nn.relu(jnn.BatchNorm(use_running_average=not train, momentum=0.9)(h, mask=mask))
    h = nn.Dense(5)(h)
    h = jnn.BatchNorm(use_running_average=not train, momentum=None, unbiased_running_var=True,
                      epsilon=1e-3)(h, mask=mask)
    return nn.Dense(2)(h)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.d1, self.d2, self.d3 = (nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs),
                                 nnx.Linear(5, 2, rngs=rngs))
    self.bn1 = jnnx.BatchNorm(6, momentum=0.9, rngs=rngs)
    self.bn2 = jnnx.BatchNorm(5, momentum=None, unbiased_running_var=True, epsilon=1e-3,
                              rngs=rngs)

  def __call__(self, batch):
    mask = batch.get("mask")
    h = nnx.relu(self.bn1(self.d1(batch["x"]), mask=mask))
    return self.d3(self.bn2(self.d2(h), mask=mask))


def _batches():
  rs = np.random.RandomState(0)
  out = []
  for n in VALID:
    x = (rs.randn(8, 4) * 2 + 3).astype(np.float32)
    x[n:] = np.nan  # masked rows never enter the statistics (NaN would show)
    out.append({"x": x, "mask": (np.arange(8) < n)[:, None]})
  return out


def _variables():
  """Random weights (so that the statistics are far from the initial 0 / 1)."""
  shapes = jax.eval_shape(lambda k, b: Net().init(k, b, train=False), jax.random.key(0),
                          _batches()[0])
  rs = np.random.RandomState(1)

  def fill(path, a):
    if path[-1].key == "count":
      return np.asarray(7, a.dtype)
    v = np.asarray(rs.randn(*a.shape), a.dtype)
    return np.abs(v) + np.asarray(0.5, a.dtype) if path[-1].key == "var" else v

  return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def _reference(variables, training):
  """Float64 population statistics of both BatchNorms' inputs (valid rows only)."""
  p, st = variables["params"], variables["batch_stats"]

  def dense(name, h):
    return h @ f64(p[name]["kernel"]) + f64(p[name]["bias"])

  def bn(h, mean, var, name, eps):
    return (h - mean) / np.sqrt(var + eps) * f64(p[name]["scale"]) + f64(p[name]["bias"])

  xs = [f64(b["x"][:n]) for b, n in zip(_batches(), VALID, strict=True)]
  h1 = [dense("Dense_0", x) for x in xs]
  all1 = np.concatenate(h1)
  m1, v1 = all1.mean(0), all1.var(0)
  if training:  # each batch normalized by its own statistics
    a1 = [np.maximum(bn(h, h.mean(0), h.var(0), "BatchNorm_0", 1e-5), 0) for h in h1]
  else:  # by the new population statistics
    a1 = [np.maximum(bn(h, m1, v1, "BatchNorm_0", 1e-5), 0) for h in h1]
  all2 = np.concatenate([dense("Dense_1", a) for a in a1])
  n = len(all2)
  m2, v2 = all2.mean(0), all2.var(0) * n / (n - 1)
  del st
  bound1 = 8 * (len(all1) + 4) * EPS32 * (np.abs(all1) + all1 ** 2).mean(0) + 1e-30
  bound2 = 64 * (len(all2) + 10) * EPS32 * (np.abs(all2) + all2 ** 2).mean(0) * (
      1 + 1 / np.sqrt(v1.min()))
  return (m1, v1, bound1), (m2, v2, bound2)


def _check(stats, ref, count=3):
  (m1, v1, b1), (m2, v2, b2) = ref
  s1, s2 = stats["BatchNorm_0"], stats["BatchNorm_1"]
  for got, want, bound in ((s1["mean"], m1, b1), (s1["var"], v1, b1), (s2["mean"], m2, b2),
                           (s2["var"], v2, b2)):
    assert got.dtype == jnp.float32
    assert np.all(np.abs(f64(got) - want) <= bound), (f64(got) - want, bound)
  assert "count" not in s1
  assert s2["count"].dtype == jnp.int32 and int(s2["count"]) == count


@pytest.mark.parametrize("train", [False, True])
def test_linen_recompute_matches_float64_population_stats(train):
  variables = _variables()
  new = jnn.recompute_batch_stats(Net(), variables, _batches(), train=train)
  _check(new["batch_stats"], _reference(variables, training=train))
  assert new["params"] == variables["params"]  # the same arrays
  assert int(variables["batch_stats"]["BatchNorm_1"]["count"]) == 7  # input not modified
  # Another checkpoint of the same model reuses the compiled passes, with its own weights.
  p2 = jax.tree.map(lambda a: a * np.asarray(1.5, a.dtype), variables["params"])
  other = {"params": p2, "batch_stats": variables["batch_stats"]}
  new = jnn.recompute_batch_stats(Net(), other, _batches(), train=train)
  _check(new["batch_stats"], _reference(other, training=train))


def test_linen_recompute_sharded_batches_and_one_shot_iterator(capsys):
  """Batches sharded over 8 devices under plain jit; a generator, iterated twice (eval mode
  needs one pass per BatchNorm), is kept in a list."""
  variables = _variables()
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  batches = ({k: jax.device_put(v, sharding) for k, v in b.items()} for b in _batches())
  new = jnn.recompute_batch_stats(Net(), variables, batches, train=False, progress=True)
  _check(new["batch_stats"], _reference(variables, training=False))
  assert "recompute_batch_stats (2 passes)" in capsys.readouterr().err  # the progress bar


def test_nnx_recompute_matches_float64_population_stats_and_linen():
  variables = _variables()
  model = NNXNet(nnx.Rngs(0))
  p = variables["params"]
  for mod, name in ((model.d1, "Dense_0"), (model.d2, "Dense_1"), (model.d3, "Dense_2")):
    mod.kernel[...], mod.bias[...] = p[name]["kernel"], p[name]["bias"]
  for mod, name in ((model.bn1, "BatchNorm_0"), (model.bn2, "BatchNorm_1")):
    mod.scale[...], mod.bias[...] = p[name]["scale"], p[name]["bias"]
    mod.mean[...] = variables["batch_stats"][name]["mean"]
    mod.var[...] = variables["batch_stats"][name]["var"]
  kernel_before = model.d1.kernel[...]
  model.eval()
  assert jnnx.recompute_batch_stats(model, _batches()) is None
  stats = {"BatchNorm_0": {"mean": model.bn1.mean[...], "var": model.bn1.var[...]},
           "BatchNorm_1": {"mean": model.bn2.mean[...], "var": model.bn2.var[...],
                           "count": model.bn2.count[...]}}
  _check(stats, _reference(variables, training=False))
  assert model.d1.kernel[...] is kernel_before
  linen = jnn.recompute_batch_stats(Net(), variables, _batches(), train=False)["batch_stats"]
  for name, layer in stats.items():  # the same computation in the same order
    for k, value in layer.items():
      np.testing.assert_allclose(value, linen[name][k], rtol=4 * EPS32)
  model.train()
  jnnx.recompute_batch_stats(model, _batches())
  stats["BatchNorm_1"] = {"mean": model.bn2.mean[...], "var": model.bn2.var[...],
                          "count": model.bn2.count[...]}
  _check({"BatchNorm_0": {"mean": model.bn1.mean[...], "var": model.bn1.var[...]},
          "BatchNorm_1": stats["BatchNorm_1"]}, _reference(variables, training=True))


def test_nnx_recompute_finds_batch_norms_in_lists():
  model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), jnnx.BatchNorm(3, rngs=nnx.Rngs(0)))
  model.eval()
  x = np.random.RandomState(5).randn(16, 4).astype(np.float32)
  jnnx.recompute_batch_stats(model, [x[:8], x[8:]])
  h = f64(x) @ f64(model.layers[0].kernel[...]) + f64(model.layers[0].bias[...])
  bound = 8 * (16 + 4) * EPS32 * (np.abs(h) + h * h).mean(0)
  assert np.all(np.abs(f64(model.layers[1].mean[...]) - h.mean(0)) <= bound)
  assert np.all(np.abs(f64(model.layers[1].var[...]) - h.var(0)) <= bound)

