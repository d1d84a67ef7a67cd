"""Data-parallel training with synchronized batch normalization on 8 (fake CPU) devices.

A small CNN with two batch-norm layers learns scikit-learn's bundled 8x8 digits (no download),
three ways, from the same initialization and the same batches:

* **single device**: one device sees the whole global batch of 128 images;
* **8 devices, synchronized BN**: `jax.shard_map` splits each batch into 8 shards of 16, and
  `jaxnorm.batch_norm(..., axis_name="data")` normalizes with the statistics of the whole
  batch (two small all-reduces per layer). Its loss curve is the single-device one, to float32
  rounding;
* **8 devices, per-device BN**: the same, without `axis_name`; each device normalizes with the
  statistics of its own 16 images (what flax's ImageNet example does by default). Its loss
  curve differs, and its 8 running statistics differ; `jaxnorm.sync_running_stats` merges them
  for evaluation.

The last batch of every epoch is padded to 128 and masked: devices 5 to 7 then hold only
padding, which batch norm's count weighting handles without NaN.

Run:  python examples/data_parallel.py            (15 epochs, well under 2 minutes on 2 cores)
      python examples/data_parallel.py --quick    (2 epochs, for the test suite)
"""

from __future__ import annotations

import argparse
import time

import jax

# Eight CPU devices, set before JAX initializes its backends (no effect on a real multi-device
# machine with another platform).
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jaxnorm as jn  # noqa: E402

DEVICES = 8
BATCH = 128  # global batch: 16 images per device
MOMENTUM = 0.9  # running-statistics decay
LR = 0.1


def load_data(seed: int = 0):
  """Digits as (N, 8, 8, 1) float32 in [0, 1] and int32 labels; 1500 train, 297 test."""
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  order = np.random.RandomState(seed).permutation(len(y))
  x, y = x[order], y[order]
  return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def batches(x, y, epochs: int, seed: int = 1):
  """Global batches of BATCH; the last of each epoch is zero-padded and masked."""
  rng = np.random.RandomState(seed)
  for _ in range(epochs):
    order = rng.permutation(len(y))
    for start in range(0, len(y), BATCH):
      idx = order[start:start + BATCH]
      pad = BATCH - len(idx)
      xb = np.concatenate([x[idx], np.zeros((pad,) + x.shape[1:], x.dtype)])
      yb = np.concatenate([y[idx], np.zeros(pad, y.dtype)])
      mb = np.arange(BATCH) < len(idx)
      yield xb, yb, mb


def init_params(seed: int = 0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  he = lambda k, shape, fan_in: jax.random.normal(k, shape) * np.sqrt(2.0 / fan_in)
  params = {
      "conv1": he(k1, (3, 3, 1, 16), 9),
      "bn1": {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
      "conv2": he(k2, (3, 3, 16, 32), 9 * 16),
      "bn2": {"scale": jnp.ones(32), "bias": jnp.zeros(32)},
      "dense": {"w": he(k3, (32, 10), 32) * 0.5, "b": jnp.zeros(10)},
  }
  states = {"bn1": jn.batch_norm_init(16), "bn2": jn.batch_norm_init(32)}
  return params, states


def conv(x, w, stride):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def forward(params, states, x, mask, *, training: bool, axis_name=None):
  """Logits and new batch-norm states. `mask` (B,) marks real (not padding) images."""
  m = None if mask is None else mask[:, None, None, None]
  new_states = {}
  h = x
  for i, stride in ((1, 1), (2, 2)):
    h = conv(h, params[f"conv{i}"], stride)
    bn = params[f"bn{i}"]
    h, new_states[f"bn{i}"] = jn.batch_norm(
        h, states[f"bn{i}"], bn["scale"], bn["bias"], training=training, momentum=MOMENTUM,
        mask=m, axis_name=axis_name)
    h = jax.nn.relu(h)
  h = jnp.mean(h, axis=(1, 2))
  return h @ params["dense"]["w"] + params["dense"]["b"], new_states


def loss_fn(params, states, x, y, mask, *, bn_axis, data_axis):
  """Mean cross-entropy over the valid images of the *global* batch."""
  logits, new_states = forward(params, states, x, mask, training=True, axis_name=bn_axis)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  total, count = jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(mask.astype(jnp.float32))
  if data_axis is not None:  # the loss (and so the gradient) is always that of the global batch
    total, count = jax.lax.psum((total, count), data_axis)
  return total / count, new_states


def make_step(tx, mode: str, mesh):
  """One SGD step. mode: 'single', 'sync' (BN over all devices) or 'local' (per device)."""

  def step(params, opt_state, states, x, y, mask, bn_axis, data_axis):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, states), grads = grad_fn(params, states, x, y, mask, bn_axis=bn_axis,
                                    data_axis=data_axis)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, states, loss

  if mode == "single":
    return jax.jit(lambda p, o, s, x, y, m: step(p, o, s, x, y, m, None, None))
  data = P("data")
  if mode == "sync":
    # Synchronized statistics are replicated: the states are P() in and out.
    body = lambda p, o, s, x, y, m: step(p, o, s, x, y, m, "data", "data")
    state_spec = P()
  else:
    # Per-device statistics: each device keeps its own states, stacked along 'data'.
    def body(p, o, s, x, y, m):
      p, o, s, loss = step(p, o, jax.tree.map(lambda a: a[0], s), x, y, m, None, "data")
      return p, o, jax.tree.map(lambda a: a[None], s), loss
    state_spec = data
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), state_spec, data, data, data),
                               out_specs=(P(), P(), state_spec, P())))


