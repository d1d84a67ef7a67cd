"""Model tools for flax: variable-tree surgery and the framework side of precise statistics.

`fold_variables` folds (layer, BatchNorm) pairs of a linen variables tree
(`jaxnorm.linen.fold_batch_norms`); `recompute_linen` and `recompute_nnx` run a model while
capturing the input of each jaxnorm `BatchNorm` and hand the driver of `_recompute` what it
needs (`jaxnorm.linen.recompute_batch_stats`, `jaxnorm.nnx.recompute_batch_stats`). The layer
classes are passed in, so this module imports neither `linen` nor `nnx`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import linen as nn
from flax import nnx
from flax.nnx.module import first_from

from ._fold import fold_batch_norm
from ._recompute import Sink, population_stats, recompute
from ._stats import Moments


def as_dict(tree: Any) -> Any:
  """A copy of nested mappings as plain dicts (leaves shared)."""
  if isinstance(tree, Mapping):
    return {k: as_dict(v) for k, v in tree.items()}
  return tree


def _split(path: str) -> tuple[str, ...]:
  return tuple(p for p in path.split("/") if p)


def _get(tree: dict[str, Any], collection: str, path: tuple[str, ...], what: str) -> Any:
  node = tree.get(collection)
  for i, key in enumerate(path):
    if not isinstance(node, dict) or key not in node:
      have = sorted(node) if isinstance(node, dict) else []
      raise KeyError(
          f"{what} {'/'.join(path)!r}: variables[{collection!r}] has no "
          f"{'/'.join(path[:i + 1])!r} (keys at that level: {have}). Paths are module names "
          f"joined by '/', as in the variables tree, e.g. 'Block_0/Conv_0'.")
    node = node[key]
  return node


def _pop(tree: dict[str, Any], collection: str, path: tuple[str, ...]) -> None:
  """Removes `path` from `tree[collection]` and every dict it leaves empty."""
  nodes = [tree]
  node = tree[collection]
  for key in path[:-1]:
    nodes.append(node)
    node = node[key]
  del node[path[-1]]
  keys = (collection, *path[:-1])
  for parent, key in zip(reversed(nodes), reversed(keys), strict=True):
    if parent[key]:
      break
    del parent[key]


def fold_variables(
    variables: Mapping[str, Any],
    pairs: Mapping[str, str] | Sequence[tuple[str, str]],
    *,
    epsilon: float | Mapping[str, float] = 1e-5,
) -> dict[str, Any]:
  """Folds named (layer, BatchNorm) pairs of a flax variables tree; see linen.fold_batch_norms."""
  items = list(pairs.items()) if isinstance(pairs, Mapping) else [tuple(p) for p in pairs]
  if not items:
    raise ValueError("pairs is empty; give (layer, BatchNorm) module paths, e.g. "
                     "{'Conv_0': 'BatchNorm_0'}.")
  out = as_dict(variables)
  for layer, bn in items:
    lp, bp = _split(layer), _split(bn)
    eps = epsilon[bn] if isinstance(epsilon, Mapping) else epsilon
    lparams = _get(out, "params", lp, "layer")
    if "kernel" not in lparams:
      raise KeyError(f"layer {layer!r} has no 'kernel' in variables['params'] (it has "
                     f"{sorted(lparams)}); fold_batch_norms folds into Dense and Conv layers.")
    stats = _get(out, "batch_stats", bp, "BatchNorm")
    try:
      bparams = _get(out, "params", bp, "BatchNorm")
    except KeyError:  # use_scale=False and use_bias=False: no params
      bparams = {}
    for key in ("mean", "var"):
      if key not in stats:
        raise KeyError(f"BatchNorm {bn!r} has no {key!r} in variables['batch_stats'] (it has "
                       f"{sorted(stats)}).")
    kernel, bias = fold_batch_norm(lparams["kernel"], lparams.get("bias"),
                                   mean=stats["mean"], var=stats["var"],
                                   scale=bparams.get("scale"), offset=bparams.get("bias"),
                                   epsilon=eps)
    lparams["kernel"], lparams["bias"] = kernel, bias
    _pop(out, "batch_stats", bp)
    if bparams:
      _pop(out, "params", bp)
  return out


def _capture(forward: Any) -> Any:
  """The driver's `capture(keys, state, batch)` from a model's traced `forward`."""

  def capture(keys: Any, state: Any, batch: Any) -> Any:
    sink = Sink(keys)
    forward(state, batch, sink)
    return sink.moments

  return capture


def recompute_linen(model: Any, variables: Mapping[str, Any], batches: Any,
                    batch_norm_type: Any, progress: bool,
                    apply_kwargs: dict[str, Any]) -> dict[str, Any]:
  """`jaxnorm.linen.recompute_batch_stats` for the BatchNorms of class `batch_norm_type`."""
  out = as_dict(variables)

  def forward(vars_: Any, batch: Any, sink: Sink) -> None:
    def intercept(next_fun, args, kwargs, context):
      mod: Any = context.module
      if not isinstance(mod, batch_norm_type) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
      ura = nn.merge_param("use_running_average", mod.use_running_average, ura)
      sink.record("/".join(mod.path), not ura, args[0], mod.axis, kwargs.get("mask"),
                  info=(mod.path, mod.unbiased_running_var))
      return next_fun(*args, **{**kwargs, "update_stats": False})

    with nn.intercept_methods(intercept):
      model.apply(vars_, batch, **apply_kwargs)

  sinks: list[Sink] = []

  def discover(batch: Any) -> Sink:
    sink = Sink()
    jax.eval_shape(lambda v, b: forward(v, b, sink), out, batch)
    sinks.append(sink)
    return sink

  capture = _capture(forward)

  def write(key: Any, m: Moments, n: jax.Array) -> None:
    path, unbiased = sinks[0].info[key]
    node = out["batch_stats"]
    for name in path:
      node = node[name]
    node["mean"], node["var"] = population_stats(m, unbiased, node["mean"], node["var"])
    if "count" in node:
      node["count"] = n.astype(node["count"].dtype)

  recompute(type(model).__name__, batches, discover, capture, lambda: out, write, progress,
            cache_key=("linen", model, tuple(sorted(apply_kwargs.items()))))
  return out


class _Recorder:
  """Stands in for a BatchNorm in a throw-away copy of the model: records its input, then calls
  it without updating its statistics."""

  def __init__(self, bn: Any, key: str, sink: Sink):
    self._bn, self._key, self._sink = bn, key, sink

  def __getattr__(self, name: str) -> Any:
    return getattr(self._bn, name)

  def __call__(self, x, use_running_average: bool | None = None, **kwargs):
    ura = first_from(use_running_average, self._bn.use_running_average,
                     error_msg="No `use_running_average` argument was provided to BatchNorm.")
    self._sink.record(self._key, not ura, x, self._bn.axis, kwargs.get("mask"))
    return self._bn(x, use_running_average, **{**kwargs, "update_stats": False})


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
  """Puts `value` at `path` in the (throw-away) model `root`: attributes of modules, items of
  lists and dicts."""
  parent = root
  for name in path[:-1]:
    parent = getattr(parent, name) if isinstance(parent, nnx.Module) else parent[name]
  if isinstance(parent, nnx.Module) and isinstance(path[-1], str):
    object.__setattr__(parent, path[-1], value)
  else:
    parent[path[-1]] = value


def _batch_norms(model: Any, batch_norm_type: Any) -> dict[str, tuple[tuple[Any, ...], Any]]:
  return {"/".join(map(str, path)): (tuple(path), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, batch_norm_type)}


def recompute_nnx(model: Any, batches: Any, batch_norm_type: Any, progress: bool,
                  call_kwargs: dict[str, Any]) -> None:
  """`jaxnorm.nnx.recompute_batch_stats` for the BatchNorms of class `batch_norm_type`."""
  graphdef, _ = nnx.split(model)
  bns = _batch_norms(model, batch_norm_type)

  def forward(state: Any, batch: Any, sink: Sink) -> None:
    copy = nnx.merge(graphdef, state)
    for key, (path, bn) in _batch_norms(copy, batch_norm_type).items():
      _set(copy, path, _Recorder(bn, key, sink))
    copy(batch, **call_kwargs)

  def discover(batch: Any) -> Sink:
    sink = Sink()
    jax.eval_shape(lambda s, b: forward(s, b, sink), nnx.state(model), batch)
    return sink

  capture = _capture(forward)

  def write(key: Any, m: Moments, n: jax.Array) -> None:
    bn = bns[key][1]
    bn.mean[...], bn.var[...] = population_stats(m, bn.unbiased_running_var, bn.mean[...],
                                                 bn.var[...])
    if bn.count is not None:
      bn.count[...] = n.astype(bn.count[...].dtype)

  recompute(type(model).__name__, batches, discover, capture, lambda: nnx.state(model), write,
            progress, cache_key=("nnx", graphdef, tuple(sorted(call_kwargs.items()))))
