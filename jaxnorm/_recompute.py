"""Precise population statistics of BatchNorm inputs: the driver shared by linen and nnx.

`jaxnorm.linen.recompute_batch_stats` and `jaxnorm.nnx.recompute_batch_stats` only say how to
run their framework's model while capturing each BatchNorm's input; this module holds what they
share: the plan of passes, the loop over batches, the count-weighted merge (`merge_moments`),
the progress bar and the errors. It imports no framework.

How a layer's input is computed while earlier layers are re-estimated, decided once here:

* If the forward pass runs the BatchNorms in evaluation mode (the usual call, e.g.
  `train=False`), the layers are re-estimated one after the other, in call order, with one
  pass over the batches each: while BatchNorm *k*'s input is measured, the BatchNorms before it
  already normalize with their recomputed statistics. Each layer's statistics are then exactly
  the population statistics of the input it sees at inference, when every layer uses
  population statistics; that is the network being evaluated. The cost is one pass per
  BatchNorm (the layers after the one being measured are dead code and are not computed).
* If every BatchNorm runs in training mode (the call the model trains with), one pass suffices
  and every batch is normalized by its own statistics, as fvcore's `update_bn_stats` does:
  each layer gets the exact population statistics of the input it sees in training at the
  given batch size. Nothing is written while measuring, so `batch_stats` need not be mutable.

Either way the statistics are merged batch after batch with `merge_moments` (count-weighted,
masked elements excluded, one compiled program per pass); a batch sharded over devices under
plain `jax.jit` reduces over the whole batch. The count is float32 (the `Moments` contract):
exact up to 2**24 elements per feature, beyond which the merge weights carry a relative
rounding of about 1e-7.
"""

from __future__ import annotations

import collections
import functools
import itertools
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks
from ._stats import Moments, bessel, merge_moments, moments


def input_moments(x: Any, axis: Any, mask: Any) -> Moments:
  """The moments a BatchNorm with feature `axis` reduces its input `x` to (masked)."""
  x = jnp.asarray(x)
  feat = _checks.canonicalize_axes(axis, x.ndim, "axis")
  red = tuple(a for a in range(x.ndim) if a not in feat)
  return moments(x, red, mask=mask)


class Sink:
  """Collects, during one traced forward pass, the BatchNorms called and their inputs' moments.

  `record` is called by the framework's hook with each BatchNorm call; the calls of a layer
  used several times are merged.
  """

  def __init__(self, keys: Sequence[Hashable] = ()):
    self.keys = frozenset(keys)
    self.order: list[Hashable] = []
    self.training: dict[Hashable, bool] = {}
    self.info: dict[Hashable, Any] = {}
    self.moments: dict[Hashable, Moments] = {}

  def record(self, key: Hashable, training: bool, x: Any, axis: Any, mask: Any,
             info: Any = None) -> None:
    if key not in self.training:
      self.order.append(key)
      self.training[key] = training
      self.info[key] = info
    if key in self.keys:
      m = input_moments(x, axis, mask)
      self.moments[key] = merge_moments(self.moments[key], m) if key in self.moments else m


Capture = Callable[[Sequence[Hashable], Any, Any], dict[Hashable, Moments]]


def plan(sink: Sink) -> list[list[Hashable]]:
  """One pass for all layers if every one runs in training mode, else one pass per layer."""
  if all(sink.training[k] for k in sink.order):
    return [list(sink.order)]
  return [[k] for k in sink.order]


def _bar(progress: bool, total: int | None, desc: str) -> Any:
  if not progress:
    return None
  try:
    from tqdm.auto import tqdm  # type: ignore[import-untyped]
  except ImportError:
    print(f"{desc}: {total if total is not None else '?'} batches per pass", file=sys.stderr)
    return None
  return tqdm(total=total, desc=desc)


