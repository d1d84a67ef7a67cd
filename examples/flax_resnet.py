"""A small ResNet on scikit-learn's digits, with flax's normalization layers and with jaxnorm's.

The same model is written once for flax.linen and once for flax.nnx; the normalization layers
come from a module passed in, which is the one-line swap a user makes:

    from flax import linen as norms          # flax's BatchNorm, GroupNorm, LayerNorm
    from jaxnorm import linen as norms       # jaxnorm's drop-in replacements

(and `from flax import nnx as norms` / `from jaxnorm import nnx as norms` for nnx). Each
version is trained with optax from the same initial variables on the same batches, once with
each set of layers, and the script prints both test accuracies, how far apart the running
statistics (`batch_stats`) and the logits end up, and the wall time. The trained jaxnorm linen
model is then folded as it is written (`jaxnorm.linen.fold_model`) and its logits compared.

Run:  python examples/flax_resnet.py            (about a minute on 2 CPU cores)
      python examples/flax_resnet.py --quick    (a few seconds of training; used by the tests)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from sklearn.datasets import load_digits

import jaxnorm.linen
import jaxnorm.nnx


def load_data(seed: int = 0):
  """Digits as (N, 8, 8, 1) float32 in [0, 1], split 80/20."""
  digits = load_digits()
  x = (digits.images[..., None] / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.RandomState(seed).permutation(len(x))
  n_train = int(0.8 * len(x))
  tr, te = order[:n_train], order[n_train:]
  return (x[tr], y[tr]), (x[te], y[te])


def batches(n: int, batch_size: int, steps: int, seed: int = 1):
  rs = np.random.RandomState(seed)
  return [rs.choice(n, batch_size, replace=False) for _ in range(steps)]


# --- linen ------------------------------------------------------------------------------------

class LinenBlock(nn.Module):
  norms: Any
  width: int
  group_norm: bool = False
  folded: bool = False  # for jaxnorm.linen.fold_batch_norms (fold_model needs no flag)

  @nn.compact
  def __call__(self, x, train: bool):
    fold = self.folded and not self.group_norm

    def norm():
      if self.group_norm:
        return lambda h: self.norms.GroupNorm(num_groups=4)(h)
      if fold:
        return lambda h: h
      return lambda h: self.norms.BatchNorm(use_running_average=not train, momentum=0.9)(h)

    h = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=fold)(x)))
    h = norm()(nn.Conv(self.width, (3, 3), use_bias=fold)(h))
    return nn.relu(x + h)


class LinenResNet(nn.Module):
  """Conv stem with BatchNorm, residual blocks (BatchNorm or GroupNorm), LayerNorm head."""

  norms: Any  # flax.linen or jaxnorm.linen
  width: int = 16
  blocks: tuple[str, ...] = ("batch", "group")
  folded: bool = False  # for jaxnorm.linen.fold_batch_norms (fold_model needs no flag)

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3), use_bias=self.folded)(x)
    if not self.folded:
      x = self.norms.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    for kind in self.blocks:
      x = LinenBlock(self.norms, self.width, group_norm=kind == "group",
                     folded=self.folded)(x, train)
    x = self.norms.LayerNorm()(x.mean(axis=(1, 2)))
    return nn.Dense(10)(x)


def linen_fold_pairs(blocks: tuple[str, ...]) -> dict[str, str]:
  """The (convolution, BatchNorm) pairs of `LinenResNet` for `jaxnorm.linen.fold_batch_norms`;
  `LinenResNet(..., folded=True)` is the architecture without those BatchNorms."""
  pairs = {"Conv_0": "BatchNorm_0"}
  for i, kind in enumerate(blocks):
    if kind == "batch":
      pairs.update({f"LinenBlock_{i}/Conv_{j}": f"LinenBlock_{i}/BatchNorm_{j}" for j in (0, 1)})
  return pairs


def init_linen(data, width: int, blocks: tuple[str, ...]):
  """Initial variables; flax's and jaxnorm's models have the same tree (same names, shapes,
  dtypes and values), so both runs start from these."""
  model = LinenResNet(nn, width, blocks)
  return jax.jit(model.init, static_argnames="train")(jax.random.key(0), data[0][0][:2],
                                                      train=False)


def train_linen(norms, data, steps: int, width: int, blocks: tuple[str, ...], batch_size: int,
                variables):
  """Trains `LinenResNet(norms)` from `variables`; returns (accuracy, variables, test logits,
  seconds)."""
  (xtr, ytr), (xte, yte) = data
  model, tx = LinenResNet(norms, width, blocks), optax.adam(3e-3)
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

  start = time.perf_counter()
  for idx in batches(len(xtr), batch_size, steps):
    params, stats, opt_state, _ = step(params, stats, opt_state, xtr[idx], ytr[idx])
  variables = {"params": params, "batch_stats": stats}
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, xte)
  jax.block_until_ready(logits)
  seconds = time.perf_counter() - start
  return float((logits.argmax(-1) == yte).mean()), variables, logits, seconds


def linen_layer_difference(variables, x, width, blocks):
  """One training-mode pass of flax's and jaxnorm's model with the same variables: the largest
  difference of the updated `batch_stats` and of the outputs (the layers' own difference,
  without the divergence that training amplifies)."""
  out = []
  for norms in (nn, jaxnorm.linen):
    model = LinenResNet(norms, width, blocks)
    run = jax.jit(lambda v, x, model=model: model.apply(v, x, train=True,
                                                        mutable=["batch_stats"]))
    out.append(run(variables, x))
  return _max_diff(out[0][1], out[1][1]), _max_diff(out[0][0], out[1][0])


def fold_linen(variables, x, width, blocks):
  """Folds the trained jaxnorm model as it is written (`jaxnorm.linen.fold_model`, no `folded`
  flag needed); returns the `Folding` and the largest difference of its logits from the
  unfolded model's."""
  model = LinenResNet(jaxnorm.linen, width, blocks)
  folding = jaxnorm.linen.fold_model(model, variables, x, train=False)
  original = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  folded = jax.jit(lambda v, x: folding.apply(v, x, train=False))(folding.variables, x)
  return folding, _max_diff(original, folded)


