"""A PyTorch CNN moved to flax with jaxnorm layers, and trained further on both sides.

    python examples/torch_interop.py [--out DIR] [--quick]

1. A small PyTorch CNN on scikit-learn's digits, Conv2d -> BatchNorm2d -> ReLU -> Conv2d
   (stride 2) -> BatchNorm2d -> ReLU -> spatial mean -> LayerNorm -> Linear, is trained a few
   SGD steps in PyTorch.
2. Its `state_dict` is converted into the variables of the equivalent flax.linen model built
   with `jaxnorm.linen` layers: normalization layers with `jaxnorm.interop.from_torch`, the
   convolution kernels transposed from OIHW to HWIO, the Linear weight transposed, the input
   moved from NCHW to NHWC. The jaxnorm BatchNorms use PyTorch's update rule:
   `momentum=jaxnorm.momentum_from_torch(0.1)` (0.9) and `unbiased_running_var=True`.
3. Evaluation logits on the 360 test images are compared (the largest absolute difference),
   then both sides train more steps on the same batches with the same SGD, and the running
   statistics and the evaluation logits are compared again. Finally the jaxnorm variables are
   converted back with `jaxnorm.interop.to_torch` and loaded with `load_state_dict(strict=True)`.

Writes `DIR/torch_interop.json` (default `results/`). Needs torch (`pip install torch`);
`--quick` trains fewer steps (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import linen as nn
from sklearn.datasets import load_digits

import jaxnorm as jn
from jaxnorm import interop
from jaxnorm import linen as jnn

TORCH_MOMENTUM, EPS, LR, BATCH = 0.1, 1e-5, 0.05, 32


class TorchCNN(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
    self.bn1 = torch.nn.BatchNorm2d(8, momentum=TORCH_MOMENTUM, eps=EPS)
    self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    self.bn2 = torch.nn.BatchNorm2d(16, momentum=TORCH_MOMENTUM, eps=EPS)
    self.ln = torch.nn.LayerNorm(16, eps=EPS)
    self.fc = torch.nn.Linear(16, 10)

  def forward(self, x):  # NCHW
    x = torch.relu(self.bn1(self.conv1(x)))
    x = torch.relu(self.bn2(self.conv2(x)))
    return self.fc(self.ln(x.mean(dim=(2, 3))))


class FlaxCNN(nn.Module):
  """The same network in flax.linen with jaxnorm layers (NHWC)."""

  @nn.compact
  def __call__(self, x, train: bool):
    def bn(name):
      return jnn.BatchNorm(use_running_average=not train, epsilon=EPS, name=name,
                           momentum=jn.momentum_from_torch(TORCH_MOMENTUM),
                           unbiased_running_var=True)

    x = jax.nn.relu(bn("bn1")(nn.Conv(8, (3, 3), padding=1, name="conv1")(x)))
    x = jax.nn.relu(bn("bn2")(nn.Conv(16, (3, 3), strides=2, padding=1, name="conv2")(x)))
    x = jnn.LayerNorm(epsilon=EPS, name="ln")(x.mean(axis=(1, 2)))
    return nn.Dense(10, name="fc")(x)


def torch_to_flax(sd: dict[str, Any]) -> dict[str, Any]:
  """The flax variables of FlaxCNN from TorchCNN's state_dict."""
  def np_(t):
    return t.detach().cpu().numpy()

  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  for conv in ("conv1", "conv2"):  # OIHW -> HWIO
    params[conv] = {"kernel": jnp.asarray(np_(sd[f"{conv}.weight"]).transpose(2, 3, 1, 0)),
                    "bias": jnp.asarray(np_(sd[f"{conv}.bias"]))}
  params["fc"] = {"kernel": jnp.asarray(np_(sd["fc.weight"]).T),
                  "bias": jnp.asarray(np_(sd["fc.bias"]))}
  for norm in ("bn1", "bn2", "ln"):
    v = interop.from_torch(sd, f"{norm}.")
    params[norm] = v["params"]
    if "batch_stats" in v:
      stats[norm] = v["batch_stats"]
  return {"params": params, "batch_stats": stats}


