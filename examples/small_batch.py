"""Where batch norm fails at small batches, and its remedies side by side, measured.

    python examples/small_batch.py [--out DIR] [--quick] [--seeds N]

The CNN and data of `examples/bn_vs_ln.py` (scikit-learn's bundled digits, 1280 train / 512
test images, no download), trained data-parallel over 8 simulated devices with a per-device
batch of 2 (and 4), with five normalizers:

* `bn`: per-device BN (each device normalizes its own 2 examples; gradients are averaged);
* `sync_bn`: BN synchronized over the 8 devices (`axis_name`: statistics of 16 examples);
* `renorm`: per-device batch renormalization, `r_max` ramped 1 -> 3 and `d_max` 0 -> 5 over
  the first half of training (traced values: one compiled program);
* `group`, `layer`: GroupNorm (4 groups) and LayerNorm, batch-independent.

Then the ablation: BN trained on one device at batch 128 with ghost batches
(`virtual_batch_size`) of 2 and 4, next to plain BN at batch 128, 2 and 4. The optimizer sees
batch 128 in the ghost runs and only the statistics are small: if they collapse like batch 2,
the failure is the statistics' batch size, not the optimizer's budget.

The devices are simulated with `jax.vmap(..., axis_name="devices")`, which runs the same
collectives as `jax.shard_map` over 8 devices (the tests check that the two agree) in one
program. Budget: the same epochs for every run; SGD with momentum 0.9, cosine-decayed
`lr = 0.1 * global_batch / 32`. BN variants are evaluated with running statistics (averaged
over the devices for per-device BN). Noise rule, fixed before the runs: a difference of seed
means counts only if it exceeds two standard errors (Welch) and one test example (1/512).

It writes `results.json` (runs, table, verdict), `small_batch.png` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnorm as jn

# The CNN, data and noise rule of the BN-vs-LN demonstration; importing it also sets its
# cheap-compilation XLA flags (read when JAX's backend starts, on first use).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bn_vs_ln as base

plt = base.plt
DEVICES = 8
VARIANTS = ("bn", "sync_bn", "renorm", "group", "layer")
LABELS = {"bn": "BN (per device)", "sync_bn": "sync BN (8 devices)", "renorm": "batch renorm",
          "group": "GroupNorm", "layer": "LayerNorm"}
ABLATION = ("bn", "ghost2", "ghost4")  # at batch 128, one device
ABLATION_LABELS = {"bn": "BN", "ghost2": "BN, ghost batches of 2",
                   "ghost4": "BN, ghost batches of 4"}
FULL = {"per_device": (2, 4), "seeds": 3, "epochs": 6, "ablation_batch": 128,
        "plain_batches": (2, 4)}
QUICK = {"per_device": (2,), "seeds": 2, "epochs": 1, "ablation_batch": 128,
         "plain_batches": (2,)}


def apply(params, state, x, variant, names, *, training, axis_name=None, r_max=1.0,
          d_max=0.0):
  """bn_vs_ln's CNN with the normalizer `names[variant]` (`variant` may be traced)."""
  new_state = dict(state)
  kw = {"momentum": base.BN_MOMENTUM, "epsilon": base.EPSILON, "training": training}
  table = {
      "bn": lambda h, s, g, b: jn.batch_norm(h, s, g, b, **kw),
      "sync_bn": lambda h, s, g, b: jn.batch_norm(h, s, g, b, axis_name=axis_name, **kw),
      "renorm": lambda h, s, g, b: jn.batch_renorm(h, s, g, b, r_max=r_max, d_max=d_max, **kw),
      "ghost2": lambda h, s, g, b: jn.batch_norm(h, s, g, b, virtual_batch_size=2, **kw),
      "ghost4": lambda h, s, g, b: jn.batch_norm(h, s, g, b, virtual_batch_size=4, **kw),
      "group": lambda h, s, g, b: (jn.group_norm(h, g, b, num_groups=base.GROUPS,
                                                 epsilon=base.EPSILON), s),
      "layer": lambda h, s, g, b: (jn.layer_norm(h, g, b, reduction_axes=tuple(
          range(1, h.ndim)), epsilon=base.EPSILON), s),
  }

  def norm(h, name):
    g, b = params[name + "_scale"], params[name + "_bias"]
    branches = [lambda h, s, f=table[n]: f(h, s, g, b) for n in names]
    h, new_state[name] = jax.lax.switch(variant, branches, h, state[name])
    return h

  h = jax.nn.relu(norm(base.conv3x3(x, params["conv1"]), "n1"))
  h = jax.nn.relu(norm(base.conv3x3(h, params["conv2"], stride=2), "n2"))
  h = jax.nn.relu(norm(h.reshape(h.shape[0], -1) @ params["dense"], "n3"))
  return h @ params["out"] + params["out_bias"], new_state


