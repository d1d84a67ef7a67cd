"""Precise BatchNorm statistics: what recomputing the population statistics recovers.

    python examples/precise_bn.py [--out DIR] [--quick] [--seeds N]

The setting of `examples/bn_vs_ln.py` (whose data, model and training code this imports): the
digits CNN with BatchNorm, trained at batch sizes 2 and 4 with the same recipe (8 epochs over
1280 images, SGD with momentum, linearly scaled learning rate, BN momentum 0.9). After
training, each model is evaluated twice on the 512 test images:

* with its running averages (what training left in `batch_stats`), and
* with the population statistics of every BatchNorm's input over the 1280 training images,
  recomputed with the weights frozen by `jaxnorm.linen.recompute_batch_stats` (evaluation
  mode: layer by layer, each BatchNorm seeing the ones before it with their new statistics),
* and, for comparison, with statistics recomputed in training mode over batches of the
  training batch size (fvcore's `update_bn_stats`: every batch normalized by its own
  statistics, so each layer gets the population statistics of the input it saw in training).

The trained functional parameters are loaded into a flax.linen version of the same CNN built
with `jaxnorm.linen.BatchNorm` (checked: it gives the functional model's test logits), because
the tool works on flax models. It writes `DIR/precise_bn.json` (default `results/`) and prints
a table. `--quick` trains 100 steps at batch size 2 only, with 1 seed (a smoke test; the
numbers mean little).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import bn_vs_ln as demo  # examples/ is on sys.path when this file runs as a script
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import jaxnorm as jn
from jaxnorm import linen as jnn

BATCH_SIZES = (2, 4)
QUICK_STEPS = 100
RECOMPUTE_BATCH = 256  # 1280 training images in 5 batches (any size gives the same statistics)


class DigitsCNN(nn.Module):
  """`bn_vs_ln.apply_model`'s CNN with BatchNorm ("batch" variant), as a flax.linen module."""

  @nn.compact
  def __call__(self, x, train: bool):
    def p(name, shape):
      return self.param(name, nn.initializers.zeros, shape)

    def bn(h, name):
      return jnn.BatchNorm(use_running_average=not train, momentum=demo.BN_MOMENTUM,
                           epsilon=demo.EPSILON, name=name)(h)

    c1, c2, hidden = demo.C1, demo.C2, demo.HIDDEN
    h = jax.nn.relu(bn(demo.conv3x3(x, p("conv1", (3, 3, 1, c1))), "n1"))
    h = jax.nn.relu(bn(demo.conv3x3(h, p("conv2", (3, 3, c1, c2)), stride=2), "n2"))
    h = h.reshape(h.shape[0], -1) @ p("dense", (4 * 4 * c2, hidden))
    h = jax.nn.relu(bn(h, "n3"))
    return h @ p("out", (hidden, 10)) + p("out_bias", (10,))


def to_linen(params: dict[str, jax.Array], state: dict[str, jn.BatchNormState]
             ) -> dict[str, Any]:
  """One replica of `bn_vs_ln`'s (params, state) as DigitsCNN's variables."""
  p: dict[str, Any] = {k: params[k] for k in ("conv1", "conv2", "dense", "out", "out_bias")}
  stats = {}
  for n in ("n1", "n2", "n3"):
    p[n] = {"scale": params[n + "_scale"], "bias": params[n + "_bias"]}
    stats[n] = {"mean": state[n].mean, "var": state[n].var}
  return {"params": p, "batch_stats": stats}


