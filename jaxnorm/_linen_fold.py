"""The folding tools of `jaxnorm.linen`: their signatures and documentation (the machinery is
`_flax_tools`'s). `jaxnorm.linen` re-exports them; they need flax.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from flax import linen as nn

from jaxnorm import _flax_tools

Folding = _flax_tools.Folding


def fold_batch_norms(
    variables: Mapping[str, Any],
    pairs: Mapping[str, str] | Sequence[tuple[str, str]],
    *,
    epsilon: float | Mapping[str, float] = 1e-5,
) -> dict[str, Any]:
  """Folds named (layer, BatchNorm) pairs of a variables tree into the layers, for inference.

  For each pair, the `Dense` or `Conv` layer's `kernel` and `bias` become those of the layer
  followed by the BatchNorm in evaluation mode (`jaxnorm.fold_batch_norm`), and the
  BatchNorm's `params` and `batch_stats` are removed (collections left empty are dropped). The
  result is the variables of the same architecture built without those BatchNorms and with a
  bias in each folded layer. The pattern is one flag in the model::

      class Net(nn.Module):
        folded: bool = False

        @nn.compact
        def __call__(self, x, train: bool = False):
          x = nn.Conv(16, (3, 3), use_bias=self.folded)(x)
          if not self.folded:
            x = jnn.BatchNorm(use_running_average=not train)(x)
          return nn.relu(x)

      folded = jnn.fold_batch_norms(variables, {"Conv_0": "BatchNorm_0"})
      Net(folded=True).apply(folded, x)   # == Net().apply(variables, x), to float32 rounding

  flax names modules per class (`Conv_0`, `Conv_1`, ...), so leaving the BatchNorms out does not
  rename the other layers.

  Args:
    variables: the trained model's variables (`params`, `batch_stats`, other collections are
      passed through).
    pairs: `{layer_path: batchnorm_path}` or `[(layer_path, batchnorm_path), ...]`, module
      paths joined by "/" as in the variables tree (`"Block_0/Conv_1"`).
    epsilon: the BatchNorms' epsilon, one float for all or `{batchnorm_path: epsilon}`.

  Returns:
    A new variables dict (plain dicts); the input is not modified.

  Raises:
    KeyError: a path that is not in the tree, with the keys found at that level.
    ValueError: `pairs` is empty, or the shapes do not fit (see `jaxnorm.fold_batch_norm`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from jaxnorm import linen as jnn
    >>> class Net(nn.Module):
    ...   folded: bool = False
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.Dense(3, use_bias=self.folded)(x)
    ...     return x if self.folded else jnn.BatchNorm(use_running_average=True)(x)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> variables = Net().init(jax.random.key(0), x)
    >>> variables["batch_stats"]["BatchNorm_0"]["var"] = jnp.full(3, 4.0)
    >>> folded = jnn.fold_batch_norms(variables, {"Dense_0": "BatchNorm_0"})
    >>> sorted(folded), sorted(folded["params"])
    (['params'], ['Dense_0'])
    >>> d = Net(folded=True).apply(folded, x) - Net().apply(variables, x)
    >>> bool(jnp.abs(d).max() < 1e-5)
    True
  """
  return _flax_tools.fold_variables(variables, pairs, epsilon=epsilon)


def fold_model(model: nn.Module, variables: Mapping[str, Any], *args: Any,
               **apply_kwargs: Any) -> Folding:
  """Folds every BatchNorm that directly follows a Dense or Conv layer, in a model as written.

  Runs `model.apply(variables, *args, **apply_kwargs)` once, traced (nothing is computed),
  under `flax.linen.intercept_methods`, and pairs each `BatchNorm` (flax's or jaxnorm's) with
  the `Dense` or `Conv` layer whose output it receives as is. A pair is folded
  (`jaxnorm.fold_batch_norm`, with the BatchNorm's own epsilon) when the BatchNorm runs in
  evaluation mode, normalizes the last axis and is called once, and its layer is called once
  and its output used by nothing else. Every other BatchNorm is left as it was, with the reason
  in `Folding.unfolded`. The model is not rewritten: `Folding.apply` runs it with the folded
  BatchNorms returning their input, so a model with no `folded` flag folds as it is. A layer
  built without bias gets its folded bias in `params` all the same, and `Folding.apply` adds
  it after the layer.

  Args:
    model: the flax.linen model.
    variables: its trained variables (`params`, `batch_stats`, other collections pass through).
    *args: an example input: the positional arguments of an evaluation-mode call; only their
      shapes and dtypes matter.
    **apply_kwargs: the keyword arguments of that call (e.g. `train=False`); pass the same to
      `Folding.apply`.

  Returns:
    A `Folding`: `variables` (the folded tree, plain dicts; the input is not modified),
    `folded` (`{layer_path: batchnorm_path}`), `unfolded` (`{batchnorm_path: reason}`) and
    `apply(variables, *args, **kwargs)`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from jaxnorm import linen as jnn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool = False):
    ...     x = jnn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
    ...     return jnn.BatchNorm(use_running_average=not train)(nn.relu(x))
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> variables = Net().init(jax.random.key(0), x)
    >>> f = jnn.fold_model(Net(), variables, x)
    >>> f.folded, list(f.unfolded)  # BatchNorm_1 follows a relu
    ({'Dense_0': 'BatchNorm_0'}, ['BatchNorm_1'])
    >>> sorted(f.variables["batch_stats"])
    ['BatchNorm_1']
    >>> bool(jnp.abs(f.apply(f.variables, x) - Net().apply(variables, x)).max() < 1e-5)
    True
  """
  return _flax_tools.fold_model(model, variables, args, apply_kwargs, nn.BatchNorm)


def fold_norms_into_dense(model: nn.Module, variables: Mapping[str, Any], *args: Any,
                          **apply_kwargs: Any) -> Folding:
  """Folds the scale and offset of each LayerNorm/RMSNorm that only Dense layers read into them.

  In a pre-LN transformer each norm feeds Dense layers directly (q, k and v; the MLP's first
  layer), so its affine part can live in their kernels and biases
  (`jaxnorm.fold_norm_into_dense`) and the norm can run without one. Runs `model.apply(variables,
  *args, **apply_kwargs)` once, traced (nothing is computed), under
  `flax.linen.intercept_methods`, and finds each `LayerNorm` or `RMSNorm` (flax's or jaxnorm's)
  whose output is used only as the input of `Dense` layers. Such a norm is folded when it is
  called once, its features are the last axis, each of its Dense readers is called once, and
  (for a norm with an offset) each reader has a bias. Its scale is then set to 1 (0 when
  `zero_centered_scale`) and its offset to 0, so the model runs unchanged, as written, with the
  folded variables: `Folding.apply` is `model.apply`. Every other norm is left as it was, with
  the reason in `Folding.unfolded`. To gain speed, build the inference model with
  `use_scale=False, use_bias=False` norms and drop their `params`. The nnx counterpart is
  `jaxnorm.nnx.fold_norms_into_dense` (docs/guides/transformers.md, "Folding the norms into the
  next Dense").

  Args:
    model: the flax.linen model.
    variables: its trained variables (other collections pass through).
    *args: an example input: the positional arguments of an inference call; only their shapes
      and dtypes matter.
    **apply_kwargs: the keyword arguments of that call.

  Returns:
    A `Folding`: `variables` (the folded tree, plain dicts; the input is not modified),
    `folded` (`{dense_path: norm_path}`, one entry per Dense reader), `unfolded`
    (`{norm_path: reason}`) and `apply` (`model.apply`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from jaxnorm import linen as jnn
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     h = nn.LayerNorm()(x)
    ...     x = x + nn.Dense(4)(h) * nn.Dense(4)(h)
    ...     return x + nn.Dense(4)(jnn.RMSNorm()(x))
    >>> x = jnp.arange(8.0).reshape(2, 4)
    >>> variables = Block().init(jax.random.key(0), x)
    >>> f = jnn.fold_norms_into_dense(Block(), variables, x)
    >>> f.folded
    {'Dense_0': 'LayerNorm_0', 'Dense_1': 'LayerNorm_0', 'Dense_2': 'RMSNorm_0'}
    >>> bool(jnp.abs(f.apply(f.variables, x) - Block().apply(variables, x)).max() < 1e-4)
    True
  """
  return _flax_tools.fold_norms(model, variables, args, apply_kwargs, (nn.LayerNorm, nn.RMSNorm))