def make_train(names, devices: int, per_device: int, epochs: int):
  """One program: vmap over replicas (variant, seed) of vmap over devices of a scan of steps."""
  global_batch = devices * per_device
  steps = base.N_TRAIN // global_batch
  total = epochs * steps
  tx = optax.sgd(optax.cosine_decay_schedule(0.1 * global_batch / 32, total), momentum=0.9)
  axis = "devices" if devices > 1 else None

  def on_device(variant, params, state, order, x_train, y_train, x_test):
    # order: (epochs * steps, per_device) indices of this device's examples.
    def loss_fn(params, state, xb, yb, r_max, d_max):
      logits, new_state = apply(params, state, xb, variant, names, training=True,
                                axis_name=axis, r_max=r_max, d_max=d_max)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new_state

    def step(carry, inputs):
      params, state, opt = carry
      t, idx = inputs
      ramp = jnp.minimum(1.0, t / (0.5 * total))  # renorm's schedule: traced, no retrace
      (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, state, x_train[idx], y_train[idx], 1.0 + 2.0 * ramp, 5.0 * ramp)
      if axis is not None:
        grads = jax.lax.pmean(grads, axis)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), state, opt), loss

    ts = jnp.arange(total, dtype=jnp.float32)
    (params, state, _), loss = jax.lax.scan(step, (params, state, tx.init(params)),
                                            (ts, order))
    if axis is not None:  # per-device running statistics: their average, for evaluation
      state = jax.tree.map(lambda a: jax.lax.pmean(a, axis) if a.dtype.kind == "f" else a,
                           state)
    logits = apply(params, state, x_test, variant, names, training=False)[0]
    return logits, loss[-steps:].mean()

  per_dev = jax.vmap(on_device, in_axes=(None, None, None, 0, None, None, None),
                     axis_name=axis) if axis else on_device
  return jax.jit(jax.vmap(per_dev, in_axes=(0, 0, 0, 0, None, None, None)))


