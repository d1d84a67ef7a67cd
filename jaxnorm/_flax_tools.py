"""Model tools for flax: variable-tree surgery and the framework side of precise statistics.

`fold_model` finds the (Dense/Conv, BatchNorm) pairs of a linen model as written by tracing one
call under flax's method interceptor, and folds them (`jaxnorm.linen.fold_model`);
`fold_variables` folds named pairs of a linen variables tree (`jaxnorm.linen.fold_batch_norms`);
`fold_norms` traces the same way to find each LayerNorm/RMSNorm whose output only Dense layers
read, and folds its scale and offset into them (`jaxnorm.linen.fold_norms_into_dense`);
`fold_nnx` and `fold_norms_nnx` apply the same rules to an nnx model, traced on a throw-away
copy whose layers record what they receive, and fold in place (`jaxnorm.nnx.fold_model`,
`jaxnorm.nnx.fold_norms_into_dense`);
`recompute_linen` and `recompute_nnx` run a model while capturing the input of each jaxnorm
`BatchNorm` and hand the driver of `_recompute` what it needs
(`jaxnorm.linen.recompute_batch_stats`, `jaxnorm.nnx.recompute_batch_stats`). The layer classes
are passed in, so this module imports neither `linen` nor `nnx`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.nnx.module import first_from
from jax.ad_checkpoint import checkpoint_name

from ._fold import fold_batch_norm, fold_norm_into_dense
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


def _parent(root: Any, path: tuple[Any, ...]) -> Any:
  """The module, list or dict that holds the last element of `path` in the nnx model `root`
  (a name is an attribute, an index an item: of a list, a dict or an `nnx.List`)."""
  parent = root
  for name in path[:-1]:
    parent = (getattr(parent, name) if isinstance(parent, nnx.Module) and isinstance(name, str)
              else parent[name])
  return parent


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
  """Puts `value` at `path` in the (throw-away) model `root`: attributes of modules, items of
  lists and dicts."""
  parent = _parent(root, path)
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


_MARK = "jaxnorm.fold."  # prefix of the names that tag layer outputs while tracing a model


@dataclasses.dataclass(frozen=True)
class Folding:
  """A linen model's BatchNorms folded into the layers before them (`linen.fold_model`).

  Attributes:
    variables: the folded variables (plain dicts): each folded layer's `kernel` and `bias` are
      those of layer → BatchNorm, and the folded BatchNorms' `params` and `batch_stats` are gone.
    folded: `{layer_path: batchnorm_path}` of the pairs folded.
    unfolded: `{batchnorm_path: reason}` for each BatchNorm left as it was.
    apply: `apply(variables, *args, **kwargs)`: `model.apply` with the folded BatchNorms
      skipped (each returns its input, cast to the dtype it returned) and the folded bias added
      after a layer built without one.
  """

  variables: dict[str, Any]
  folded: dict[str, str]
  unfolded: dict[str, str]
  apply: Callable[..., Any]


@dataclasses.dataclass
class _Trace:
  """What one traced evaluation-mode call of the model showed: the calls of each layer and
  BatchNorm, which layer output each BatchNorm received, and the marks to count uses of."""

  layer_calls: dict[str, int] = dataclasses.field(default_factory=dict)
  layer_bias: dict[str, bool] = dataclasses.field(default_factory=dict)
  outputs: dict[int, tuple[str, Any]] = dataclasses.field(default_factory=dict)
  bn_calls: dict[str, list[tuple[str | None, str | None]]] = dataclasses.field(
      default_factory=dict)
  bn_info: dict[str, tuple[float, Any]] = dataclasses.field(default_factory=dict)


def _why_not(axis: Any, training: bool, x: Any) -> str | None:
  """Why a BatchNorm call (feature `axis`, on `x`) cannot be folded into a layer, from its own
  settings; None if it can."""
  if training:
    return ("it runs in training mode (use_running_average=False): folding is for "
            "evaluation; pass the model's evaluation-mode arguments (e.g. train=False)")
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if tuple(a % x.ndim for a in axes) != (x.ndim - 1,):
    return (f"its feature axis is {axis!r}, not the last axis, along which a Dense or Conv "
            f"kernel holds its output features")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return f"its input has dtype {x.dtype}, not a real floating dtype"
  return None


def _layer_output(trace: _Trace, path: str, use_bias: bool, y: Any) -> Any:
  """Records a call of the layer at `path` and returns its output `y` tagged with a named
  identity, so that its uses can be counted in the jaxpr."""
  trace.layer_calls[path] = trace.layer_calls.get(path, 0) + 1
  trace.layer_bias[path] = bool(use_bias)
  y = checkpoint_name(y, f"{_MARK}{len(trace.outputs)}")
  trace.outputs[id(y)] = (path, y)  # y is kept alive, so its id stays unique
  return y


def _bn_input(trace: _Trace, path: str, x: Any, why: str | None) -> Any:
  """Records a call of the BatchNorm at `path` on `x`; returns the input to call it with (a
  layer's output passes through one named identity: one use, whatever the BatchNorm does)."""
  source = trace.outputs.get(id(x), (None, None))
  layer = source[0] if source[1] is x else None
  trace.bn_calls.setdefault(path, []).append((layer, why))
  return x if layer is None else checkpoint_name(x, _MARK + "bn")


def _tracer(bn_type: Any, trace: _Trace) -> Callable[..., Any]:
  """The linen interceptor of the tracing run (see `_layer_output` and `_bn_input`)."""

  def intercept(next_fun, args, kwargs, context):
    mod: Any = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(mod.path)
    if isinstance(mod, (nn.Dense, nn.Conv)):
      return _layer_output(trace, path, mod.use_bias, next_fun(*args, **kwargs))
    if not isinstance(mod, bn_type):
      return next_fun(*args, **kwargs)
    ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    ura = nn.merge_param("use_running_average", mod.use_running_average, ura)
    x = _bn_input(trace, path, args[0], _why_not(mod.axis, not ura, jnp.asarray(args[0])))
    y = next_fun(x, *args[1:], **kwargs)
    trace.bn_info[path] = (float(mod.epsilon), y.dtype)
    return y

  return intercept


def _mark_uses(jaxpr: Any, uses: dict[str, int]) -> None:
  """Adds to `uses[name]` the number of uses of each tagged layer output in `jaxpr` and the
  jaxprs nested in it."""
  marks = {eqn.outvars[0]: eqn.params["name"] for eqn in jaxpr.eqns
           if eqn.primitive.name == "name" and eqn.params["name"].startswith(_MARK)}
  for var in [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars):
    if isinstance(var, jax_core.Var) and var in marks:
      uses[marks[var]] = uses.get(marks[var], 0) + 1
  for sub in jax_core.subjaxprs(jaxpr):
    _mark_uses(sub, uses)


def _pairs(trace: _Trace, uses: dict[str, int]) -> tuple[dict[str, str], dict[str, str]]:
  """The foldable (layer, BatchNorm) pairs of a traced call, and why the others are not."""
  marks: dict[str, list[str]] = {}
  for i, (path, _) in enumerate(trace.outputs.values()):
    marks.setdefault(path, []).append(f"{_MARK}{i}")
  folded, unfolded = {}, {}
  for bn, calls in trace.bn_calls.items():
    layer, why = calls[0]
    if why is None:
      why = _pair_reason(trace, uses, marks, len(calls), layer)
    if why is None and layer is not None:
      folded[layer] = bn
    else:
      unfolded[bn] = why or ""
  return folded, unfolded


def _pair_reason(trace: _Trace, uses: dict[str, int], marks: dict[str, list[str]],
                 n_calls: int, layer: str | None) -> str | None:
  """Why a BatchNorm called `n_calls` times, first on the output of `layer` (None: not a layer
  output), cannot be folded into it; None if it can."""
  if n_calls > 1:
    return f"it is called {n_calls} times; only a BatchNorm called once is folded"
  if layer is None:
    return ("its input is not exactly the output of a Dense or Conv layer (something is "
            "computed in between)")
  if trace.layer_calls[layer] > 1:
    return (f"its layer {layer!r} is called {trace.layer_calls[layer]} times; folding would "
            "change its other calls")
  if any(uses.get(m, 0) > 1 for m in marks[layer]):
    return f"the output of its layer {layer!r} is also used elsewhere, which needs it unnormalized"
  return None


def _traced_uses(model: Any, variables: dict[str, Any], args: tuple[Any, ...],
                 apply_kwargs: dict[str, Any], interceptor: Any) -> dict[str, int]:
  """Traces one `model.apply` (shapes only) under `interceptor`, which records the layers it
  sees, and counts the uses of each marked output in the jaxpr (`_mark_uses`)."""
  def run(v: Any) -> Any:
    with nn.intercept_methods(interceptor):
      return model.apply(v, *args, **apply_kwargs)

  uses: dict[str, int] = {}
  _mark_uses(jax.make_jaxpr(run)(variables).jaxpr, uses)
  return uses


def fold_model(model: Any, variables: Mapping[str, Any], args: tuple[Any, ...],
               apply_kwargs: dict[str, Any], bn_type: Any) -> Folding:
  """`jaxnorm.linen.fold_model`: finds the pairs by tracing one call, folds them."""
  out = as_dict(variables)
  trace = _Trace()
  uses = _traced_uses(model, out, args, apply_kwargs, _tracer(bn_type, trace))
  folded, unfolded = _pairs(trace, uses)
  if folded:
    out = fold_variables(out, folded, epsilon={bn: trace.bn_info[bn][0]
                                               for bn in folded.values()})
  return Folding(out, folded, unfolded, _folded_apply(model, folded, trace, bn_type))


def _folded_apply(model: Any, folded: dict[str, str], trace: _Trace,
                  bn_type: Any) -> Callable[..., Any]:
  """`model.apply` with the folded BatchNorms skipped and the bias of a folded layer built
  without one added after it."""
  skip = {bn: trace.bn_info[bn][1] for bn in folded.values()}
  add_bias = {layer for layer in folded if not trace.layer_bias[layer]}

  def intercept(next_fun, args, kwargs, context):
    mod: Any = context.module
    path = "/".join(mod.path)
    if context.method_name == "__call__" and isinstance(mod, bn_type) and path in skip:
      return jnp.asarray(args[0]).astype(skip[path])
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and path in add_bias:
      y = y + jnp.asarray(mod.get_variable("params", "bias")).astype(y.dtype)  # as flax casts
    return y

  def apply(variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    with nn.intercept_methods(intercept):
      return model.apply(variables, *args, **kwargs)

  return apply


@dataclasses.dataclass
class _NormTrace:
  """What one traced call showed of each norm: its calls (with why it cannot be folded, from
  its own settings), its tagged output, and the Dense layers that read that output as is."""

  norm_calls: dict[str, list[str | None]] = dataclasses.field(default_factory=dict)
  outputs: dict[int, tuple[str, Any]] = dataclasses.field(default_factory=dict)
  readers: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  dense_calls: dict[str, int] = dataclasses.field(default_factory=dict)
  dense_bias: dict[str, bool] = dataclasses.field(default_factory=dict)
  zero_centered: dict[str, bool] = dataclasses.field(default_factory=dict)


def _norm_why_not(mod: Any, x: Any) -> str | None:
  """Why a norm call on `x` cannot be folded into the Dense layers after it; None if it can."""
  axes = mod.feature_axes
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if tuple(a % x.ndim for a in axes) != (x.ndim - 1,):
    return (f"its feature_axes is {mod.feature_axes!r}, not the last axis, which a Dense "
            f"kernel contracts")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return f"its input has dtype {x.dtype}, not a real floating dtype"
  return None


def _zero_centered(mod: Any) -> bool:
  """Whether a norm's `scale` stores γ - 1 (`zero_centered_scale`, or Gemma's convention)."""
  return bool(getattr(mod, "zero_centered_scale", False)
              or getattr(mod, "convention", None) == "gemma")


def _norm_output(trace: _NormTrace, path: str, mod: Any, x: Any, y: Any) -> Any:
  """Records a call of the norm `mod` at `path` on `x`; returns its output `y` tagged with a
  named identity, so that its uses can be counted in the jaxpr."""
  trace.norm_calls.setdefault(path, []).append(_norm_why_not(mod, jnp.asarray(x)))
  trace.zero_centered[path] = _zero_centered(mod)
  y = checkpoint_name(y, f"{_MARK}norm{len(trace.outputs)}")
  trace.outputs[id(y)] = (path, y)  # y is kept alive, so its id stays unique
  return y


def _dense_input(trace: _NormTrace, path: str, use_bias: bool, x: Any) -> Any:
  """Records a call of the Dense layer at `path` on `x`; returns the input to call it with (a
  norm's output passes through one named identity: one use, whatever the layer does)."""
  trace.dense_calls[path] = trace.dense_calls.get(path, 0) + 1
  trace.dense_bias[path] = bool(use_bias)
  norm, y = trace.outputs.get(id(x), ("", None))
  if y is not x:
    return x
  trace.readers.setdefault(norm, []).append(path)
  return checkpoint_name(x, _MARK + "dense")


def _norm_tracer(norm_types: Any, trace: _NormTrace) -> Callable[..., Any]:
  """The linen interceptor of `fold_norms`' tracing run (see `_norm_output`, `_dense_input`)."""

  def intercept(next_fun, args, kwargs, context):
    mod: Any = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(mod.path)
    if isinstance(mod, norm_types):
      return _norm_output(trace, path, mod, args[0], next_fun(*args, **kwargs))
    if isinstance(mod, nn.Dense):
      return next_fun(_dense_input(trace, path, mod.use_bias, args[0]), *args[1:], **kwargs)
    return next_fun(*args, **kwargs)

  return intercept


def _norm_reason(trace: _NormTrace, uses: dict[str, int], norm: str, mark: str,
                 offset: bool) -> str | None:
  """Why the norm at `norm` (its output tagged `mark`; `offset`: it has a bias) cannot be
  folded into the Dense layers that read it; None if it can."""
  calls = trace.norm_calls[norm]
  if len(calls) > 1:
    return f"it is called {len(calls)} times; only a norm called once is folded"
  if calls[0] is not None:
    return calls[0]
  readers = trace.readers.get(norm, [])
  if not readers:
    return "no Dense layer reads its output as is"
  if uses.get(mark, 0) != len(readers):
    return ("its output is also used by something other than a Dense layer (a residual, an "
            "activation...), which needs the scale and offset applied")
  for dense in readers:
    if trace.dense_calls[dense] > 1:
      return (f"the Dense layer {dense!r} that reads it is called {trace.dense_calls[dense]} "
              f"times; folding would change its other calls")
    if offset and not trace.dense_bias[dense]:
      return (f"it has an offset (bias) and the Dense layer {dense!r} that reads it has no "
              f"bias to fold it into (use_bias=False)")
  return None


def _norm_plan(trace: _NormTrace, uses: dict[str, int],
               has_offset: Callable[[str], bool]) -> tuple[dict[str, list[str]], dict[str, str]]:
  """`{norm: its Dense readers}` for the norms that fold, and `{norm: reason}` for the others
  (`has_offset(norm)`: the norm has a bias)."""
  marks = {path: f"{_MARK}norm{i}" for i, (path, _) in enumerate(trace.outputs.values())}
  plan: dict[str, list[str]] = {}
  unfolded: dict[str, str] = {}
  for norm in trace.norm_calls:
    why = _norm_reason(trace, uses, norm, marks[norm], has_offset(norm))
    if why is None:
      plan[norm] = trace.readers[norm]
    else:
      unfolded[norm] = why
  return plan, unfolded


def _readers_of(plan: dict[str, list[str]]) -> dict[str, str]:
  return {dense: norm for norm, readers in plan.items() for dense in readers}


def fold_norms(model: Any, variables: Mapping[str, Any], args: tuple[Any, ...],
               apply_kwargs: dict[str, Any], norm_types: Any) -> Folding:
  """`jaxnorm.linen.fold_norms_into_dense`: finds the norm → Dense readers by tracing one call,
  folds each norm's scale and offset into its readers and resets the norm to the identity
  affine map (scale 1, or 0 when zero-centred; offset 0)."""
  out = as_dict(variables)
  trace = _NormTrace()
  uses = _traced_uses(model, out, args, apply_kwargs, _norm_tracer(norm_types, trace))
  plan, unfolded = _norm_plan(trace, uses, lambda norm: "bias" in _norm_params(out, norm))
  for norm, readers in plan.items():
    dense = [_get(out, "params", _split(d), "Dense") for d in readers]
    _fold_norm_readers(_norm_params(out, norm), dense, trace.zero_centered[norm])
  return Folding(out, _readers_of(plan), unfolded, model.apply)


def _norm_params(tree: dict[str, Any], norm: str) -> dict[str, Any]:
  try:
    return _get(tree, "params", _split(norm), "norm")
  except KeyError:  # use_scale=False and use_bias=False: no params
    return {}


def _fold_norm_readers(params: dict[str, Any], readers: list[dict[str, Any]],
                       zero_centered: bool) -> None:
  """Folds a norm's `params` (`scale`, `bias`) into each Dense layer's params in `readers`
  (`kernel`, `bias`), then resets them: all in place."""
  scale, offset = params.get("scale"), params.get("bias")
  if scale is None and offset is None:
    return  # use_scale=False, use_bias=False: nothing to fold
  if scale is None:
    gamma = jnp.ones_like(jnp.asarray(offset))
  else:
    gamma = jnp.asarray(scale) + 1 if zero_centered else jnp.asarray(scale)
  for dparams in readers:
    kernel, bias = fold_norm_into_dense(dparams["kernel"], dparams.get("bias"), scale=gamma,
                                        offset=offset)
    dparams["kernel"] = kernel
    if "bias" in dparams or offset is not None:  # no bias where the layer has none to hold it
      dparams["bias"] = bias
  if scale is not None:
    params["scale"] = (jnp.zeros_like if zero_centered else jnp.ones_like)(scale)
  if offset is not None:
    params["bias"] = jnp.zeros_like(offset)


class _LayerRecorder:
  """Stands in for a Dense/Conv layer in a throw-away copy of an nnx model while tracing."""

  def __init__(self, layer: Any, key: str, trace: Any):
    self._layer, self._key, self._trace = layer, key, trace

  def __getattr__(self, name: str) -> Any:
    return getattr(self._layer, name)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    y = self._layer(*args, **kwargs)
    return _layer_output(self._trace, self._key, self._layer.bias is not None, y)


class _NormRecorder(_LayerRecorder):
  """Stands in for a LayerNorm/RMSNorm in a throw-away copy of an nnx model while tracing."""

  def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
    return _norm_output(self._trace, self._key, self._layer, x, self._layer(x, *args, **kwargs))


class _LinearRecorder(_LayerRecorder):
  """Stands in for a Linear layer in a throw-away copy of an nnx model while `fold_norms_nnx`
  traces it."""

  def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
    x = _dense_input(self._trace, self._key, self._layer.bias is not None, x)
    return self._layer(x, *args, **kwargs)


class _BatchNormRecorder(_LayerRecorder):
  """Stands in for a BatchNorm in a throw-away copy of an nnx model while tracing."""

  def __call__(self, x, use_running_average: bool | None = None, **kwargs):
    bn = self._layer
    ura = first_from(use_running_average, bn.use_running_average,
                     error_msg="No `use_running_average` argument was provided to BatchNorm.")
    x_in = _bn_input(self._trace, self._key, x, _why_not(bn.axis, not ura, jnp.asarray(x)))
    y = bn(x_in, use_running_average, **kwargs)
    self._trace.bn_info[self._key] = (float(bn.epsilon), y.dtype)
    return y


class FoldedBatchNorm(nnx.Module):
  """What `jaxnorm.nnx.fold_model` puts in place of a folded BatchNorm: returns its input, in
  the dtype the BatchNorm returned (its affine map is in the layer before it)."""

  def __init__(self, dtype: Any):
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
    return jnp.asarray(x).astype(self.dtype)


def _nnx_modules(model: Any, types: Any) -> dict[str, tuple[tuple[Any, ...], Any]]:
  return {"/".join(map(str, path)): (tuple(path), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, types)}


def _nnx_traced_uses(model: Any, args: tuple[Any, ...], call_kwargs: dict[str, Any],
                     types: Any, recorder: Callable[[Any, str], Any]) -> dict[str, int]:
  """Traces one call `model(*args, **call_kwargs)` (shapes only) on a throw-away copy whose
  modules of `types` are replaced by `recorder(module, path)`, and counts the uses of each
  marked output in the jaxpr (`_mark_uses`)."""
  graphdef, state = nnx.split(model)

  def run(state: Any) -> Any:
    copy = nnx.merge(graphdef, state)
    for key, (path, m) in _nnx_modules(copy, types).items():
      _set(copy, path, recorder(m, key))
    return copy(*args, **call_kwargs)

  uses: dict[str, int] = {}
  _mark_uses(jax.make_jaxpr(run)(state).jaxpr, uses)
  return uses


def fold_nnx(model: Any, args: tuple[Any, ...], call_kwargs: dict[str, Any],
             bn_type: Any) -> tuple[dict[str, str], dict[str, str]]:
  """`jaxnorm.nnx.fold_model`: traces one call on a copy, folds the pairs in place."""
  trace = _Trace()
  types = (nnx.Linear, nnx.Conv, bn_type)

  def recorder(m: Any, key: str) -> Any:
    return (_BatchNormRecorder if isinstance(m, bn_type) else _LayerRecorder)(m, key, trace)

  uses = _nnx_traced_uses(model, args, call_kwargs, types, recorder)
  folded, unfolded = _pairs(trace, uses)
  modules = _nnx_modules(model, types)
  for layer, bn in folded.items():
    _fold_nnx_pair(modules[layer][1], modules[bn][1], trace.bn_info[bn][0])
    _replace(model, modules[bn][0], FoldedBatchNorm(trace.bn_info[bn][1]))
  return folded, unfolded


def _nnx_params(module: Any, names: tuple[str, ...]) -> dict[str, Any]:
  """The values of `module`'s variables `names` that it has (a missing bias is None)."""
  return {n: getattr(module, n)[...] for n in names if getattr(module, n, None) is not None}


def fold_norms_nnx(model: Any, args: tuple[Any, ...], call_kwargs: dict[str, Any],
                   norm_types: Any) -> tuple[dict[str, str], dict[str, str]]:
  """`jaxnorm.nnx.fold_norms_into_dense`: the rules of `fold_norms` on one call traced on a
  copy; folds in place."""
  trace = _NormTrace()
  types = (nnx.Linear, *norm_types)

  def recorder(m: Any, key: str) -> Any:
    return (_NormRecorder if isinstance(m, norm_types) else _LinearRecorder)(m, key, trace)

  uses = _nnx_traced_uses(model, args, call_kwargs, types, recorder)
  modules = {key: m for key, (_, m) in _nnx_modules(model, types).items()}
  has_offset = lambda norm: getattr(modules[norm], "bias", None) is not None
  plan, unfolded = _norm_plan(trace, uses, has_offset)
  for norm, readers in plan.items():
    params = _nnx_params(modules[norm], ("scale", "bias"))
    dense = [_nnx_params(modules[d], ("kernel", "bias")) for d in readers]
    _fold_norm_readers(params, dense, trace.zero_centered[norm])
    for m, values in zip([modules[norm], *(modules[d] for d in readers)], [params, *dense],
                         strict=True):
      for name, value in values.items():
        getattr(m, name)[...] = value
  return _readers_of(plan), unfolded


def _replace(root: Any, path: tuple[Any, ...], value: Any) -> None:
  """Puts the module `value` at `path` in the nnx model `root`, through nnx's own setattr."""
  parent = _parent(root, path)
  if isinstance(parent, nnx.Module) and isinstance(path[-1], str):
    setattr(parent, path[-1], value)
  else:
    parent[path[-1]] = value


def _fold_nnx_pair(layer: Any, bn: Any, epsilon: float) -> None:
  """Folds `bn` into `layer` in place; a layer without bias gets one."""
  value = lambda v: None if v is None else v[...]
  kernel, bias = fold_batch_norm(layer.kernel[...], value(layer.bias), mean=bn.mean[...],
                                 var=bn.var[...], scale=value(bn.scale),
                                 offset=value(bn.bias), epsilon=epsilon)
  layer.kernel[...] = kernel
  if layer.bias is None:
    layer.bias = nnx.Param(bias)
    layer.use_bias = True
  else:
    layer.bias[...] = bias