def recompute(
    model_name: str,
    batches: Iterable[Any],
    discover: Callable[[Any], Sink],
    capture: Capture,
    get_state: Callable[[], Any],
    write: Callable[[Hashable, Moments, jax.Array], None],
    progress: bool,
    cache_key: Hashable | None = None,
) -> None:
  """Runs the passes of the plan and hands each layer's population moments to `write`.

  Args:
    model_name: how errors name the model.
    batches: the model inputs; re-iterated once per pass (a one-shot iterator is kept in a list
      when more than one pass is needed).
    discover: traces the model on one batch (abstractly) and returns the filled `Sink`.
    capture: `capture(keys, state, batch)`: the merged input moments of the layers `keys`.
    get_state: the current model state (arrays only), passed to `capture`.
    write: stores one layer's population moments and its number of non-empty batches.
    progress: show a progress bar (tqdm if installed).
    cache_key: a hashable description of the computation `capture` performs (the model and
      its call's arguments); calls with equal keys reuse the jitted steps (None: no reuse).
  """
  sink, source = _discover(batches, discover)
  if not sink.order:
    raise ValueError(
        f"{model_name} calls no jaxnorm BatchNorm in this forward pass, so there are no "
        f"statistics to recompute (flax's own BatchNorm is not recognized: use "
        f"jaxnorm's drop-in, and pass the keyword arguments your model's call needs).")
  passes = plan(sink)
  if len(passes) > 1 and isinstance(source, Iterator):
    source = list(source)
  total = len(source) if hasattr(source, "__len__") else None  # type: ignore[arg-type]
  bar = _bar(progress, None if total is None else total * len(passes),
             f"recompute_batch_stats ({len(passes)} pass{'es' if len(passes) > 1 else ''})")
  try:
    for keys in passes:
      state = get_state()
      step = _compiled_step(capture, tuple(keys), cache_key)
      acc = None
      for batch in source:
        if acc is None:
          shapes = jax.eval_shape(lambda s, b, keys=tuple(keys): capture(keys, s, b), state,
                                  batch)
          acc = {k: (jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes[k]),
                     jnp.zeros((), jnp.int32)) for k in keys}
        acc = step(acc, state, batch)
        if bar is not None:
          bar.update(1)
      if acc is None:
        raise ValueError("batches yielded nothing on a later pass; give a re-iterable "
                         "(a list, or a loader that restarts on iter()) or an iterator.")
      for k in keys:
        m, n = acc[k]
        if not bool(jnp.any(m.count > 0)):
          raise ValueError(f"BatchNorm {k!r} of {model_name} saw no valid element in any "
                           f"batch (every element masked out); its statistics are undefined.")
        write(k, m, n)
  finally:
    if bar is not None:
      bar.close()


def _discover(batches: Iterable[Any], discover: Callable[[Any], Sink],
              ) -> tuple[Sink, Iterable[Any]]:
  """The `Sink` of the first batch, and the batches to iterate (the first one included)."""
  iterator = batches if isinstance(batches, Iterator) else iter(batches)
  try:
    first = next(iterator)
  except StopIteration:
    raise ValueError(
        "batches is empty: population statistics need at least one batch.") from None
  sink = discover(first)
  if isinstance(batches, Iterator):
    return sink, itertools.chain([first], batches)
  return sink, batches


_STEPS: collections.OrderedDict[Hashable, Callable[..., Any]] = collections.OrderedDict()
_MAX_STEPS = 32


def _merge_step(capture: Capture, keys: tuple[Hashable, ...], acc: Any, state: Any,
                batch: Any) -> Any:
  new = capture(keys, state, batch)
  return {k: (merge_moments(acc[k][0], new[k]),
              acc[k][1] + jnp.any(new[k].count > 0).astype(jnp.int32)) for k in keys}


def _compiled_step(capture: Capture, keys: tuple[Hashable, ...],
                   cache_key: Hashable | None) -> Callable[..., Any]:
  """`jax.jit` of one pass's step, reused across calls with the same model and arguments (so
  that recomputing the statistics of several checkpoints of one model compiles once)."""
  if cache_key is None:
    return jax.jit(functools.partial(_merge_step, capture, keys))
  key = (cache_key, keys)
  try:
    hash(key)
  except TypeError:  # unhashable call arguments (arrays): no reuse
    return jax.jit(functools.partial(_merge_step, capture, keys))
  if key not in _STEPS:
    _STEPS[key] = jax.jit(functools.partial(_merge_step, capture, keys))
    while len(_STEPS) > _MAX_STEPS:
      _STEPS.popitem(last=False)
  _STEPS.move_to_end(key)
  return _STEPS[key]


def population_stats(m: Moments, unbiased: bool, like_mean: Any, like_var: Any
                     ) -> tuple[jax.Array, jax.Array]:
  """The `(mean, var)` to store: the layer's shapes and dtypes, Bessel-corrected if it stores
  the unbiased variance (`unbiased_running_var=True`)."""
  var = bessel(m.var, m.count) if unbiased else m.var
  mean = jnp.reshape(m.mean, jnp.shape(like_mean)).astype(like_mean.dtype)
  return mean, jnp.reshape(var, jnp.shape(like_var)).astype(like_var.dtype)
