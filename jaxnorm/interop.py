"""PyTorch normalization checkpoints to flax variables and back, without importing torch.

One PyTorch normalization layer's `state_dict` entries map onto the variables of the jaxnorm
(or flax) layer of the same kind:

=========================  =====================  ==========================================
PyTorch entry              flax variable          note
=========================  =====================  ==========================================
`weight`                   `params/scale`         absent without affine / `bias=False` only
`bias`                     `params/bias`          absent without affine or with `bias=False`
`running_mean`             `batch_stats/mean`     BatchNorm*, InstanceNorm* (tracked stats)
`running_var`              `batch_stats/var`      PyTorch stores the *unbiased* variance
`num_batches_tracked`      `batch_stats/count`    only with `with_count=True` (momentum=None)
=========================  =====================  ==========================================

This covers `BatchNorm1d/2d/3d`, `LayerNorm`, `GroupNorm`, `RMSNorm` (weight only) and
`InstanceNorm1d/2d/3d(track_running_stats=True)`. What carries over and what does not:

* Evaluation outputs are identical: the stored statistics are used as they are, in both
  libraries, with the same `epsilon` (PyTorch's `eps`, 1e-5 by default for every layer).
* To continue *training* with PyTorch's update rule, build the jaxnorm `BatchNorm` with
  `momentum=jaxnorm.momentum_from_torch(m)` (PyTorch's 0.1 is 0.9 here) and
  `unbiased_running_var=True` (PyTorch stores `var * n / (n - 1)` and normalizes batches with
  the biased variance); for PyTorch's `momentum=None` use `momentum=None` and
  `from_torch(..., with_count=True)`, which carries `num_batches_tracked` over as `count`.
* Activations: PyTorch is channels-first (NCHW), flax channels-last (NHWC). The per-channel
  vectors above need no change; convolution kernels do (OIHW to HWIO,
  `w.transpose(2, 3, 1, 0)`), and a flatten before a Linear layer must flatten in the same
  order.

`from_torch_model` converts every normalization layer of a whole model's `state_dict` in one
call and places each into a flax variables tree, at the module path a `name_map` gives it.

Values may be torch tensors (converted with `.detach().cpu().numpy()`) or anything NumPy
accepts; this module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ("from_torch", "from_torch_model", "to_torch")

_PARAMS = (("weight", "scale"), ("bias", "bias"))
_STATS = (("running_mean", "mean"), ("running_var", "var"))
_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_RUNNING = ("running_mean", "running_var")


def _to_numpy(value: Any) -> np.ndarray:
  """A NumPy array from a torch tensor (duck-typed: `.detach().cpu().numpy()`) or array-like."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def from_torch(state_dict: Mapping[str, Any], prefix: str = "", *,
               with_count: bool = False) -> dict[str, Any]:
  """Flax variables of one PyTorch normalization layer, from its `state_dict` entries.

  Reads `{prefix}weight`, `{prefix}bias`, `{prefix}running_mean`, `{prefix}running_var` and
  (with `with_count=True`) `{prefix}num_batches_tracked`, whichever the layer has, and returns
  `{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}` with the entries present
  (a `LayerNorm` has no `batch_stats`; a `BatchNorm2d(affine=False)` no `params`). The arrays
  keep their dtype (float32 for a default PyTorch model); `count` is an int32 scalar.

  Args:
    state_dict: a PyTorch `state_dict` (a model's or one layer's), values torch tensors or
      arrays.
    prefix: the layer's key prefix, with its trailing dot (`"features.1."`); "" for a layer's
      own `state_dict`.
    with_count: also return `batch_stats/count` from `num_batches_tracked`, which
      `BatchNorm(momentum=None)` needs (PyTorch's cumulative average).

  Returns:
    A dict of flax variables for `jaxnorm.linen` (or `flax.linen`) layers.

  Raises:
    KeyError: no entry of a normalization layer under `prefix`, only one of `running_mean` and
      `running_var`, or `with_count=True` without `num_batches_tracked`.
    ValueError: the entries do not all have the layer's feature shape, the running statistics
      are not vectors, or `num_batches_tracked` is not a scalar.

  Example:
    >>> import numpy as np
    >>> from jaxnorm import interop
    >>> sd = {"bn.weight": np.ones(2, np.float32), "bn.bias": np.zeros(2, np.float32),
    ...       "bn.running_mean": np.array([0.5, 1.0], np.float32),
    ...       "bn.running_var": np.array([2.0, 3.0], np.float32),
    ...       "bn.num_batches_tracked": np.array(7)}
    >>> v = interop.from_torch(sd, "bn.", with_count=True)
    >>> v["batch_stats"]
    {'mean': Array([0.5, 1. ], dtype=float32), 'var': Array([2., 3.], dtype=float32),
     'count': Array(7, dtype=int32)}
  """
  present = {k: _to_numpy(state_dict[prefix + k]) for k in _KEYS if prefix + k in state_dict}
  expected = [prefix + k for k in _KEYS]
  if not set(present) - {"num_batches_tracked"}:
    near = sorted(k for k in state_dict if k.startswith(prefix))[:8]
    raise KeyError(
        f"state_dict has no normalization-layer entries under prefix {prefix!r}: expected "
        f"some of {expected}; keys under that prefix: {near or 'none'}. Give the layer's "
        f"prefix with its trailing dot (e.g. 'features.1.'). A layer with no entries at all "
        f"(LayerNorm(elementwise_affine=False)) has no flax variables either.")
  if ("running_mean" in present) != ("running_var" in present):
    have, missing = (("running_mean", "running_var") if "running_mean" in present
                     else ("running_var", "running_mean"))
    raise KeyError(f"state_dict has {prefix + have!r} but not {prefix + missing!r}; running "
                   f"statistics come in pairs (expected keys: {expected}).")
  if with_count and "num_batches_tracked" not in present:
    raise KeyError(f"with_count=True needs {prefix + 'num_batches_tracked'!r}, which "
                   f"state_dict lacks (expected keys: {expected}); PyTorch stores it for "
                   f"BatchNorm* and InstanceNorm*(track_running_stats=True).")
  shapes = {k: v.shape for k, v in present.items() if k != "num_batches_tracked"}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"the entries under prefix {prefix!r} must all have the layer's feature "
                     f"shape; got shapes {shapes}.")
  if "running_mean" in present and present["running_mean"].ndim != 1:
    raise ValueError(f"{prefix}running_mean must be a vector (one value per channel); got "
                     f"shape {present['running_mean'].shape}.")
  out: dict[str, Any] = {}
  params = {name: jnp.asarray(present[key]) for key, name in _PARAMS if key in present}
  if params:
    out["params"] = params
  stats = {name: jnp.asarray(present[key]) for key, name in _STATS if key in present}
  if stats:
    if with_count:
      n = present["num_batches_tracked"]
      if n.shape != ():
        raise ValueError(f"{prefix}num_batches_tracked must be a scalar; got shape {n.shape}.")
      stats["count"] = jnp.asarray(int(n), jnp.int32)
    out["batch_stats"] = stats
  return out


