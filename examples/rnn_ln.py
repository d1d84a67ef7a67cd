"""Normalization inside a recurrent network over variable-length sequences, measured (claim 5).

    python examples/rnn_ln.py [--out DIR] [--quick] [--seeds N]

Claim under test: "BN does not fit recurrent networks with variable-length sequences; LN does."

Data: scikit-learn's digits (the same 1280 / 512 split as `bn_vs_ln.py`), read as sequences:
the 8 pixel rows of an image are resampled (nearest row) to a random length T, 4 <= T <= 16,
drawn once per image, like the same stroke written at different speeds; each time step is one
8-pixel row. Sequences are padded to 16 steps and masked. A second test set resamples the test
images to 17..24 steps: longer than any training sequence.

Model: a GRU cell (48 units) written with jaxnorm, reading each sequence up to its length, and
a linear classifier on the last hidden state. Four variants:

* `none`: the plain GRU.
* `layer`: LN (Ba et al., 2016) of the input and of the recurrent pre-activations, per example
  and time step (`jaxnorm.layer_norm`).
* `batch_shared`: BN of the input pre-activations with statistics shared across time steps:
  one set of statistics over every valid (example, time step) of the batch, one running state
  (sequence-wise BN, Laurent et al., 2016; `jaxnorm.batch_norm` with a (batch, time) mask).
* `batch_per_step`: BN of the input and recurrent pre-activations with per-time-step
  statistics over the sequences still running at that step, and one running state per step
  (recurrent BN, Cooijmans et al., 2017; steps past the longest training length use the last
  step's statistics). Scale and bias are shared across steps.

All variants train with the same budget (Adam, cosine-decayed learning rate, batch 32, the
same epochs and seeds). Each is evaluated on the full test set (BN with running statistics), one
example at a time (batch size 1) with running statistics and, for BN, with the batch's own
statistics, and on the longer sequences. Writes `DIR/rnn_results.json` (same schema as
`results.json`, with the claim-5 verdict) and `DIR/rnn_accuracy.png`.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
).strip()

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import jaxnorm as jn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NORMS = ("none", "layer", "batch_shared", "batch_per_step")
LABELS = {"none": "no normalization", "layer": "LayerNorm",
          "batch_shared": "BN, shared over time", "batch_per_step": "BN, per time step"}
N_TRAIN, N_TEST = 1280, 512
T_MIN, T_MAX, T_LONG = 4, 16, 24  # training/test lengths 4..16; the longer test set 17..24
FEATURES, HIDDEN = 8, 48
BATCH = 32
LR = 5e-3
EPSILON = 1e-5
BN_MOMENTUM = 0.9
FULL = dict(seeds=5, epochs=12)
QUICK = dict(seeds=3, epochs=3)
CLAIM = "5. BN does not fit recurrent networks with variable-length sequences; LN does."


def resample(images: np.ndarray, lengths: np.ndarray, t_pad: int) -> np.ndarray:
  """Rows of each (8, 8) image stretched to `lengths[i]` steps (nearest row), zero-padded."""
  out = np.zeros((len(images), t_pad, FEATURES), np.float32)
  for i, (img, t) in enumerate(zip(images, lengths, strict=True)):
    rows = np.floor((np.arange(t) + 0.5) * 8 / t).astype(int)
    out[i, :t] = img[rows]
  return out


def load_sequences() -> dict[str, np.ndarray]:
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  xtr, xte, ytr, yte = train_test_split(x, y, train_size=N_TRAIN, test_size=N_TEST,
                                        random_state=0, stratify=y)
  rng = np.random.default_rng(5)
  ltr = rng.integers(T_MIN, T_MAX + 1, N_TRAIN)
  lte = rng.integers(T_MIN, T_MAX + 1, N_TEST)
  llong = rng.integers(T_MAX + 1, T_LONG + 1, N_TEST)
  return dict(x_train=resample(xtr, ltr, T_MAX), len_train=ltr.astype(np.int32), y_train=ytr,
              x_test=resample(xte, lte, T_MAX), len_test=lte.astype(np.int32), y_test=yte,
              x_long=resample(xte, llong, T_LONG), len_long=llong.astype(np.int32))


def init_model(key: jax.Array) -> tuple[dict, dict]:
  k1, k2, k3 = jax.random.split(key, 3)
  g = 3 * HIDDEN
  params = {
      "wx": jax.random.normal(k1, (FEATURES, g)) / math.sqrt(FEATURES),
      "wh": jax.random.orthogonal(k2, HIDDEN, (3,)).transpose(1, 0, 2).reshape(HIDDEN, g),
      "b": jnp.zeros(g), "bhn": jnp.zeros(HIDDEN),
      "nx_scale": jnp.ones(g), "nx_bias": jnp.zeros(g),
      "nh_scale": jnp.ones(g), "nh_bias": jnp.zeros(g),
      "out": jax.random.normal(k3, (HIDDEN, 10)) / math.sqrt(HIDDEN), "out_bias": jnp.zeros(10),
  }
  per_step = jax.tree.map(lambda a: jnp.broadcast_to(a, (T_MAX, *a.shape)),
                          jn.batch_norm_init(g))
  state = {"x": jn.batch_norm_init(g), "x_steps": per_step, "h_steps": per_step}
  return params, state


def apply_model(params: dict, state: dict, x: jax.Array, lengths: jax.Array, norm: str, *,
                training: bool) -> tuple[jax.Array, dict]:
  """Logits for a padded batch `x` (B, T, F) of sequences of `lengths`; returns new state."""
  b, t_pad, _ = x.shape
  valid = jnp.arange(t_pad)[None, :] < lengths[:, None]  # (B, T)
  gx_all = x @ params["wx"]  # (B, T, 3H): input pre-activations, all steps at once
  new_state = dict(state)
  if norm == "batch_shared":  # statistics over every valid (example, step) of the batch
    gx_all, new_state["x"] = jn.batch_norm(
        gx_all, state["x"], params["nx_scale"], params["nx_bias"], training=training,
        momentum=BN_MOMENTUM, epsilon=EPSILON, mask=valid[..., None])

  def bn_step(v, stacked, i, name, active):
    s = jax.tree.map(lambda a: a[i], stacked)
    y, s_new = jn.batch_norm(v, s, params[name + "_scale"], params[name + "_bias"],
                             training=training, momentum=BN_MOMENTUM, epsilon=EPSILON,
                             mask=active[:, None])
    return y, jax.tree.map(lambda a, n: a.at[i].set(n), stacked, s_new)

  def cell(carry, inputs):
    h, xs, hs = carry
    gx, active, t = inputs
    gh = h @ params["wh"]
    if norm == "layer":
      gx = jn.layer_norm(gx, params["nx_scale"], params["nx_bias"], epsilon=EPSILON)
      gh = jn.layer_norm(gh, params["nh_scale"], params["nh_bias"], epsilon=EPSILON)
    elif norm == "batch_per_step":
      i = jnp.minimum(t, T_MAX - 1)  # past the longest training step: the last step's stats
      gx, xs = bn_step(gx, xs, i, "nx", active)
      gh, hs = bn_step(gh, hs, i, "nh", active)
    gx = gx + params["b"]
    xr, xz, xn = jnp.split(gx, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * (hn + params["bhn"]))
    h_new = (1 - z) * n + z * h
    return (jnp.where(active[:, None], h_new, h), xs, hs), None

  h0 = jnp.zeros((b, HIDDEN), x.dtype)
  inputs = (jnp.swapaxes(gx_all, 0, 1), valid.T, jnp.arange(t_pad))
  (h, xs, hs), _ = jax.lax.scan(cell, (h0, state["x_steps"], state["h_steps"]), inputs)
  if norm == "batch_per_step":
    new_state["x_steps"], new_state["h_steps"] = xs, hs
  return h @ params["out"] + params["out_bias"], new_state


def make_train(norm: str, epochs: int):
  steps = N_TRAIN // BATCH
  tx = optax.adam(optax.cosine_decay_schedule(LR, epochs * steps))

  def loss_fn(params, state, xb, lb, yb):
    logits, new_state = apply_model(params, state, xb, lb, norm, training=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new_state

  def chunked(params, state, x, lengths, chunk, training):
    """Logits of a test set evaluated in independent batches of `chunk` sequences."""
    n = x.shape[0]
    xb = x.reshape(n // chunk, chunk, *x.shape[1:])
    lb = lengths.reshape(n // chunk, chunk)
    logits = jax.vmap(
        lambda xc, lc: apply_model(params, state, xc, lc, norm, training=training)[0])(xb, lb)
    return logits.reshape(n, -1)

  def train_one(params, state, order, x, lengths, y, x_test, len_test, x_long, len_long):
    def step(carry, idx):
      params, state, opt = carry
      (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, state, x[idx], lengths[idx], y[idx])
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), state, opt), loss

    def epoch(carry, order_e):
      carry, losses = jax.lax.scan(step, carry, order_e)
      return carry, losses.mean()

    (params, state, _), losses = jax.lax.scan(epoch, (params, state, tx.init(params)), order)
    # Evaluation rides in the same program (one compilation per variant): the full test set
    # and the longer sequences with running statistics, then one sequence at a time with
    # running statistics and, for BN, with the batch's own statistics.
    evals = {"test": chunked(params, state, x_test, len_test, x_test.shape[0], False),
             "long": chunked(params, state, x_long, len_long, x_long.shape[0], False),
             "bs1": chunked(params, state, x_test, len_test, 1, False)}
    if norm.startswith("batch"):
      evals["bs1_batch_stats"] = chunked(params, state, x_test, len_test, 1, True)
    return losses, evals

  return jax.jit(jax.vmap(train_one, in_axes=(0, 0, 0) + (None,) * 7))


def stats(v) -> tuple[float, float]:
  v = np.asarray(v, np.float64)
  return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else float("nan"))


def pm(v) -> str:
  m, s = stats(v)
  return f"{100 * m:.1f}±{100 * s:.1f}"


def compare(a, b, floor: float) -> dict[str, Any]:
  """Difference of seed means and whether it exceeds max(2 Welch standard errors, floor)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  diff = float(a.mean() - b.mean())
  se = (math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
        if a.size > 1 and b.size > 1 else math.inf)
  thr = max(2 * se, floor)
  return {"diff": diff, "threshold": thr, "significant": bool(abs(diff) > thr)}


