"""jaxnorm.interop: PyTorch state dicts both ways, and PyTorch's BatchNorm rule reproduced.

A float64 NumPy reference of PyTorch's documented update rule (momentum 0.1: new = 0.9 old +
0.1 batch; the *unbiased* batch variance enters the running variance; momentum=None: the
cumulative average with weight 1 / num_batches_tracked) runs without torch. The tests marked
by the `torch` fixture compare with real `torch` (CPU build) and skip cleanly without it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from jaxnorm import interop
from jaxnorm import linen as jnn
from tests.refs import f64

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture
def torch():
  return pytest.importorskip("torch")


def ref_torch_bn_train(x_nchw, mean, var, tracked, momentum):
  """PyTorch's BatchNorm2d training update in float64: (new_mean, new_var, new_tracked)."""
  x = f64(x_nchw)
  axes = (0, 2, 3)
  n = x.size // x.shape[1]
  bm, bv = x.mean(axes), x.var(axes) * n / (n - 1)  # the unbiased variance is stored
  tracked = tracked + 1
  w = 1.0 / tracked if momentum is None else momentum
  return (1 - w) * f64(mean) + w * bm, (1 - w) * f64(var) + w * bv, tracked


def _batches(steps, shape=(4, 3, 5, 5), seed=0):
  rs = np.random.RandomState(seed)
  return [(rs.randn(*shape) * 2 + 1).astype(np.float32) for _ in range(steps)]


def _stat_bound(x_nchw):
  """Bound on float32 error of a per-channel mean/variance of n terms: n·eps·mean(|x|²+|x|)."""
  x = f64(x_nchw)
  n = x.size // x.shape[1]
  return 4 * n * EPS32 * (np.abs(x) + x * x).mean((0, 2, 3))


@pytest.mark.parametrize("torch_momentum", [0.1, None])
def test_jaxnorm_reproduces_pytorch_update_rule(torch_momentum):
  """BatchNorm(momentum=momentum_from_torch(m), unbiased_running_var=True) vs the reference."""
  bn = jnn.BatchNorm(use_running_average=False, momentum=jn.momentum_from_torch(torch_momentum),
                     unbiased_running_var=True, epsilon=1e-5)
  xs = _batches(3)
  sd = {"weight": np.ones(3, np.float32), "bias": np.zeros(3, np.float32),
        "running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32),
        "num_batches_tracked": np.array(0)}
  variables = interop.from_torch(sd, with_count=torch_momentum is None)
  step = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"])[1])
  mean, var, tracked = sd["running_mean"], sd["running_var"], 0
  bound = np.zeros(3)
  for x in xs:
    variables = {"params": variables["params"], **step(variables, x.transpose(0, 2, 3, 1))}
    mean, var, tracked = ref_torch_bn_train(x, mean, var, tracked, torch_momentum)
    bound = bound + _stat_bound(x)
  stats = variables["batch_stats"]
  assert np.all(np.abs(f64(stats["mean"]) - mean) <= bound)
  assert np.all(np.abs(f64(stats["var"]) - var) <= bound)
  if torch_momentum is None:
    assert int(stats["count"]) == tracked


def test_from_torch_and_to_torch_round_trip_with_numpy():
  rs = np.random.RandomState(0)
  sd = {"features.1.weight": rs.randn(4).astype(np.float32),
        "features.1.bias": rs.randn(4).astype(np.float32),
        "features.1.running_mean": rs.randn(4).astype(np.float32),
        "features.1.running_var": rs.rand(4).astype(np.float32),
        "features.1.num_batches_tracked": np.array(12, np.int64),
        "features.0.weight": rs.randn(4, 3, 3, 3).astype(np.float32)}
  v = interop.from_torch(sd, "features.1.", with_count=True)
  assert sorted(v) == ["batch_stats", "params"]
  assert sorted(v["params"]) == ["bias", "scale"]
  assert sorted(v["batch_stats"]) == ["count", "mean", "var"]
  assert v["batch_stats"]["count"].dtype == jnp.int32 and int(v["batch_stats"]["count"]) == 12
  np.testing.assert_array_equal(v["params"]["scale"], sd["features.1.weight"])
  np.testing.assert_array_equal(v["batch_stats"]["var"], sd["features.1.running_var"])
  back = interop.to_torch(v, "features.1.")
  assert sorted(back) == sorted(k for k in sd if k.startswith("features.1."))
  for k, val in back.items():
    np.testing.assert_array_equal(val, sd[k])
    assert val.dtype == sd[k].dtype
  assert back["features.1.num_batches_tracked"].shape == ()
  # Without count: num_batches_tracked is 0; without stats: no num_batches_tracked at all.
  v = interop.from_torch(sd, "features.1.")
  assert "count" not in v["batch_stats"]
  assert int(interop.to_torch(v)["num_batches_tracked"]) == 0
  ln = interop.to_torch({"params": {"scale": np.ones(4, np.float32)}})
  assert sorted(ln) == ["weight"]