def from_torch_model(state_dict: Mapping[str, Any],
                     name_map: Mapping[str, str] | Callable[[str], str | None], *,
                     with_count: bool = False, variables: Mapping[str, Any] | None = None,
                     skip: Iterable[str] = ()) -> dict[str, Any]:
  """Flax variables of every normalization layer of a PyTorch model, from its `state_dict`.

  Each PyTorch module named by `name_map` (its prefix without the trailing dot, as in
  `model.named_modules()`: `"layer1.0.bn1"`) is converted by `from_torch` and placed at the
  flax module path that `name_map` gives it (`"layer1_0/BatchNorm_1"`, `/`-separated, or a
  tuple of names): its `params` under `params/<path>`, its running statistics under
  `batch_stats/<path>`. Every module of the `state_dict` with `running_mean` and `running_var`
  (BatchNorm*, InstanceNorm* with tracked statistics) must be mapped or listed in `skip`; a
  LayerNorm, GroupNorm or RMSNorm holds only `weight` (and `bias`), as a Linear or Conv does,
  so it is converted where `name_map` names it. Entries of other modules (convolutions,
  linear layers) are left alone: convert them yourself, or pass the tree they are in as
  `variables`.

  Args:
    state_dict: a whole PyTorch model's `state_dict`, values torch tensors or arrays.
    name_map: a dict from PyTorch module prefix to flax module path, or a callable that takes
      each module prefix of the `state_dict` and returns its flax path, or None for a module
      that is not a normalization layer to convert.
    with_count: also carry `num_batches_tracked` over as `batch_stats/<path>/count` for the
      layers with running statistics (needed by `BatchNorm(momentum=None)`).
    variables: an existing flax variables tree (for example `model.init(...)`'s, or one that
      holds the converted convolutions) to merge into: the result is a copy of it with the
      converted entries replaced, each of which must keep the shape it has there. The default
      builds a tree of the normalization layers alone.
    skip: module prefixes with running statistics that are deliberately not converted.

  Returns:
    Nested dicts of `jax.Array` leaves: the collections `params` and `batch_stats` (and the
    other collections of `variables`, as they were).

  Raises:
    KeyError: a `name_map` key that is no module of `state_dict`, or modules with running
      statistics that are neither mapped nor in `skip` (all of them are named), or an error of
      `from_torch` on one layer (its prefix is in the message).
    ValueError: two modules mapped to the same flax path, an empty path, or, with `variables`,
      a converted entry whose shape differs from the one there, or whose layer there holds
      other entries (a convolution's `kernel`) or is not a dict.

  Example:
    >>> import numpy as np
    >>> from jaxnorm import interop
    >>> def bn(prefix):  # the entries of a PyTorch BatchNorm2d(2)
    ...   return {f"{prefix}.{k}": np.full(2, v, np.float32) for k, v in
    ...           (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1))}
    >>> sd = {"conv1.weight": np.ones((2, 3, 3, 3), np.float32), **bn("bn1"),
    ...       **bn("layer1.0.bn1")}
    >>> v = interop.from_torch_model(sd, {"bn1": "BatchNorm_0",
    ...                                   "layer1.0.bn1": "layer1_0/BatchNorm_0"})
    >>> jax.tree.map(jnp.shape, v["batch_stats"])
    {'BatchNorm_0': {'mean': (2,), 'var': (2,)},
     'layer1_0': {'BatchNorm_0': {'mean': (2,), 'var': (2,)}}}
  """
  modules: dict[str, set[str]] = {}
  for key in state_dict:
    prefix, _, entry = key.rpartition(".")
    modules.setdefault(prefix, set()).add(entry)
  running = {m for m, entries in modules.items() if set(_RUNNING) & entries}
  skip = set(skip)
  if callable(name_map):
    mapping = {m: path for m in modules if (path := name_map(m)) is not None}
  else:
    mapping = dict(name_map)
    unknown = sorted(m for m in mapping if m not in modules)
    if unknown:
      raise KeyError(f"name_map names modules that state_dict does not have: {unknown}. Give "
                     f"PyTorch module prefixes without the trailing dot, as in "
                     f"model.named_modules(); modules with entries: {sorted(modules)[:12]}.")
  unknown_skips = sorted(skip - set(modules))
  if unknown_skips:
    raise KeyError(f"skip names modules that state_dict does not have: {unknown_skips}.")
  unmapped = sorted(running - set(mapping) - skip)
  if unmapped:
    raise KeyError(f"state_dict has normalization layers with running statistics that name_map "
                   f"does not map: {unmapped}. Map each to its flax module path (e.g. "
                   f"{{{unmapped[0]!r}: 'BatchNorm_0'}}) or list it in skip=.")
  paths: dict[tuple[str, ...], str] = {}
  for module, path in mapping.items():
    parts = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
    if not parts or not all(isinstance(p, str) and p for p in parts):
      raise ValueError(f"name_map maps {module!r} to {path!r}: a flax module path must be a "
                       f"non-empty '/'-separated string (e.g. 'layer1_0/BatchNorm_1') or a "
                       f"tuple of names.")
    if parts in paths:
      raise ValueError(f"name_map maps both {paths[parts]!r} and {module!r} to the flax path "
                       f"{'/'.join(parts)!r}; each layer needs its own path.")
    paths[parts] = module
  out = _copy_tree(variables) if variables is not None else {}
  for parts, module in paths.items():
    try:
      layer = from_torch(state_dict, module + "." if module else "",
                         with_count=with_count and module in running)
    except KeyError as e:
      raise KeyError(f"module {module!r} (mapped to {'/'.join(parts)!r}): {e.args[0]}") from e
    for collection, leaves in layer.items():
      _place(out, (collection, *parts), leaves)
  return out