def train(names, devices, per_device, cfg, data):
  """Test accuracy (variants, seeds) and final training loss, and the seconds it took."""
  t0 = time.perf_counter()
  global_batch = devices * per_device
  seeds = cfg["seeds"]
  variants, params, states, orders = [], [], [], []
  for v in range(len(names)):
    for s in range(seeds):
      p, st = base.init_model(jax.random.key(s))
      order = base.shuffles(s, cfg["epochs"], global_batch).reshape(-1, devices, per_device)
      variants.append(v)
      params.append(p)
      states.append(st)
      orders.append(order.transpose(1, 0, 2) if devices > 1 else order[:, 0])
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  fn = make_train(names, devices, per_device, cfg["epochs"])
  logits, loss = fn(jnp.asarray(variants, jnp.int32), stack(params), stack(states),
                    jnp.asarray(np.stack(orders)), data["x_train"], data["y_train"],
                    data["x_test"])
  if devices > 1:
    logits, loss = logits[:, 0], loss[:, 0]  # identical on every device after the pmean
  acc = (np.asarray(logits).argmax(-1) == data["y_test"][None]).mean(-1)
  return (acc.reshape(len(names), seeds), np.asarray(loss).reshape(len(names), seeds),
          time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="results/small_batch", help="output directory")
  ap.add_argument("--quick", action="store_true", help="a fast smoke run (1 epoch, 2 seeds)")
  ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
  args = ap.parse_args(argv)
  t_start = time.perf_counter()
  cfg = dict(QUICK if args.quick else FULL)
  if args.seeds is not None:
    cfg["seeds"] = args.seeds
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  data = base.load_data()
  floor = 1.0 / base.N_TEST

  acc: dict[tuple[str, str], np.ndarray] = {}
  loss: dict[tuple[str, str], np.ndarray] = {}
  seconds = {}
  for b in cfg["per_device"]:
    key = f"{b}x{DEVICES}"
    a, lo, seconds[key] = train(VARIANTS, DEVICES, b, cfg, data)
    for i, v in enumerate(VARIANTS):
      acc[(v, key)], loss[(v, key)] = a[i], lo[i]
  big = str(cfg["ablation_batch"])
  a, lo, seconds[big] = train(ABLATION, 1, cfg["ablation_batch"], cfg, data)
  for i, v in enumerate(ABLATION):
    acc[(v, big)], loss[(v, big)] = a[i], lo[i]
  for b in cfg["plain_batches"]:
    a, lo, seconds[str(b)] = train(("bn",), 1, b, cfg, data)
    acc[("bn", str(b))], loss[("bn", str(b))] = a[0], lo[0]

  # The ablation's verdict, by this rule: plain BN "fails" at batch k if it falls below BN at
  # batch 128 beyond the noise; where it fails, ghost batches of k at batch 128 "collapse like
  # batch k" if they fall below BN at 128 beyond the noise and by at least half of plain BN's
  # drop. The failure is the statistics' if the ghost batches collapse wherever BN fails.
  verdicts = []
  for k in (2, 4):
    if f"ghost{k}" not in ABLATION or k not in cfg["plain_batches"]:
      continue
    ghost, full, plain = acc[(f"ghost{k}", big)], acc[("bn", big)], acc[("bn", str(k))]
    drop = base.compare(full, ghost, floor)
    plain_cmp = base.compare(full, plain, floor)
    fails = plain_cmp["significant"] and plain_cmp["diff"] > 0
    collapses = (drop["significant"] and drop["diff"] > 0
                 and drop["diff"] >= 0.5 * plain_cmp["diff"])
    verdicts.append({
        "ghost_batch": k, "plain_bn_fails": bool(fails), "collapses": bool(collapses),
        "evidence": (f"BN at batch {big}: {base.pm(full)}%; with ghost batches of {k}: "
                     f"{base.pm(ghost)}% ({base.cmp_text(drop)}); plain BN at batch {k}: "
                     f"{base.pm(plain)}% ({base.cmp_text(plain_cmp)})."),
    })
  failing = [v for v in verdicts if v["plain_bn_fails"]]
  if failing and all(v["collapses"] for v in failing):
    verdict = ("The failure is the statistics' batch size: with the optimizer at batch "
               f"{big}, ghost batches of " + " and ".join(str(v["ghost_batch"]) for v in failing)
               + " collapse like plain BN at that batch size.")
  elif failing:
    verdict = ("Not (only) the statistics: where plain BN fails, ghost batches of the same size "
               f"at batch {big} do not collapse like it (the optimizer's budget matters too).")
  else:
    verdict = "Not decided: plain BN does not fail at any small batch size of this run."

  columns = [f"{b}x{DEVICES}" for b in cfg["per_device"]]
  table = [{"normalizer": LABELS[v], **{c: base.pm(acc[(v, c)]) for c in columns}}
           for v in VARIANTS]
  ablation = [{"run": f"{ABLATION_LABELS[v]} at batch {big}",
               "accuracy": base.pm(acc[(v, big)])} for v in ABLATION]
  ablation += [{"run": f"BN at batch {b}", "accuracy": base.pm(acc[("bn", str(b))])}
               for b in cfg["plain_batches"]]
  runs = [{"variant": v, "setting": c, "seed": s, "test_accuracy": float(a[s]),
           "final_train_loss": base.finite_or_none(loss[(v, c)][s])}
          for (v, c), a in acc.items() for s in range(cfg["seeds"])]
  results = {
      "dataset": "scikit-learn digits, 1280 train / 512 test (bn_vs_ln.load_data)",
      "config": {**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                 "devices": DEVICES, "quick": bool(args.quick),
                 "noise_rule": "difference of seed means > max(2 standard errors (Welch), "
                               "1/512)",
                 "budget": "same epochs for every run; SGD momentum 0.9, lr = 0.1 * "
                           "global_batch / 32, cosine decay",
                 "renorm_schedule": "r_max = 1 + 2 * ramp, d_max = 5 * ramp, ramp = min(1, "
                                    "step / (steps / 2))",
                 "jax": jax.__version__, "jaxnorm": jn.__version__},
      "table": table, "ablation": ablation, "ablation_verdicts": verdicts, "verdict": verdict,
      "runs": runs, "seconds": seconds, "wall_seconds": time.perf_counter() - t_start,
  }
  (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  width = 0.8 / len(columns)
  for i, c in enumerate(columns):
    a = np.stack([100 * acc[(v, c)] for v in VARIANTS])
    axes[0].bar(np.arange(len(VARIANTS)) + width * i, a.mean(1), width, yerr=a.std(1),
                capsize=2, label=f"per-device batch {c.split('x')[0]}, {DEVICES} devices")
  axes[0].set_xticks(np.arange(len(VARIANTS)) + width * (len(columns) - 1) / 2,
                     [LABELS[v] for v in VARIANTS], rotation=15, fontsize=8)
  axes[0].set_ylabel("test accuracy (%)")
  axes[0].set_ylim(0, 105)
  axes[0].legend(fontsize=8, loc="lower right")
  keys = [(v, big) for v in ABLATION] + [("bn", str(b)) for b in cfg["plain_batches"]]
  ticks = [f"{big}, ghost {v[5:]}" if v.startswith("ghost") else big for v in ABLATION]
  ticks += [str(b) for b in cfg["plain_batches"]]
  a = [100 * acc[k] for k in keys]
  axes[1].bar(np.arange(len(keys)), [x.mean() for x in a], 0.6, yerr=[x.std() for x in a],
              capsize=2, color="tab:blue")
  axes[1].set_xticks(np.arange(len(keys)), ticks, fontsize=8)
  axes[1].set_xlabel("BN on one device: batch size (ghost batch size)", fontsize=8)
  axes[1].set_ylim(0, 105)
  axes[1].set_title("ablation: the statistics' batch vs the optimizer's", fontsize=9)
  fig.tight_layout()
  fig.savefig(out / "small_batch.png", dpi=90)
  plt.close(fig)

  print(f"\nTest accuracy (%), mean±std over {cfg['seeds']} seeds "
        f"(per-device batch x devices):")
  print("| normalizer | " + " | ".join(columns) + " |")
  print("| --- |" + " --- |" * len(columns))
  for row in table:
    print(f"| {row['normalizer']} | " + " | ".join(row[c] for c in columns) + " |")
  print("\nAblation (one device):")
  for row in ablation:
    print(f"  {row['run']:>32}: {row['accuracy']}%")
  for v in verdicts:
    print(f"  ghost {v['ghost_batch']}: plain BN {'fails' if v['plain_bn_fails'] else 'holds'}"
          f", ghost batches {'collapse' if v['collapses'] else 'hold up'}. {v['evidence']}")
  print(f"\nVerdict: {verdict}\nWrote {out}/results.json and small_batch.png in "
        f"{time.perf_counter() - t_start:.0f} s.")
  return results


if __name__ == "__main__":
  main()