def decide(res: dict[str, dict[str, np.ndarray]], seeds: int) -> dict[str, Any]:
  """Claim 5 holds if LN beats every BN variant (running statistics) beyond the noise on the
  variable-length test set, and LN gives the same predictions one example at a time."""
  floor = 1.0 / N_TEST
  ln = res["layer"]
  comps = {n: compare(ln["test"], res[n]["test"], floor)
           for n in ("batch_shared", "batch_per_step")}
  beats = all(c["significant"] and c["diff"] > 0 for c in comps.values())
  ln_same = bool(np.array_equal(ln["bs1"], ln["test"]))
  parts = []
  for n in NORMS:
    r = res[n]
    s = (f"{LABELS[n]}: test {pm(r['test'])}%, batch 1 {pm(r['bs1'])}%")
    if "bs1_batch_stats" in r:
      s += f", batch 1 with the batch's own statistics {pm(r['bs1_batch_stats'])}%"
    s += f", longer sequences ({T_MAX + 1}-{T_LONG} steps) {pm(r['long'])}%"
    parts.append(s)
  comp_txt = "; ".join(
      f"LN minus {LABELS[n]}: {100 * c['diff']:+.2f} pts (noise threshold "
      f"{100 * c['threshold']:.2f}, {'outside' if c['significant'] else 'inside'} the noise)"
      for n, c in comps.items())
  evidence = (f"GRU on digits rows as sequences of {T_MIN}-{T_MAX} steps, {seeds} seeds, "
              f"accuracy mean±std. " + "; ".join(parts) + f". {comp_txt}. LN one example at a "
              f"time {'equals' if ln_same else 'DIFFERS FROM'} LN on the full test set. Holds if "
              f"LN beats both BN variants (running statistics) beyond the noise.")
  return {"claim": CLAIM, "holds": bool(beats and ln_same), "evidence": evidence}