def _copy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _place(tree: dict[str, Any], path: tuple[str, ...], leaves: Mapping[str, Any]) -> None:
  """Puts `leaves` at `path` in `tree` (nested dicts), checking the shapes of leaves already
  there."""
  node, existed = tree, True
  for i, name in enumerate(path):
    existed = existed and name in node
    child = node.setdefault(name, {})
    if not isinstance(child, dict):
      raise ValueError(f"variables hold a {type(child).__name__} at {'/'.join(path[:i + 1])!r}, "
                       f"where the converted layer's entries go; expected a dict of them.")
    node = child
  for name, value in leaves.items():
    if existed and node and name not in node:
      raise ValueError(f"variables have no {'/'.join((*path, name))!r} (that layer holds "
                       f"{sorted(node)}): name_map maps a module to a layer of another kind.")
    if name in node and np.shape(node[name]) != value.shape:
      raise ValueError(f"the converted {'/'.join((*path, name))!r} has shape {value.shape}, but "
                       f"variables hold shape {np.shape(node[name])} there: name_map maps a "
                       f"module to the wrong flax layer, or the model was built with other "
                       f"sizes.")
    node[name] = value


def _leaf(tree: Mapping[str, Any], key: str) -> np.ndarray:
  value = tree[key]
  if isinstance(value, jax.Array):
    value = jax.device_get(value)
  return np.array(value)  # a copy, writable (torch.from_numpy warns on read-only arrays)