def test_to_torch_of_bfloat16_variables_loads_with_torch_from_numpy(torch):
  """NumPy has no bfloat16 of its own (JAX's is ml_dtypes', which torch.from_numpy rejects):
  the entries come back as float32, exactly, and load into a bfloat16 layer bit for bit."""
  rs = np.random.RandomState(2)
  v = {"params": {"scale": rs.randn(4), "bias": rs.randn(4)},
       "batch_stats": {"mean": rs.randn(4), "var": rs.rand(4)}}
  v = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), v)
  sd = {k: torch.from_numpy(a) for k, a in interop.to_torch(v).items()}
  layer = torch.nn.BatchNorm1d(4).to(torch.bfloat16)
  layer.load_state_dict(sd, strict=True)
  for key, tree, name in (("weight", "params", "scale"), ("running_var", "batch_stats", "var")):
    got = layer.state_dict()[key].float().numpy()
    np.testing.assert_array_equal(got, np.asarray(v[tree][name], np.float32))


class _FakeTensor:
  """Duck-types a torch tensor: interop must only call .detach().cpu().numpy()."""

  def __init__(self, value):
    self.value, self.calls = np.asarray(value), []

  def detach(self):
    self.calls.append("detach")
    return self

  def cpu(self):
    self.calls.append("cpu")
    return self

  def numpy(self):
    self.calls.append("numpy")
    return self.value


def test_from_torch_duck_types_tensors():
  t = _FakeTensor(np.arange(3, dtype=np.float32))
  v = interop.from_torch({"weight": t})
  assert t.calls == ["detach", "cpu", "numpy"]
  np.testing.assert_array_equal(v["params"]["scale"], np.arange(3))
  assert "batch_stats" not in v


# --------------------------------------------------------------------------- against torch


def _eval_bound(x, mean, var, scale, bias, eps):
  """Float32 error bound of (x - μ) γ / sqrt(σ² + ε) + β: a few roundings of each term."""
  s = np.abs(f64(scale)) / np.sqrt(f64(var) + eps)
  return 8 * EPS32 * ((np.abs(f64(x)) + np.abs(f64(mean))) * s + np.abs(f64(bias)))


