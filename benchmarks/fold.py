"""Inference speed of examples/flax_resnet.py's model with and without its BatchNorms folded.

    python benchmarks/fold.py [--width 16] [--batch 1 256] [--rounds 30] [--out DIR]

`LinenResNet(jaxnorm.linen)` (a conv stem with BatchNorm, a residual block with two
conv-BatchNorm pairs, a GroupNorm block, a LayerNorm head) gets non-trivial running statistics
from a few training-mode passes, then `jaxnorm.linen.fold_batch_norms` folds its three
(conv, BatchNorm) pairs and `LinenResNet(..., folded=True)` (the same network without those
BatchNorms, a bias in each folded convolution) evaluates the folded variables. Both jitted
evaluation programs are timed side by side in one process (interleaved, shuffled rounds,
medians; see `_timing.py`), and the largest difference of their logits is reported. Writes
`DIR/fold.json` (default benchmarks/results).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import _timing  # noqa: E402

if __name__ == "__main__":
  _timing.use_allocator_settings()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402

import flax_resnet  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxnorm as jn  # noqa: E402
import jaxnorm.linen as jnn  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--width", type=int, default=16, help="channels (flax_resnet's default 16)")
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 256], help="batch sizes")
  ap.add_argument("--rounds", type=int, default=30)
  ap.add_argument("--inner", type=int, default=20, help="calls per sample")
  ap.add_argument("--out", default=os.path.join(HERE, "results"))
  ap.add_argument("--system-malloc", action="store_true", help="see _timing.py")
  args = ap.parse_args(argv)
  blocks = ("batch", "group")
  (xtr, _), (xte, _) = flax_resnet.load_data()
  model = flax_resnet.LinenResNet(jnn, args.width, blocks)
  folded_model = flax_resnet.LinenResNet(jnn, args.width, blocks, folded=True)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), xtr[:2],
                                                           train=False)
  train_pass = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
  for i in range(3):  # running statistics far from the initial 0 / 1
    variables = {"params": variables["params"],
                 **train_pass(variables, xtr[128 * i:128 * (i + 1)])}
  folded = jnn.fold_batch_norms(variables, flax_resnet.linen_fold_pairs(blocks))
  original_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  folded_fn = jax.jit(lambda v, x: folded_model.apply(v, x, train=False))
  logit_diff = float(jnp.abs(original_fn(variables, xte) - folded_fn(folded, xte)).max())
  logit_max = float(jnp.abs(original_fn(variables, xte)).max())
  rows = []
  for b in args.batch:
    x = jnp.asarray(np.resize(xte, (b, *xte.shape[1:])))
    samples = _timing.interleaved_samples(
        {"original": (original_fn, (variables, x)), "folded": (folded_fn, (folded, x))},
        args.rounds, args.inner)
    med = _timing.medians(samples)
    rows.append({"batch": b, "original_us": 1e6 * med["original"],
                 "folded_us": 1e6 * med["folded"],
                 "speedup": med["original"] / med["folded"]})
  results = {
      "model": f"examples/flax_resnet.py LinenResNet(jaxnorm.linen, width={args.width}, "
               f"blocks={blocks}), 8x8x1 inputs, evaluation mode",
      "folded_pairs": flax_resnet.linen_fold_pairs(blocks),
      "max_abs_logit_diff": logit_diff, "max_abs_logit": logit_max,
      "rows": rows, "rounds": args.rounds, "inner": args.inner,
      "jax": jax.__version__, "jaxnorm": jn.__version__, "backend": jax.default_backend(),
      "devices": jax.device_count(), "machine": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(), "allocator": _timing.allocator_env(),
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "fold.json").write_text(json.dumps(results, indent=1))
  print(f"max |logits original - folded| = {logit_diff:.3g} (logits up to {logit_max:.3g})")
  print(f"{'batch':>6}{'original µs':>14}{'folded µs':>12}{'speed-up':>10}")
  for r in rows:
    print(f"{r['batch']:>6}{r['original_us']:>14.1f}{r['folded_us']:>12.1f}"
          f"{r['speedup']:>9.2f}x")
  return results


if __name__ == "__main__":
  main()
