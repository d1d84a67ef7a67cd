"""The folding tools of `jaxnorm.nnx`: their signatures and documentation (the machinery is
`_flax_tools`'s). `jaxnorm.nnx` re-exports them; they need flax.
"""

from typing import Any

from flax import nnx

from jaxnorm import _flax_tools

FoldedBatchNorm = _flax_tools.FoldedBatchNorm


def fold_model(model: nnx.Module, *args: Any,
               **call_kwargs: Any) -> tuple[dict[str, str], dict[str, str]]:
  """Folds, in place, every BatchNorm that directly follows a Linear or Conv layer of a model.

  The nnx counterpart of `jaxnorm.linen.fold_model`, with the same rules: one call
  `model(*args, **call_kwargs)` is traced (shapes only) on a throw-away copy whose `Linear`,
  `Conv` and `BatchNorm` (flax's or jaxnorm's) modules record what they receive, and each
  BatchNorm in evaluation mode whose input is exactly the output of a layer called once, used
  by nothing else, is folded into that layer (`jaxnorm.fold_batch_norm`: the layer's `kernel`
  and `bias` change in place, a layer without bias gets one) and replaced in the model by a
  `FoldedBatchNorm`, which returns its input.

  Args:
    model: the nnx model, modified in place.
    *args: an example input: the positional arguments of an evaluation-mode call.
    **call_kwargs: the keyword arguments of that call.

  Returns:
    `(folded, unfolded)`: `{layer_path: batchnorm_path}` of the pairs folded and
    `{batchnorm_path: reason}` for each BatchNorm left as it was; paths are the attribute
    names (and list indices) joined by "/".

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense = nnx.Linear(2, 3, use_bias=False, rngs=rngs)
    ...     self.bn = jnnx.BatchNorm(3, use_running_average=True, epsilon=0.5, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.bn(self.dense(x))
    >>> model, x = Net(nnx.Rngs(0)), jnp.arange(8.0).reshape(4, 2)
    >>> y = model(x)
    >>> jnnx.fold_model(model, x)
    ({'dense': 'bn'}, {})
    >>> type(model.bn).__name__, bool(jnp.abs(model(x) - y).max() < 1e-5)
    ('FoldedBatchNorm', True)
  """
  return _flax_tools.fold_nnx(model, args, call_kwargs, nnx.BatchNorm)


def fold_norms_into_dense(model: nnx.Module, *args: Any,
                          **call_kwargs: Any) -> tuple[dict[str, str], dict[str, str]]:
  """Folds, in place, the scale and offset of each LayerNorm/RMSNorm that only Linear layers read.

  The nnx counterpart of `jaxnorm.linen.fold_norms_into_dense`, with the same rules: one call
  `model(*args, **call_kwargs)` is traced (shapes only) on a throw-away copy whose `Linear`,
  `LayerNorm` and `RMSNorm` (flax's or jaxnorm's) modules record what they receive. A norm
  whose output is used only as the input of `Linear` layers is folded when it is called once,
  its features are the last axis, each of its Linear readers is called once, and (for a norm
  with an offset) each reader has a bias: the readers' `kernel` and `bias` become those of
  norm → Linear (`jaxnorm.fold_norm_into_dense`), and the norm's scale is set to 1 (0 when
  zero-centred, as with `convention="gemma"`) and its offset to 0, so the model runs as
  written and computes the same function. In a pre-LN transformer that is each block's norms
  (into q, k and v; into the MLP's first layer) and the final norm (into the output
  projection): the step QuaRot and SpinQuant start from. Every other norm is left as it was.

  Args:
    model: the nnx model, modified in place.
    *args: an example input: the positional arguments of an inference call; only their shapes
      and dtypes matter.
    **call_kwargs: the keyword arguments of that call.

  Returns:
    `(folded, unfolded)`: `{linear_path: norm_path}`, one entry per Linear reader folded, and
    `{norm_path: reason}` for each norm left as it was; paths are the attribute names (and list
    indices) joined by "/".

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> from flax import nnx
    >>> class Block(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.norm, self.residual_norm = jnnx.LayerNorm(4, rngs=rngs), nnx.RMSNorm(4, rngs=rngs)
    ...     self.up, self.down = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)
    ...   def __call__(self, x):
    ...     x = x + self.down(nnx.gelu(self.up(self.norm(x))))
    ...     return self.residual_norm(x) + x
    >>> model, x = Block(nnx.Rngs(0)), jnp.arange(8.0).reshape(2, 4)
    >>> model.norm.scale[...] = jnp.array([0.5, 2.0, 1.0, 3.0])
    >>> y = model(x)
    >>> folded, unfolded = jnnx.fold_norms_into_dense(model, x)
    >>> folded, list(unfolded)  # residual_norm's output is not a Linear layer's input
    ({'up': 'norm'}, ['residual_norm'])
    >>> model.norm.scale[...]
    Array([1., 1., 1., 1.], dtype=float32)
    >>> bool(jnp.abs(model(x) - y).max() < 1e-5)
    True
  """
  return _flax_tools.fold_norms_nnx(model, args, call_kwargs, (nnx.LayerNorm, nnx.RMSNorm))
