"""Whole training steps of flax models with flax's or jaxnorm's norms, as compiled.

    python benchmarks/compiled_steps.py [--platforms h100,v5e] [--json OUT]

A TransformerLM with the default configuration of flax's examples/lm1b (6 pre-LayerNorm
blocks, width 512, 8 heads, MLP 2048, vocabulary 30000, a per-device batch of 32 sequences of
128 tokens; relu MLPs, fixed sinusoidal position embeddings and a causal mask as there, without
dropout), a ResNet-like one (BatchNorm after every
convolution, the convolutions without bias as in flax's examples/imagenet, 4 residual blocks of
128 channels on 64 images of 32x32) and the ResNet50 of examples/imagenet (its default model,
32 images of 224x224 per device), each in float32 and with
bfloat16 computation (`dtype=jnp.bfloat16` on every module, float32 parameters, as flax's
examples do). One step: the loss, its gradients and an `optax.adam` update, under `jax.jit`,
compiled deviceless as in `benchmarks/compiled.py`, whose device-memory byte count and kernel
count it reports: flax.linen's norm layers against `jaxnorm.linen`'s, which take the same
arguments. The compilers' structure and byte counts, not timings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _hlo_bytes  # noqa: E402
import compiled  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

import jaxnorm.linen as jnn  # noqa: E402

LIBRARIES = {"flax.linen": nn, "jaxnorm": jnn}


class Block(nn.Module):
  norms: object
  dtype: object
  heads: int = 8

  @nn.compact
  def __call__(self, h, mask):
    d = h.shape[-1]
    a = self.norms.LayerNorm(dtype=self.dtype)(h)
    a = nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype)(a, a, mask=mask)
    h = h + a
    m = self.norms.LayerNorm(dtype=self.dtype)(h)
    m = nn.Dense(4 * d, dtype=self.dtype)(m)
    m = nn.Dense(d, dtype=self.dtype)(nn.relu(m))
    return h + m


def _sinusoids(length: int, width: int) -> jax.Array:
  """lm1b's fixed position embeddings: sines and cosines of geometric frequencies."""
  pos = jnp.arange(length, dtype=jnp.float32)[:, None]
  freq = jnp.exp(-jnp.log(10000.0) * jnp.arange(0, width, 2, dtype=jnp.float32) / width)
  return jnp.concatenate([jnp.sin(pos * freq), jnp.cos(pos * freq)], axis=-1)[None]


class TransformerLM(nn.Module):
  """lm1b's decoder: token embeddings plus fixed position embeddings, causal self-attention."""

  norms: object
  dtype: object
  vocab: int = 30000
  width: int = 512
  layers: int = 6

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, self.width, dtype=self.dtype)(tokens)
    h = h + _sinusoids(tokens.shape[1], self.width).astype(h.dtype)
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      h = Block(self.norms, self.dtype)(h, mask)
    h = self.norms.LayerNorm(dtype=self.dtype)(h)
    return nn.Dense(self.vocab, dtype=self.dtype)(h)


class MLP(nn.Module):
  """A multilayer perceptron with LayerNorm after every hidden Dense layer."""

  norms: object
  dtype: object
  width: int = 1024
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    for _ in range(self.layers):
      x = nn.relu(self.norms.LayerNorm(dtype=self.dtype)(nn.Dense(self.width, dtype=self.dtype)(x)))
    return nn.Dense(10, dtype=self.dtype)(x)


class ResNet(nn.Module):
  norms: object
  dtype: object
  width: int = 128
  blocks: int = 4

  @nn.compact
  def __call__(self, x):
    def bn():
      return self.norms.BatchNorm(use_running_average=False, momentum=0.9, dtype=self.dtype)

    h = nn.relu(bn()(nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)))
    for _ in range(self.blocks):
      r = nn.relu(bn()(nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(h)))
      r = bn()(nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(r))
      h = nn.relu(h + r)
    return nn.Dense(10, dtype=self.dtype)(h.mean((1, 2)))