def train(mode: str, epochs: int, train_data):
  mesh = jax.make_mesh((DEVICES,), ("data",))
  params, states = init_params()
  rows = NamedSharding(mesh, P("data"))
  tx = optax.sgd(LR, momentum=0.9)
  opt_state = tx.init(params)
  if mode != "single":
    # Place everything as the step returns it, so that the step compiles once.
    replicated = NamedSharding(mesh, P())
    params, opt_state = jax.device_put((params, opt_state), replicated)
    if mode == "local":
      states = jax.device_put(jax.tree.map(lambda a: jnp.stack([a] * DEVICES), states), rows)
    else:
      states = jax.device_put(states, replicated)
  step = make_step(tx, mode, mesh)
  losses = []
  for xb, yb, mb in batches(*train_data, epochs):
    if mode != "single":
      xb, yb, mb = (jax.device_put(a, rows) for a in (xb, yb, mb))
    params, opt_state, states, loss = step(params, opt_state, states, xb, yb, mb)
    # Wait for each step: with 8 fake devices on a few cores, letting several steps queue up
    # can starve XLA:CPU's collective rendezvous of threads.
    losses.append(float(loss))
  return params, states, np.asarray(losses)


@jax.jit
def _eval_logits(params, states, x):
  return forward(params, states, x, None, training=False)[0]


def accuracy(params, states, test_data) -> float:
  x, y = test_data
  logits = _eval_logits(params, states, jnp.asarray(x))
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


def main(argv=None) -> dict[str, np.ndarray]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 epochs instead of 15")
  args = parser.parse_args(argv)
  epochs = 2 if args.quick else 15
  assert jax.device_count() >= DEVICES, f"need {DEVICES} devices, got {jax.device_count()}"
  train_data, test_data = load_data()
  steps_per_epoch = -(-len(train_data[1]) // BATCH)
  print(f"digits: {len(train_data[1])} train / {len(test_data[1])} test images, global batch "
        f"{BATCH} = {DEVICES} devices x {BATCH // DEVICES}, {epochs} epochs x "
        f"{steps_per_epoch} steps (last batch of each epoch: {len(train_data[1]) % BATCH} "
        f"images, devices 5-7 hold only padding)")
  names = {"single": "single device", "sync": "8 devices, synchronized BN",
           "local": "8 devices, per-device BN"}
  results = {}
  for mode in names:
    t0 = time.perf_counter()
    results[mode] = train(mode, epochs, train_data)
    print(f"  trained {names[mode]:<28} in {time.perf_counter() - t0:5.1f} s")
  loss = {m: r[2] for m, r in results.items()}

  print("\nmean training loss per epoch (every step's loss is that of the global batch), and the "
        "largest\nper-step difference from the single-device run within the epoch")
  print(f"{'epoch':>5}  {'single device':>13}  {'synchronized BN':>15}  {'max |diff|':>10}  "
        f"{'per-device BN':>13}  {'max |diff|':>10}")
  for e in range(epochs):
    sl = slice(e * steps_per_epoch, (e + 1) * steps_per_epoch)
    d_sync = np.max(np.abs(loss["sync"][sl] - loss["single"][sl]))
    d_local = np.max(np.abs(loss["local"][sl] - loss["single"][sl]))
    print(f"{e + 1:>5}  {loss['single'][sl].mean():>13.6f}  {loss['sync'][sl].mean():>15.6f}  "
          f"{d_sync:>10.1e}  {loss['local'][sl].mean():>13.6f}  {d_local:>10.1e}")
  first = slice(0, steps_per_epoch)
  print(f"\nfirst epoch, max |loss - loss(single device)|: synchronized BN "
        f"{np.max(np.abs(loss['sync'][first] - loss['single'][first])):.2e}, per-device BN "
        f"{np.max(np.abs(loss['local'][first] - loss['single'][first])):.2e}")
  print("(synchronized BN differs from one device only in the order of float32 additions. SGD "
        "amplifies\nrounding differences over many steps: late in training, two runs of the "
        "single-device model\non a multi-threaded CPU already differ by about as much.)")

  # Evaluation uses the running statistics.
  p_single, s_single, _ = results["single"]
  p_local, s_local, _ = results["local"]
  print("\ntest accuracy with running statistics")
  print(f"  single device:                          {accuracy(p_single, s_single, test_data):.4f}")
  print(f"  8 devices, synchronized BN:             "
        f"{accuracy(results['sync'][0], results['sync'][1], test_data):.4f}")
  counts = np.asarray(s_local["bn1"].count)
  spread = float(np.max(np.ptp(np.asarray(s_local["bn1"].mean), axis=0)))
  # Merge the 8 per-device states where they live: two all-reduces for both layers, and the
  # result is replicated (out_specs=P()).
  mesh = jax.make_mesh((DEVICES,), ("data",))
  merge = jax.shard_map(lambda s: jn.sync_running_stats(jax.tree.map(lambda a: a[0], s),
                                                             axis_name="data"),
                        mesh=mesh, in_specs=P("data"), out_specs=P())
  merged = jax.jit(merge)(s_local)
  s_local = jax.tree.map(np.asarray, s_local)  # on the host, to look at each device's state
  print(f"  8 devices, per-device BN, device 0's running statistics: "
        f"{accuracy(p_local, jax.tree.map(lambda a: a[0], s_local), test_data):.4f}")
  print(f"  8 devices, per-device BN, merged by jaxnorm.sync_running_stats: "
        f"{accuracy(p_local, merged, test_data):.4f}")
  print(f"  (per-device running means of bn1 differ by up to {spread:.3g} across devices; "
        f"update counts per device: {counts.tolist()})")
  return loss


if __name__ == "__main__":
  main()