def train(batch_size: int, epochs: int, seeds: int, data: dict[str, Any],
          steps: int | None = None):
  """bn_vs_ln's training of the BatchNorm variant, every seed a replica of one program
  (only the first `steps` steps of each epoch if given)."""
  keys = jax.random.split(jax.random.key(0), seeds)  # the initial weights bn_vs_ln uses
  params0, state0 = jax.vmap(demo.init_model)(keys)
  variants = jnp.full(seeds, demo.NORMS.index("batch"))
  orders = np.stack([demo.shuffles(1000 * batch_size + s, epochs, batch_size)
                     for s in range(seeds)]).astype(np.int32)[:, :, :steps]
  params, state, _, logits = demo.make_train(batch_size, epochs)(
      variants, params0, state0, orders, jnp.asarray(data["x_train"]),
      jnp.asarray(data["y_train"]), jnp.asarray(data["x_test"]))
  return params, state, logits


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="results/", help="output directory (default: results/)")
  ap.add_argument("--quick", action="store_true",
                  help=f"{QUICK_STEPS} steps at batch size 2, 1 seed (a smoke run)")
  ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
  args = ap.parse_args(argv)
  t_start = time.perf_counter()
  epochs = 1 if args.quick else demo.FULL["epochs"]
  seeds = args.seeds or (1 if args.quick else demo.FULL["seeds"])
  data = demo.load_data()
  x_test, y_test = jnp.asarray(data["x_test"]), data["y_test"]
  train_batches = [jnp.asarray(data["x_train"][i:i + RECOMPUTE_BATCH])
                   for i in range(0, demo.N_TRAIN, RECOMPUTE_BATCH)]
  model = DigitsCNN()
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  batch_sizes = BATCH_SIZES[:1] if args.quick else BATCH_SIZES
  runs = []
  for b in batch_sizes:
    t = time.perf_counter()
    params, state, logits = train(b, epochs, seeds, data, QUICK_STEPS if args.quick else None)
    jax.block_until_ready(params)
    train_s = time.perf_counter() - t
    for s in range(seeds):
      variables = to_linen(*jax.tree.map(lambda a, s=s: a[s], (params, state)))
      running_logits = evaluate(variables, x_test)
      t = time.perf_counter()
      precise = jnn.recompute_batch_stats(model, variables, train_batches, train=False)
      recompute_s = time.perf_counter() - t
      precise_logits = evaluate(precise, x_test)
      small = [jnp.asarray(data["x_train"][i:i + b]) for i in range(0, demo.N_TRAIN, b)]
      fvcore = jnn.recompute_batch_stats(model, variables, small, train=True)
      fvcore_logits = evaluate(fvcore, x_test)
      # The first BatchNorm's input does not depend on any other BatchNorm: its population
      # statistics, computed directly over the whole training set, must be what was stored.
      h1 = demo.conv3x3(jnp.asarray(data["x_train"]), variables["params"]["conv1"])
      direct = jn.moments(h1, (0, 1, 2))
      got = precise["batch_stats"]["n1"]
      runs.append({
          "batch_size": b, "seed": s,
          "accuracy_running_averages": float((running_logits.argmax(-1) == y_test).mean()),
          "accuracy_recomputed": float((precise_logits.argmax(-1) == y_test).mean()),
          "accuracy_recomputed_training_mode": float(
              (fvcore_logits.argmax(-1) == y_test).mean()),
          "max_abs_logit_diff_linen_vs_functional": float(
              jnp.abs(running_logits - logits[s]).max()),
          "max_abs_logit_diff_functional": float(jnp.abs(logits[s]).max()),
          "n1_max_abs_diff_mean_vs_direct": float(jnp.abs(got["mean"] - direct.mean).max()),
          "n1_max_abs_diff_var_vs_direct": float(jnp.abs(got["var"] - direct.var).max()),
          "n1_max_abs_input": float(jnp.abs(h1).max()),
          "max_rel_change_var": {n: float(jnp.abs(precise["batch_stats"][n]["var"]
                                                  / variables["batch_stats"][n]["var"]
                                                  - 1).max()) for n in ("n1", "n2", "n3")},
          "train_seconds_all_seeds": train_s,
          "recompute_seconds": recompute_s,
      })
  summary = {}
  for b in batch_sizes:
    rs = [r for r in runs if r["batch_size"] == b]
    summary[str(b)] = {
        k: {"mean": float(np.mean([r[k] for r in rs])),
            "std": float(np.std([r[k] for r in rs], ddof=1)) if len(rs) > 1 else 0.0}
        for k in ("accuracy_running_averages", "accuracy_recomputed",
                  "accuracy_recomputed_training_mode")}
  results = {
      "dataset": "scikit-learn digits, bn_vs_ln.py's split (1280 train / 512 test)",
      "config": {"batch_sizes": list(batch_sizes), "seeds": seeds, "epochs": epochs,
                 "steps_per_epoch": ({str(b): QUICK_STEPS if args.quick else demo.N_TRAIN // b
                                      for b in batch_sizes}),
                 "bn_momentum": demo.BN_MOMENTUM, "epsilon": demo.EPSILON,
                 "recompute": (f"jaxnorm.linen.recompute_batch_stats(train=False) over the "
                               f"{demo.N_TRAIN} training images in batches of "
                               f"{RECOMPUTE_BATCH}: layer by layer, exact population "
                               f"statistics; training mode: over batches of the training "
                               f"batch size, one pass"),
                 "quick": bool(args.quick), "jax": jax.__version__,
                 "jaxnorm": jn.__version__, "backend": jax.default_backend()},
      "runs": runs,
      "summary": summary,
      "wall_seconds": time.perf_counter() - t_start,
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "precise_bn.json").write_text(json.dumps(results, indent=1, allow_nan=False))
  print(f"\nBatchNorm test accuracy (%), mean±std over {seeds} seed(s), {epochs} epoch(s)")
  print(f"{'batch size':>12}{'running averages':>20}{'recomputed':>16}"
        f"{'recomputed (training mode)':>30}")
  for b in batch_sizes:
    s = summary[str(b)]

    def pm(d):
      return f"{100 * d['mean']:.1f}±{100 * d['std']:.1f}"

    print(f"{b:>12}{pm(s['accuracy_running_averages']):>20}{pm(s['accuracy_recomputed']):>16}"
          f"{pm(s['accuracy_recomputed_training_mode']):>30}")
  print(f"\nWrote {out / 'precise_bn.json'} in {results['wall_seconds']:.0f} s.")
  return results


if __name__ == "__main__":
  main()