def _numpy_native(a: np.ndarray) -> np.ndarray:
  """`a`, or in float32 where its dtype is not one of NumPy's own (bfloat16 and the float8
  types come from ml_dtypes, which `torch.from_numpy` rejects); float32 holds their values
  exactly, and `load_state_dict` casts them back to the layer's dtype."""
  if a.dtype.kind == "V" or (jnp.issubdtype(a.dtype, jnp.floating)
                             and a.dtype not in (np.float16, np.float32, np.float64)):
    return a.astype(np.float32)
  return a


def to_torch(variables: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """PyTorch `state_dict` entries of one normalization layer, from its flax variables.

  The inverse of `from_torch`: `params/scale` and `params/bias` become `{prefix}weight` and
  `{prefix}bias`; `batch_stats/mean` and `batch_stats/var` become `{prefix}running_mean` and
  `{prefix}running_var`, together with `{prefix}num_batches_tracked`, an int64 scalar taken
  from `batch_stats/count` when present (the largest entry of a per-feature count), else 0.
  After `torch.from_numpy` on each value the dict loads into the PyTorch layer with
  `load_state_dict(..., strict=True)`. Entries in a dtype that NumPy does not have itself
  (bfloat16, the float8 types) come back in float32, which holds their values exactly;
  `load_state_dict` casts them to the layer's dtype.

  Args:
    variables: the layer's variables, `{"params": ..., "batch_stats": ...}` (either may be
      absent).
    prefix: prepended to every key (`"features.1."`).

  Returns:
    A dict from key to NumPy array.

  Raises:
    KeyError: neither `params` nor `batch_stats` holds a normalization layer's entries, or
      only one of `mean` and `var` is present.
    ValueError: an entry that a PyTorch normalization layer does not have (for example a
      `kernel`: give one layer's variables, not a model's), or entries of different shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm import interop
    >>> v = {"params": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
    ...      "batch_stats": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
    >>> sd = interop.to_torch(v, "bn.")
    >>> sorted(sd)
    ['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var', 'bn.weight']
    >>> sd["bn.num_batches_tracked"]
    array(0)
  """
  params = dict(variables.get("params", {}))
  stats = dict(variables.get("batch_stats", {}))
  extra = ([f"params/{k}" for k in params if k not in ("scale", "bias")]
           + [f"batch_stats/{k}" for k in stats if k not in ("mean", "var", "count")]
           + [k for k in variables if k not in ("params", "batch_stats")])
  if extra:
    raise ValueError(f"variables hold entries that a PyTorch normalization layer does not have: "
                     f"{extra}. Give one normalization layer's variables, e.g. "
                     f"{{'params': params['BatchNorm_0'], 'batch_stats': "
                     f"batch_stats['BatchNorm_0']}}.")
  if not params and not ({"mean", "var"} & set(stats)):
    raise KeyError("variables hold no normalization-layer entries: expected params/scale, "
                   "params/bias, batch_stats/mean and batch_stats/var (whichever the layer "
                   f"has); got {_describe(variables)}.")
  if ("mean" in stats) != ("var" in stats):
    raise KeyError(f"batch_stats must hold both 'mean' and 'var'; got {sorted(stats)}.")
  out: dict[str, np.ndarray] = {}
  for key, name in _PARAMS:
    if name in params:
      out[prefix + key] = _numpy_native(_leaf(params, name))
  for key, name in _STATS:
    if name in stats:
      out[prefix + key] = _numpy_native(_leaf(stats, name))
  shapes = {k: v.shape for k, v in out.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"the layer's entries must all have its feature shape; got {shapes}.")
  if "mean" in stats:
    # A per-feature count (per_feature_count=True) has no PyTorch counterpart: its largest
    # entry, the updates of the most often seen feature, as PyTorch counts every batch.
    count = int(np.max(_leaf(stats, "count"))) if "count" in stats else 0
    out[prefix + "num_batches_tracked"] = np.array(count, np.int64)
  return out


def _describe(variables: Mapping[str, Any]) -> str:
  return str({k: sorted(v) if isinstance(v, Mapping) else type(v).__name__
              for k, v in variables.items()})