class Bottleneck(nn.Module):
  """examples/imagenet's BottleneckResNetBlock: 1x1, 3x3 (strided), 1x1 convolutions, each
  followed by BatchNorm (the last one's scale initialized to zeros), and a projected shortcut
  where the shape changes."""

  norms: object
  dtype: object
  filters: int
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    def conv(features, kernel, strides=(1, 1)):
      return nn.Conv(features, kernel, strides, use_bias=False, dtype=self.dtype)

    def bn(**kwargs):
      return self.norms.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                                  dtype=self.dtype, **kwargs)

    y = nn.relu(bn()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(bn()(conv(self.filters, (3, 3), self.strides)(y)))
    y = bn(scale_init=nn.initializers.zeros)(conv(self.filters * 4, (1, 1))(y))
    if x.shape != y.shape:
      x = bn()(conv(self.filters * 4, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """examples/imagenet's default model: a strided 7x7 stem, max pooling, 3-4-6-3 bottleneck
  blocks of 64 to 512 filters, 1000 classes."""

  norms: object
  dtype: object

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                dtype=self.dtype)(x)
    x = nn.relu(self.norms.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                                     dtype=self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, blocks in enumerate((3, 4, 6, 3)):
      for j in range(blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = Bottleneck(self.norms, self.dtype, 64 * 2 ** i, strides)(x)
    return nn.Dense(1000, dtype=self.dtype)(x.mean((1, 2)))


def step_fn(model, has_stats: bool):
  opt = optax.adam(1e-3)

  def loss_fn(params, stats, inputs, labels):
    variables = {"params": params, **({"batch_stats": stats} if has_stats else {})}
    if has_stats:
      logits, new = model.apply(variables, inputs, mutable=["batch_stats"])
      new = new["batch_stats"]
    else:
      logits, new = model.apply(variables, inputs), stats
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()
    return loss, new

  def step(params, stats, opt_state, inputs, labels):
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, inputs,
                                                                   labels)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new, opt_state, loss

  return step, opt


# name: (model, inputs, labels); `--models` picks among them.
MODELS = {
    "MLP": (MLP, jax.ShapeDtypeStruct((256, 784), jnp.float32),
            jax.ShapeDtypeStruct((256,), jnp.int32)),
    "TransformerLM-256": (functools.partial(TransformerLM, vocab=8192, width=256, layers=4),
                          jax.ShapeDtypeStruct((32, 128), jnp.int32),
                          jax.ShapeDtypeStruct((32, 128), jnp.int32)),
    "TransformerLM": (TransformerLM, jax.ShapeDtypeStruct((32, 128), jnp.int32),
                      jax.ShapeDtypeStruct((32, 128), jnp.int32)),
    "ResNet": (ResNet, jax.ShapeDtypeStruct((64, 32, 32, 128), jnp.float32),
               jax.ShapeDtypeStruct((64,), jnp.int32)),
    "ResNet50": (ResNet50, jax.ShapeDtypeStruct((32, 224, 224, 3), jnp.float32),
                 jax.ShapeDtypeStruct((32,), jnp.int32)),
}


def measure(platforms, models=tuple(MODELS), log=print) -> list[dict]:
  records = []
  for plat in platforms:
    missing = compiled.available(plat)
    if missing:
      log(f"{plat}: skipped, this Python lacks {missing}")
      continue
    sh = SingleDeviceSharding(compiled.topology(plat).devices[0])
    for name in models:
      make, inputs, labels = MODELS[name]
      for dtype in (jnp.float32, jnp.bfloat16):
        row = {}
        for lib, norms in LIBRARIES.items():
          model = make(norms, dtype)
          variables = jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros(inputs.shape, inputs.dtype))
          params = variables["params"]
          stats = variables.get("batch_stats", {})
          step, opt = step_fn(model, "batch_stats" in variables)
          opt_state = jax.eval_shape(opt.init, params)
          args = jax.tree.map(
              lambda a, sh=sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
              (params, stats, opt_state, inputs, labels))
          a = _hlo_bytes.analyze(jax.jit(step).lower(*args).compile().as_text())
          row[lib] = a
          records.append({"platform": plat, "model": name, "dtype": jnp.dtype(dtype).name,
                          "lib": lib, "kernels": a["kernels"], "bytes": a["bytes"]})
        j, f = row["jaxnorm"], row["flax.linen"]
        log(f"{plat:5s} {name:17s} {jnp.dtype(dtype).name:8s} flax.linen {f['kernels']:4d} "
            f"kernels {f['bytes'] / 2**20:8.1f} MiB | jaxnorm {j['kernels']:4d} kernels "
            f"{j['bytes'] / 2**20:8.1f} MiB ({j['bytes'] / f['bytes']:.3f}x)")
  return records


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--platforms", default="h100,v5e")
  ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
  ap.add_argument("--json")
  args = ap.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  if any(m not in MODELS for m in models):
    ap.error(f"unknown --models {models}; choose from {list(MODELS)}")
  records = measure([p for p in args.platforms.split(",") if p], models)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "records": records}, f, indent=1)


if __name__ == "__main__":
  main()