@pytest.mark.parametrize("torch_momentum", [0.1, None])
def test_batch_norm_matches_torch_training_and_eval(torch, torch_momentum):
  tbn = torch.nn.BatchNorm2d(3, momentum=torch_momentum)
  with torch.no_grad():
    tbn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
    tbn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
  xs = _batches(3, seed=1)
  tbn.train()
  for x in xs[:2]:
    tbn(torch.from_numpy(x))
  bn = jnn.BatchNorm(momentum=jn.momentum_from_torch(torch_momentum), unbiased_running_var=True,
                     epsilon=tbn.eps)
  variables = interop.from_torch(tbn.state_dict(), with_count=torch_momentum is None)
  # The NumPy reference agrees with torch (so the reference test above tests torch's rule).
  mean, var, tracked = np.zeros(3), np.ones(3), 0
  for x in xs[:2]:
    mean, var, tracked = ref_torch_bn_train(x, mean, var, tracked, torch_momentum)
  bound = _stat_bound(xs[0]) + _stat_bound(xs[1])
  assert np.all(np.abs(f64(variables["batch_stats"]["mean"]) - mean) <= bound)
  assert np.all(np.abs(f64(variables["batch_stats"]["var"]) - var) <= bound)
  assert int(tbn.num_batches_tracked) == tracked
  # One more training step on both sides: the same output and the same running statistics.
  x = xs[2]
  y_t = tbn(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
  y_j, upd = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False,
                                           mutable=["batch_stats"]))(variables,
                                                                     x.transpose(0, 2, 3, 1))
  # Both normalize with float32 batch statistics of n = 100 terms per channel (relative error
  # up to ~n·eps each): |Δy| <= 4·n·eps·|γ|·(|x̂| + 1) + a rounding of β.
  n = x.size // x.shape[1]
  gamma, beta = tbn.weight.detach().numpy(), tbn.bias.detach().numpy()
  xhat = (f64(y_t) - beta) / gamma
  bound = 4 * n * EPS32 * np.abs(gamma) * (np.abs(xhat) + 1) + 4 * EPS32 * np.abs(beta)
  assert np.all(np.abs(f64(y_j) - f64(y_t)) <= bound)
  sd = tbn.state_dict()
  bound = _stat_bound(x) + 4 * EPS32 * np.abs(f64(sd["running_var"].numpy()))
  for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
    assert np.all(np.abs(f64(upd["batch_stats"][ours]) - f64(sd[theirs].numpy())) <= bound)
  # Evaluation with the same statistics: identical to float32 rounding.
  variables = interop.from_torch(sd, with_count=torch_momentum is None)
  tbn.eval()
  y_t = tbn(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
  y_j = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=True))(
      variables, x.transpose(0, 2, 3, 1))
  st = variables["batch_stats"]
  bound = _eval_bound(x.transpose(0, 2, 3, 1), st["mean"], st["var"], variables["params"]["scale"],
                      variables["params"]["bias"], tbn.eps)
  assert np.all(np.abs(f64(y_j) - f64(y_t)) <= bound)


def test_layer_group_rms_norm_outputs_match_torch(torch):
  rs = np.random.RandomState(3)
  x = (rs.randn(2, 6, 4, 4) * 3 + 2).astype(np.float32)  # NCHW
  xt, xj = torch.from_numpy(x), x.transpose(0, 2, 3, 1)
  cases = []
  ln = torch.nn.LayerNorm(6)
  cases.append((ln, jnn.LayerNorm(epsilon=ln.eps), xt.permute(0, 2, 3, 1), xj))
  lnb = torch.nn.LayerNorm(6, bias=False)
  cases.append((lnb, jnn.LayerNorm(epsilon=lnb.eps, use_bias=False), xt.permute(0, 2, 3, 1), xj))
  gn = torch.nn.GroupNorm(3, 6)
  cases.append((gn, jnn.GroupNorm(num_groups=3, epsilon=gn.eps), xt, xj))
  rms = torch.nn.RMSNorm(6, eps=1e-6)
  cases.append((rms, jnn.RMSNorm(epsilon=1e-6), xt.permute(0, 2, 3, 1), xj))
  for tmod, jmod, tx, jx in cases:
    with torch.no_grad():
      for p in tmod.parameters():
        p.copy_(torch.from_numpy(rs.randn(*p.shape).astype(np.float32)))
    y_t = tmod(tx).detach().numpy()
    if y_t.shape != jx.shape:
      y_t = y_t.transpose(0, 2, 3, 1)
    variables = interop.from_torch(tmod.state_dict())
    y_j = jax.jit(jmod.apply)(variables, jx)
    # normalized values are O(few) after a scale of O(1): float32 reductions over <= 96 terms
    scale = 1 + float(np.abs(y_t).max())
    np.testing.assert_allclose(np.asarray(y_j), y_t, rtol=0, atol=96 * EPS32 * scale,
                               err_msg=type(tmod).__name__)
    # And back: loadable with strict=True, the same values.
    back = {k: torch.from_numpy(v) for k, v in interop.to_torch(variables).items()}
    tmod.load_state_dict(back, strict=True)


