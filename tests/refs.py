"""Float64 NumPy references and per-dtype tolerances, shared by every test module."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Absolute tolerance on normalized outputs (values of order 1) per input dtype, set once here.
_ATOL = {
    np.dtype(np.float64): 1e-9,
    np.dtype(np.float32): 2e-5,
    np.dtype(jnp.bfloat16): 4e-2,
    np.dtype(np.float16): 4e-3,
}


def atol(dtype) -> float:
  """Tolerance for outputs of order 1 computed from input of `dtype`."""
  return _ATOL[np.dtype(dtype)]


def f64(a) -> np.ndarray:
  return np.asarray(a, dtype=np.float64)


def ref_moments(x, axes, mask=None):
  """(count, mean, population variance) in float64 over `axes`, counting only mask=True."""
  x = f64(x)
  axes = tuple(a % x.ndim for a in ((axes,) if isinstance(axes, int) else axes))
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
  xz = np.where(m, x, 0.0)
  n = m.sum(axes)
  mean = xz.sum(axes) / np.maximum(n, 1)
  d = np.where(m, x - np.expand_dims(mean, axes), 0.0)
  var = (d * d).sum(axes) / np.maximum(n, 1)
  return n.astype(np.float64), mean, var


def ref_normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, epsilon):
  x = f64(x)
  red = tuple(a % x.ndim for a in ((reduction_axes,) if isinstance(reduction_axes, int)
                                   else reduction_axes))
  feat = tuple(sorted(a % x.ndim for a in ((feature_axes,) if isinstance(feature_axes, int)
                                           else feature_axes)))
  shape = tuple(x.shape[i] if i in feat else 1 for i in range(x.ndim))
  y = (x - np.expand_dims(f64(mean), red)) / np.sqrt(np.expand_dims(f64(var), red) + epsilon)
  if scale is not None:
    y = y * f64(scale).reshape(shape)
  if bias is not None:
    y = y + f64(bias).reshape(shape)
  return y


def ref_layer_norm(x, scale=None, bias=None, reduction_axes=-1, feature_axes=-1, epsilon=1e-6,
                   mask=None):
  _, mean, var = ref_moments(x, reduction_axes, mask)
  return ref_normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, epsilon)


def ref_rms_norm(x, scale=None, reduction_axes=-1, feature_axes=-1, epsilon=1e-6, mask=None):
  x = f64(x)
  axes = tuple(a % x.ndim for a in ((reduction_axes,) if isinstance(reduction_axes, int)
                                    else reduction_axes))
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
  ms = np.where(m, x * x, 0.0).sum(axes) / np.maximum(m.sum(axes), 1)
  return ref_normalize(x, np.zeros_like(ms), ms, scale, None, axes, feature_axes, epsilon)


def ref_group_norm(x, num_groups, scale=None, bias=None, epsilon=1e-6, mask=None):
  x = f64(x)
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))
  mg = None if mask is None else np.broadcast_to(np.asarray(mask), x.shape).reshape(xg.shape)
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  _, mean, var = ref_moments(xg, axes, mg)
  y = (xg - np.expand_dims(mean, axes)) / np.sqrt(np.expand_dims(var, axes) + epsilon)
  y = y.reshape(x.shape)
  if scale is not None:
    y = y * f64(scale)
  if bias is not None:
    y = y + f64(bias)
  return y


def ref_batch_norm_train(x, scale=None, bias=None, feature_axes=-1, epsilon=1e-5, mask=None):
  """(y, count, mean, var) of a training step of batch normalization in float64."""
  x = f64(x)
  feat = tuple(sorted(a % x.ndim for a in ((feature_axes,) if isinstance(feature_axes, int)
                                           else feature_axes)))
  red = tuple(a for a in range(x.ndim) if a not in feat)
  n, mean, var = ref_moments(x, red, mask)
  return ref_normalize(x, mean, var, scale, bias, red, feat, epsilon), n, mean, var
