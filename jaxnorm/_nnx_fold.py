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