@pytest.mark.parametrize("make", [
    lambda t: t.nn.BatchNorm1d(5),
    lambda t: t.nn.BatchNorm2d(5, affine=False),
    lambda t: t.nn.BatchNorm3d(5, momentum=None),
    lambda t: t.nn.InstanceNorm2d(5, affine=True, track_running_stats=True),
])
def test_to_torch_loads_strictly(torch, make):
  layer = make(torch)
  rs = np.random.RandomState(4)
  with torch.no_grad():
    for _, buf in [*layer.named_parameters(), *layer.named_buffers()]:
      if buf.dtype == torch.float32:
        buf.copy_(torch.from_numpy(np.abs(rs.randn(*buf.shape)).astype(np.float32)))
  layer.num_batches_tracked.fill_(5)
  v = interop.from_torch(layer.state_dict(), with_count=True)
  back = interop.to_torch(v)
  assert back["num_batches_tracked"].dtype == np.int64
  fresh = make(torch)
  fresh.load_state_dict({k: torch.from_numpy(a) for k, a in back.items()}, strict=True)
  for k, t in fresh.state_dict().items():
    np.testing.assert_array_equal(t.numpy(), layer.state_dict()[k].numpy())


# ------------------------------------------------------------------------- a whole state_dict


def _torch_resnet(torch):
  """A small ResNet-like PyTorch model: stem, two basic blocks (one with a downsampling
  shortcut), GroupNorm, global pooling, LayerNorm, Linear."""
  tnn = torch.nn

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(cout)
      self.downsample = (tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                        tnn.BatchNorm2d(cout)) if stride != 1 else None)

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = tnn.Conv2d(3, 8, 3, 1, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(8)
      self.layer1 = tnn.Sequential(Block(8, 8, 1))
      self.layer2 = tnn.Sequential(Block(8, 16, 2))
      self.gn = tnn.GroupNorm(4, 16)
      self.head_ln = tnn.LayerNorm(16)
      self.fc = tnn.Linear(16, 5)

    def forward(self, x):
      x = torch.relu(self.bn1(self.conv1(x)))
      x = self.gn(self.layer2(self.layer1(x)))
      return self.fc(self.head_ln(x.mean((2, 3))))

  return Net()


class _FlaxBlock(nn.Module):
  features: int
  stride: int

  @nn.compact
  def __call__(self, x):
    bn = lambda name: jnn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)
    y = nn.Conv(self.features, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name="conv2")(y)
    y = bn("bn2")(y)
    if self.stride != 1:
      x = nn.Conv(self.features, (1, 1), self.stride, padding=0, use_bias=False,
                  name="down_conv")(x)
      x = bn("down_bn")(x)
    return nn.relu(y + x)


