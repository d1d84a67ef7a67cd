"""Numerical accuracy of jaxnorm and its peers on the inputs where the peers go wrong.

Every number is measured here, against a float64 NumPy reference of the same input:

* LayerNorm and BatchNorm on float32 input with mean 1e3 / 1e4 and std 1 (cancellation);
* bfloat16 input with mean 20 (haiku's BatchNorm computes E[x²]-E[x]² in bfloat16);
* running averages with decay 0.999 on bfloat16 input (haiku casts the decay to bfloat16);
* flax both ways: its default `use_fast_variance=True` (E[x²]-E[x]²) and `False` (two passes);
* batch statistics across 4 devices holding 2, 4, 6 and 8 valid rows, and with one device empty
  (flax averages the per-device means).

Usage: python benchmarks/accuracy.py [--json PATH]. Peers that are not installed are skipped
(`pip install -e ".[benchmarks]"` installs flax, dm-haiku and equinox).
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm as jn


def _have(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def _ref_norm(x, axes, eps):
  x = np.asarray(x, np.float64)
  mean = x.mean(axes, keepdims=True)
  return (x - mean) / np.sqrt(x.var(axes, keepdims=True) + eps)


def _err(y, ref) -> float:
  y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
  return float(np.nanmax(np.abs(y - ref))) if np.isfinite(y).all() else float("nan")


def offset_errors(offset: float) -> dict[str, float]:
  """Max |y - y_float64| for LayerNorm (last axis) and BatchNorm (train) at `offset`."""
  x = (np.random.RandomState(0).randn(256, 512) + offset).astype(np.float32)
  ln_ref, bn_ref = _ref_norm(x, -1, 1e-6), _ref_norm(x, 0, 1e-5)
  out = {
      "jaxnorm LayerNorm": _err(jn.layer_norm(x), ln_ref),
      "jaxnorm BatchNorm": _err(jn.batch_norm(x, jn.batch_norm_init(512), training=True)[0],
                                bn_ref),
  }
  if _have("flax"):
    import flax.linen as nn

    for fast in (True, False):
      tag = "default" if fast else "use_fast_variance=False"
      ln = nn.LayerNorm(use_fast_variance=fast)
      out[f"flax LayerNorm ({tag})"] = _err(ln.apply(ln.init(jax.random.key(0), x), x), ln_ref)
      bn = nn.BatchNorm(use_running_average=False, use_fast_variance=fast)
      y, _ = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
      out[f"flax BatchNorm ({tag})"] = _err(y, bn_ref)
  if _have("haiku"):
    import haiku as hk

    ln = hk.without_apply_rng(hk.transform(
        lambda v: hk.LayerNorm(-1, create_scale=False, create_offset=False, eps=1e-6)(v)))
    out["haiku LayerNorm"] = _err(ln.apply(ln.init(None, x), x), ln_ref)
    bn = hk.without_apply_rng(hk.transform_with_state(
        lambda v: hk.BatchNorm(False, False, 0.99, eps=1e-5)(v, is_training=True)))
    params, state = bn.init(None, x)
    out["haiku BatchNorm"] = _err(bn.apply(params, state, x)[0], bn_ref)
  if _have("equinox"):
    import equinox as eqx

    ln = eqx.nn.LayerNorm(512, eps=1e-6, use_weight=False, use_bias=False)
    out["equinox LayerNorm"] = _err(jax.vmap(ln)(x), ln_ref)
  return out


def bfloat16_mean_20() -> dict[str, float]:
  """BatchNorm on bfloat16 input with mean 20, std 1: error of the normalized output."""
  x = jnp.asarray(np.random.RandomState(1).randn(256, 64) + 20.0, jnp.bfloat16)
  ref = _ref_norm(np.asarray(x.astype(jnp.float32)), 0, 1e-5)
  out = {"jaxnorm BatchNorm": _err(jn.batch_norm(x, jn.batch_norm_init(64), training=True)[0],
                                   ref)}
  if _have("flax"):
    import flax.linen as nn

    for fast in (True, False):
      tag = "default" if fast else "use_fast_variance=False"
      bn = nn.BatchNorm(use_running_average=False, use_fast_variance=fast)
      with jax.numpy_dtype_promotion("standard"):  # flax's code needs it for bfloat16 input
        y, _ = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
      out[f"flax BatchNorm ({tag})"] = _err(y, ref)
  if _have("haiku"):
    import haiku as hk

    bn = hk.without_apply_rng(hk.transform_with_state(
        lambda v: hk.BatchNorm(False, False, 0.999, eps=1e-5)(v, is_training=True)))
    params, state = bn.init(None, x)
    out["haiku BatchNorm"] = _err(bn.apply(params, state, x)[0], ref)
  return out


def bfloat16_running_average() -> dict[str, float]:
  """Running mean after one step with decay 0.999 on bfloat16 input of mean 20 (truth 0.02)."""
  x = jnp.asarray(np.random.RandomState(2).randn(256, 4) + 20.0, jnp.bfloat16)
  _, state = jn.batch_norm(x, jn.batch_norm_init(4), training=True, momentum=0.999)
  out = {"jaxnorm": float(np.asarray(state.mean)[0])}
  if _have("flax"):
    import flax.linen as nn

    for fast in (True, False):
      tag = "default" if fast else "use_fast_variance=False"
      bn = nn.BatchNorm(use_running_average=False, momentum=0.999, use_fast_variance=fast)
      with jax.numpy_dtype_promotion("standard"):
        _, upd = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
      mean = upd["batch_stats"]["mean"]
      out[f"flax linen BatchNorm ({tag})"] = float(np.asarray(mean.astype(jnp.float32))[0])
  if _have("haiku"):
    import haiku as hk

    def f(v):
      bn = hk.BatchNorm(False, False, 0.999, eps=1e-5)
      bn(v, is_training=True)
      return bn(v, is_training=False)  # uses the running averages

    bn = hk.without_apply_rng(hk.transform_with_state(f))
    params, state = bn.init(None, x)
    _, state = bn.apply(params, state, x)
    mean = state["batch_norm/~/mean_ema"]["average"]
    out["haiku"] = float(np.asarray(mean.astype(jnp.float32)).ravel()[0])
  return out


def uneven_devices(counts: tuple[int, ...]) -> dict[str, tuple[float, float]]:
  """(mean, var) of feature 0 across devices with `counts` valid rows, under vmap(axis_name)."""
  rows = 8
  x = np.arange(len(counts) * rows, dtype=np.float32).reshape(len(counts), rows, 1) % 11
  mask = np.arange(rows)[None, :, None] < np.asarray(counts)[:, None, None]
  valid = x[np.broadcast_to(mask, x.shape)].astype(np.float64)
  out = {"float64 truth": (float(valid.mean()), float(valid.var()))}
  m = jax.vmap(lambda v, k: jn.moments(v, 0, mask=k, axis_name="d"), axis_name="d")(x, mask)
  out["jaxnorm"] = (float(m.mean[0, 0]), float(m.var[0, 0]))
  if _have("flax"):
    import flax.linen as nn

    for fast in (True, False):
      tag = "default" if fast else "use_fast_variance=False"
      bn = nn.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0,
                        use_fast_variance=fast)
      variables = bn.init(jax.random.key(0), x[0])

      def step(v, k, bn=bn, variables=variables):
        _, upd = bn.apply(variables, v, mask=k, mutable=["batch_stats"])
        return upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

      mean, var = jax.vmap(step, axis_name="d")(x, mask)
      out[f"flax linen BatchNorm ({tag})"] = (float(mean[0, 0]), float(var[0, 0]))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()
  results = {
      "offset_1e3": offset_errors(1e3),
      "offset_1e4": offset_errors(1e4),
      "bfloat16_mean_20": bfloat16_mean_20(),
      "bfloat16_running_mean_truth_0.02": bfloat16_running_average(),
      "devices_2_4_6_8": uneven_devices((2, 4, 6, 8)),
      "devices_0_4_6_8": uneven_devices((0, 4, 6, 8)),
  }
  for case, rows in results.items():
    print(f"\n{case}")
    for name, value in rows.items():
      text = (", ".join(f"{v:.4g}" for v in value) if isinstance(value, tuple)
              else f"{value:.4g}")
      print(f"  {name:<40} {text}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