def flax_to_torch(variables: dict[str, Any]) -> dict[str, torch.Tensor]:
  """The inverse: a state_dict that TorchCNN loads with strict=True."""
  p = variables["params"]
  sd: dict[str, Any] = {}
  for conv in ("conv1", "conv2"):
    sd[f"{conv}.weight"] = np.array(p[conv]["kernel"]).transpose(3, 2, 0, 1)
    sd[f"{conv}.bias"] = np.array(p[conv]["bias"])
  sd["fc.weight"], sd["fc.bias"] = np.array(p["fc"]["kernel"]).T, np.array(p["fc"]["bias"])
  for norm in ("bn1", "bn2", "ln"):
    layer = {"params": p[norm]}
    if norm in variables["batch_stats"]:
      layer["batch_stats"] = variables["batch_stats"][norm]
    sd.update(interop.to_torch(layer, f"{norm}."))
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="results/", help="output directory (default: results/)")
  ap.add_argument("--quick", action="store_true", help="fewer steps (used by the tests)")
  args = ap.parse_args(argv)
  t_start = time.perf_counter()
  torch.manual_seed(0)
  torch.set_num_threads(1)
  torch_steps, both_steps = (5, 5) if args.quick else (50, 20)

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[:, None]  # NCHW
  y = digits.target.astype(np.int64)
  order = np.random.RandomState(0).permutation(len(x))
  test, train = order[:360], order[360:]
  rs = np.random.RandomState(1)
  batches = [rs.choice(train, BATCH, replace=False) for _ in range(torch_steps + both_steps)]

  tmodel = TorchCNN()
  topt = torch.optim.SGD(tmodel.parameters(), lr=LR)

  def torch_step(idx):
    tmodel.train()
    topt.zero_grad()
    loss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x[idx])),
                                             torch.from_numpy(y[idx]))
    loss.backward()
    topt.step()

  def torch_eval():
    tmodel.eval()
    with torch.no_grad():
      return tmodel(torch.from_numpy(x[test])).numpy()

  for idx in batches[:torch_steps]:
    torch_step(idx)

  model = FlaxCNN()
  variables = torch_to_flax(tmodel.state_dict())
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x_nhwc = x.transpose(0, 2, 3, 1)
  logits_t, logits_j = torch_eval(), evaluate(variables, x_nhwc[test])
  after_conversion = max_diff(logits_t, logits_j)

  tx = optax.sgd(LR)
  opt_state = tx.init(variables["params"])

  @jax.jit
  def jax_step(variables, opt_state, xb, yb):
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                xb, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

    (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return ({"params": optax.apply_updates(variables["params"], updates),
             "batch_stats": upd["batch_stats"]}, opt_state)

  for idx in batches[torch_steps:]:
    torch_step(idx)
    variables, opt_state = jax_step(variables, opt_state, x_nhwc[idx], y[idx].astype(np.int32))

  sd = tmodel.state_dict()
  stats_diff = {
      f"{norm}.{theirs}": max_diff(variables["batch_stats"][norm][ours], sd[f"{norm}.{theirs}"])
      for norm in ("bn1", "bn2") for ours, theirs in (("mean", "running_mean"),
                                                      ("var", "running_var"))}
  logits_t, logits_j = torch_eval(), evaluate(variables, x_nhwc[test])
  after_training = max_diff(logits_t, logits_j)
  acc_t = float((logits_t.argmax(-1) == y[test]).mean())
  acc_j = float((np.asarray(logits_j).argmax(-1) == y[test]).mean())

  back = TorchCNN()
  back.load_state_dict(flax_to_torch(variables), strict=True)
  back.eval()
  with torch.no_grad():
    logits_back = back(torch.from_numpy(x[test])).numpy()
  round_trip = max_diff(logits_back, logits_j)

  results = {
      "dataset": "scikit-learn digits: 1437 train / 360 test (fixed permutation)",
      "config": {"torch_steps": torch_steps, "steps_on_both_sides": both_steps, "batch": BATCH,
                 "sgd_lr": LR, "torch_momentum": TORCH_MOMENTUM,
                 "jaxnorm_momentum": jn.momentum_from_torch(TORCH_MOMENTUM),
                 "unbiased_running_var": True, "epsilon": EPS, "quick": bool(args.quick),
                 "torch": torch.__version__, "jax": jax.__version__,
                 "jaxnorm": jn.__version__},
      "max_abs_logit_diff_after_conversion": after_conversion,
      "max_abs_logit_after_conversion": float(np.abs(logits_t).max()),
      "max_abs_logit_diff_after_training_both": after_training,
      "max_abs_diff_running_stats_after_training_both": stats_diff,
      "max_abs_running_var": max(float(sd[f"{n}.running_var"].abs().max())
                                 for n in ("bn1", "bn2")),
      "max_abs_logit_diff_to_torch_round_trip": round_trip,
      "test_accuracy_torch": acc_t,
      "test_accuracy_jaxnorm": acc_j,
      "wall_seconds": time.perf_counter() - t_start,
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "torch_interop.json").write_text(json.dumps(results, indent=1, allow_nan=False))
  print(f"max |logits PyTorch - jaxnorm| after conversion:        {after_conversion:.3g}")
  print(f"  after {both_steps} more training steps on both sides: {after_training:.3g}")
  print("max |running stats PyTorch - jaxnorm| after those steps: "
        + ", ".join(f"{k} {v:.3g}" for k, v in stats_diff.items()))
  print(f"to_torch round trip (strict load), max |logit diff|:     {round_trip:.3g}")
  print(f"test accuracy: PyTorch {acc_t:.3f}, jaxnorm {acc_j:.3f}")
  print(f"Wrote {out / 'torch_interop.json'}.")
  return results


if __name__ == "__main__":
  main()