class _FlaxNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv1")(x)
    x = nn.relu(jnn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn1")(x))
    x = _FlaxBlock(8, 1, name="layer1_0")(x)
    x = _FlaxBlock(16, 2, name="layer2_0")(x)
    x = jnn.GroupNorm(num_groups=4, epsilon=1e-5, name="gn")(x)
    x = jnn.LayerNorm(epsilon=1e-5, name="head_ln")(x.mean((1, 2)))
    return nn.Dense(5, name="fc")(x)


NAME_MAP = {"bn1": "bn1", "layer1.0.bn1": "layer1_0/bn1", "layer1.0.bn2": "layer1_0/bn2",
            "layer2.0.bn1": "layer2_0/bn1", "layer2.0.bn2": "layer2_0/bn2",
            "layer2.0.downsample.1": "layer2_0/down_bn", "gn": "gn", "head_ln": "head_ln"}
CONV_MAP = {"conv1": "conv1", "layer1.0.conv1": "layer1_0/conv1",
            "layer1.0.conv2": "layer1_0/conv2", "layer2.0.conv1": "layer2_0/conv1",
            "layer2.0.conv2": "layer2_0/conv2", "layer2.0.downsample.0": "layer2_0/down_conv"}


def _trained_torch_resnet(torch):
  torch.manual_seed(0)
  model = _torch_resnet(torch)
  with torch.no_grad():  # non-trivial affine parameters and running statistics
    for name, p in model.named_parameters():
      if "bn" in name or "downsample.1" in name or "gn" in name or "ln" in name:
        p.add_(torch.randn(p.shape) * 0.3)
  model.train()
  for x in _batches(3, shape=(6, 3, 8, 8), seed=5):
    model(torch.from_numpy(x))
  return model.eval()


def _flax_convs(sd):
  """The convolutions and the Linear layer by hand (OIHW to HWIO, weight transposed)."""
  params: dict = {}
  for torch_name, path in CONV_MAP.items():
    node = params
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node["kernel"] = jnp.asarray(sd[torch_name + ".weight"].numpy().transpose(2, 3, 1, 0))
  params["fc"] = {"kernel": jnp.asarray(sd["fc.weight"].numpy().T),
                  "bias": jnp.asarray(sd["fc.bias"].numpy())}
  return {"params": params}


def test_from_torch_model_converts_a_whole_resnet(torch):
  model = _trained_torch_resnet(torch)
  sd = model.state_dict()
  x = _batches(1, shape=(4, 3, 8, 8), seed=6)[0]
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  # Into the model's own initial variables: every entry replaced, the tree unchanged.
  init = _FlaxNet().init(jax.random.key(0), xj)
  merged = interop.from_torch_model(sd, NAME_MAP, variables=init)
  assert jax.tree.structure(merged) == jax.tree.structure(init)
  # Every normalization entry is a copy of PyTorch's: exact.
  for module, path in NAME_MAP.items():
    node_p, node_s = merged["params"], merged.get("batch_stats", {})
    for part in path.split("/"):
      node_p, node_s = node_p[part], node_s.get(part, {})
    np.testing.assert_array_equal(node_p["scale"], sd[module + ".weight"].numpy())
    np.testing.assert_array_equal(node_p["bias"], sd[module + ".bias"].numpy())
    if module + ".running_mean" in sd:
      np.testing.assert_array_equal(node_s["mean"], sd[module + ".running_mean"].numpy())
      np.testing.assert_array_equal(node_s["var"], sd[module + ".running_var"].numpy())
  # Alone, then merged with the hand-converted convolutions: the whole model, logits as
  # PyTorch's in evaluation mode.
  alone = interop.from_torch_model(sd, NAME_MAP)
  assert set(alone) == {"params", "batch_stats"}
  assert set(alone["batch_stats"]) == {"bn1", "layer1_0", "layer2_0"}
  variables = interop.from_torch_model(sd, NAME_MAP, variables=_flax_convs(sd))
  assert jax.tree.structure(variables) == jax.tree.structure(init)
  y_j = np.asarray(jax.jit(_FlaxNet().apply)(variables, xj))
  with torch.no_grad():
    y_t = model(torch.from_numpy(x)).numpy()
  # Both compute in float32 through 7 convolutions and 8 normalizations; each layer's relative
  # rounding is at most its reduction length (<= 144 terms) times eps, and LayerNorm and
  # GroupNorm rescale what reaches the head to O(1): a sum of 15 such layers' errors.
  scale = 1 + float(np.abs(y_t).max())
  np.testing.assert_allclose(y_j, y_t, rtol=0, atol=15 * 144 * EPS32 * scale)


def test_from_torch_model_with_a_callable_and_count(torch):
  model = _trained_torch_resnet(torch)
  sd = model.state_dict()

  def flax_path(module):  # "layer2.0.downsample.1" -> "layer2_0/down_bn"
    if module in NAME_MAP:
      return NAME_MAP[module]
    return None  # convolutions, the Linear layer

  v = interop.from_torch_model(sd, flax_path, with_count=True)
  assert v["batch_stats"]["layer2_0"]["down_bn"]["count"] == 3
  assert "count" not in v["params"]["head_ln"]  # a LayerNorm has no count
  assert jax.tree.structure(v) == jax.tree.structure(interop.from_torch_model(
      sd, {**NAME_MAP}, with_count=True))


def test_to_torch_takes_the_largest_entry_of_a_per_feature_count():
  v = {"batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3),
                       "count": jnp.asarray([4, 2, 4], jnp.int32)}}
  sd = interop.to_torch(v)
  assert sd["num_batches_tracked"].shape == () and int(sd["num_batches_tracked"]) == 4