# --- nnx --------------------------------------------------------------------------------------

class NNXBlock(nnx.Module):
  def __init__(self, norms, width: int, group_norm: bool, rngs: nnx.Rngs):
    def norm():
      if group_norm:
        return norms.GroupNorm(width, num_groups=4, rngs=rngs)
      return norms.BatchNorm(width, momentum=0.9, rngs=rngs)

    self.conv1 = nnx.Conv(width, width, (3, 3), use_bias=False, rngs=rngs)
    self.norm1 = norm()
    self.conv2 = nnx.Conv(width, width, (3, 3), use_bias=False, rngs=rngs)
    self.norm2 = norm()

  def __call__(self, x):
    h = nnx.relu(self.norm1(self.conv1(x)))
    return nnx.relu(x + self.norm2(self.conv2(h)))


class NNXResNet(nnx.Module):
  """The same network as `LinenResNet`, in nnx; `norms` is flax.nnx or jaxnorm.nnx."""

  def __init__(self, norms, width: int, blocks: tuple[str, ...], rngs: nnx.Rngs):
    self.stem = nnx.Conv(1, width, (3, 3), use_bias=False, rngs=rngs)
    self.stem_norm = norms.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.blocks = nnx.List([NNXBlock(norms, width, kind == "group", rngs) for kind in blocks])
    self.head_norm = norms.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(self.head_norm(x.mean(axis=(1, 2))))