def plot(res: dict, path: pathlib.Path) -> None:
  cols = [("test", f"test, batch {N_TEST}"), ("bs1", "batch 1, running stats"),
          ("bs1_batch_stats", "batch 1, batch stats"), ("long", f"{T_MAX + 1}-{T_LONG} steps")]
  fig, ax = plt.subplots(figsize=(8, 4.2))
  w = 0.2
  for j, (key, label) in enumerate(cols):
    xs, means, sds = [], [], []
    for i, n in enumerate(NORMS):
      if key in res[n]:
        v = np.asarray(res[n][key]) * 100
        xs.append(i + (j - 1.5) * w)
        means.append(v.mean())
        sds.append(v.std(ddof=1) if v.size > 1 else 0.0)
    ax.bar(xs, means, w, yerr=sds, label=label, capsize=2)
  ax.set_xticks(range(len(NORMS)), [LABELS[n] for n in NORMS], fontsize=8)
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 118)
  ax.legend(fontsize=7, loc="upper center", ncol=4)
  ax.set_title("GRU over variable-length digit sequences: where the normalization's "
               "statistics come from", fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None, *, verdict: bool = True) -> dict[str, Any]:
  """Runs the experiment, prints its table (and, with `verdict`, claim 5's verdict), writes
  `rnn_results.json` and `rnn_accuracy.png`; returns the results. `examples/bn_vs_ln.py` passes
  `verdict=False` and prints claim 5 with the other five."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="results/", help="output directory (default: results/)")
  ap.add_argument("--quick", action="store_true", help="a fast smoke run (3 seeds, 3 epochs)")
  ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; quick 3)")
  args = ap.parse_args(argv)
  t_start = time.perf_counter()
  cfg = dict(QUICK if args.quick else FULL)
  if args.seeds is not None:
    if args.seeds < 1:
      ap.error(f"--seeds must be at least 1; got {args.seeds}.")
    cfg["seeds"] = args.seeds
  seeds, epochs = cfg["seeds"], cfg["epochs"]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  d = load_sequences()
  dev = {k: jnp.asarray(v) for k, v in d.items()}
  params0, state0 = jax.vmap(init_model)(jax.random.split(jax.random.key(0), seeds))
  order = np.stack([np.stack([np.random.default_rng(100 * s + 7).permutation(N_TRAIN)
                              .reshape(-1, BATCH) for _ in range(epochs)])
                    for s in range(seeds)]).astype(np.int32)
  res, runs, compile_s = {}, [], {}
  for norm in tqdm(NORMS, desc="RNN variants", unit="variant", file=sys.stdout):
    train_args = (params0, state0, order, dev["x_train"], dev["len_train"], dev["y_train"],
            dev["x_test"], dev["len_test"], dev["x_long"], dev["len_long"])
    t = time.perf_counter()
    exe = make_train(norm, epochs).lower(*train_args).compile()
    compile_s[norm] = time.perf_counter() - t
    t = time.perf_counter()
    losses, evals = exe(*train_args)
    jax.block_until_ready(losses)
    train_s = time.perf_counter() - t  # includes the (small) evaluation
    r = {k: np.asarray((v.argmax(-1) == d["y_test"]).mean(-1), np.float64)
         for k, v in evals.items()}
    res[norm] = r
    losses = np.asarray(losses)
    for s in range(seeds):
      runs.append({"norm": norm, "batch_size": BATCH, "seed": s,
                   "test_accuracy": float(r["test"][s]),
                   "final_train_loss": (float(losses[s, -1]) if np.isfinite(losses[s, -1])
                                        else None),  # JSON has no NaN
                   "train_seconds": train_s / seeds,
                   "test_accuracy_bs1": float(r["bs1"][s]),
                   "test_accuracy_longer": float(r["long"][s]),
                   **({"test_accuracy_bs1_batch_stats": float(r["bs1_batch_stats"][s])}
                      if "bs1_batch_stats" in r else {})})

  claim = decide(res, seeds)
  results = {
      "dataset": (f"scikit-learn digits as sequences: the 8 rows of each image resampled to "
                  f"{T_MIN}-{T_MAX} steps (random per image), padded and masked; {N_TRAIN} "
                  f"train / {N_TEST} test (stratified, random_state=0), plus the test images at "
                  f"{T_MAX + 1}-{T_LONG} steps"),
      "config": {
          "model": f"GRU({HIDDEN}) with normalized input and recurrent pre-activations, "
                   f"linear classifier on the last valid hidden state",
          "norms": {n: LABELS[n] for n in NORMS},
          "batch_size": BATCH, "epochs": epochs, "seeds": seeds,
          "optimizer": f"Adam, lr {LR} cosine-decayed to 0 over all steps",
          "bn_momentum": BN_MOMENTUM, "epsilon": EPSILON, "quick": bool(args.quick),
          "noise_rule": "a difference of seed means counts only if it exceeds 2 standard "
                        "errors (Welch) and one test example (1/512)",
      },
      "runs": runs,
      "claims": [claim],
  }
  (out / "rnn_results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
  plot(res, out / "rnn_accuracy.png")
  print("compile seconds: " + ", ".join(f"{n} {v:.1f}" for n, v in compile_s.items()))
  print(f"\nRNN test accuracy (%), mean±std over {seeds} seeds")
  print(f"{'':>22}{'test':>11}{'batch 1':>11}{'b1 batch st':>13}{'longer':>11}")
  for n in NORMS:
    r = res[n]
    b1b = pm(r["bs1_batch_stats"]) if "bs1_batch_stats" in r else "-"
    print(f"{LABELS[n]:>22}{pm(r['test']):>11}{pm(r['bs1']):>11}{b1b:>13}{pm(r['long']):>11}")
  if verdict:
    print(f"\n[{'HOLDS' if claim['holds'] else 'DOES NOT HOLD'}] {claim['claim']}\n"
          f"    {claim['evidence']}\n")
  print(f"Wrote {out}/rnn_results.json and rnn_accuracy.png in "
        f"{time.perf_counter() - t_start:.0f} s.")
  return results


if __name__ == "__main__":
  main()