def train_nnx(norms, data, steps: int, width: int, blocks: tuple[str, ...], batch_size: int,
              variables=None):
  """Trains `NNXResNet(norms)` (the same initial state for flax's and jaxnorm's layers: same
  `rngs` draws); returns (accuracy, model, test logits, seconds)."""
  (xtr, ytr), (xte, yte) = data
  model = NNXResNet(norms, width, blocks, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  start = time.perf_counter()
  for idx in batches(len(xtr), batch_size, steps):
    step(model, optimizer, xtr[idx], ytr[idx])
  model.eval()
  logits = nnx.jit(lambda m, x: m(x))(model, xte)
  jax.block_until_ready(logits)
  seconds = time.perf_counter() - start
  return float((logits.argmax(-1) == yte).mean()), model, logits, seconds


def nnx_layer_difference(trained, x, width, blocks):
  """As `linen_layer_difference`: flax's trained state in both models, one training pass."""
  out = []
  for norms in (nnx, jaxnorm.nnx):
    model = NNXResNet(norms, width, blocks, nnx.Rngs(1))
    nnx.update(model, nnx.clone(nnx.state(trained)))
    model.train()
    y = nnx.jit(lambda m, x: m(x))(model, x)
    out.append((y, nnx.state(model, nnx.BatchStat)))
  return _max_diff(out[0][1], out[1][1]), _max_diff(out[0][0], out[1][0])


def _max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main(argv: list[str] | None = None) -> dict[str, float]:
  """Trains the four runs and prints a comparison; returns the accuracies and differences."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="training steps per run")
  parser.add_argument("--width", type=int, default=16, help="channels of the ResNet")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--quick", action="store_true",
                      help="60 steps of a width-8 network with one residual block")
  args = parser.parse_args(argv)
  if args.quick:
    steps, width, blocks = 60, 8, ("group",)
  else:
    steps, width, blocks = args.steps, args.width, ("batch", "group")
  data = load_data()
  print(f"digits: {len(data[0][0])} train / {len(data[1][0])} test images; {steps} steps of "
        f"batch {args.batch_size}; width {width}, blocks {blocks}")
  x_probe = data[1][0][:128]
  results = {}
  for api, train, layer_diff, theirs, ours in (
      ("linen", train_linen, linen_layer_difference, nn, jaxnorm.linen),
      ("nnx", train_nnx, nnx_layer_difference, nnx, jaxnorm.nnx)):
    init = init_linen(data, width, blocks) if api == "linen" else None
    acc_t, trained_t, logits_t, sec_t = train(theirs, data, steps, width, blocks,
                                              args.batch_size, init)
    acc_o, trained_o, logits_o, sec_o = train(ours, data, steps, width, blocks,
                                              args.batch_size, init)
    stats_t, stats_o = ((trained_t["batch_stats"], trained_o["batch_stats"]) if api == "linen"
                        else (nnx.state(trained_t, nnx.BatchStat),
                              nnx.state(trained_o, nnx.BatchStat)))
    d_stats, d_logits = _max_diff(stats_t, stats_o), _max_diff(logits_t, logits_o)
    d_layer_stats, d_layer_out = layer_diff(trained_t, x_probe, width, blocks)
    print(f"{api:5s} flax.{api:5s}    test accuracy {acc_t:.4f}  ({sec_t:.1f} s incl. compile)")
    print(f"{api:5s} jaxnorm.{api:5s} test accuracy {acc_o:.4f}  ({sec_o:.1f} s incl. compile)")
    print(f"{api:5s} after training separately: max |batch_stats difference| {d_stats:.2e}, "
          f"max |test logit difference| {d_logits:.2e}")
    print(f"{api:5s} same variables, one training pass: max |batch_stats difference| "
          f"{d_layer_stats:.2e}, max |logit difference| {d_layer_out:.2e}")
    if api == "linen":
      folding, d_fold = fold_linen(trained_o, x_probe, width, blocks)
      print(f"linen jaxnorm.linen.fold_model: {len(folding.folded)} BatchNorms folded "
            f"({', '.join(folding.folded.values())}), {len(folding.unfolded)} left; max |logit "
            f"difference| {d_fold:.2e}")
      results["linen_fold_logit_diff"] = d_fold
    results.update({f"{api}_flax_acc": acc_t, f"{api}_jaxnorm_acc": acc_o,
                    f"{api}_stats_diff": d_stats, f"{api}_logit_diff": d_logits,
                    f"{api}_layer_stats_diff": d_layer_stats,
                    f"{api}_layer_logit_diff": d_layer_out})
  return results


if __name__ == "__main__":
  main()
