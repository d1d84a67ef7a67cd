"""Every public function and every wrapper, called with wrong arguments, raises a clear error.

The cases are enumerated systematically (per function and wrapper: axes out of range or
repeated; scale, bias, statistics, state and mask of the wrong shape or dtype; integer and
boolean input; negative epsilon; momentum outside [0, 1]; group counts and ghost-batch sizes
that do not divide; an unknown implementation) and each runs twice: eagerly and traced under
`jax.jit` (`.lower`, so the error must come at trace time). A clear error is a ValueError or
TypeError raised by jaxnorm itself (not from inside JAX, XLA, flax or equinox) whose message
names the argument and contains the value received. `test_count` reports how many cases ran
and how many gave a clear error; the cases that do not yet are marked `xfail(strict=True)`,
with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
import jaxnorm.equinox as jne
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

KEY = jax.random.key(0)
X = np.random.RandomState(0).randn(4, 6).astype(np.float32)
X3 = np.random.RandomState(1).randn(2, 3, 6).astype(np.float32)
XI = np.arange(24, dtype=np.int32).reshape(4, 6)
XB = XI % 2 == 0
STATE = jn.batch_norm_init(6)
JAXNORM_DIR = os.path.dirname(jn.__file__)


@dataclasses.dataclass(frozen=True)
class Case:
  """`call(x)` must raise a clear error naming `arg` and containing `value`."""

  id: str
  call: Callable[[Any], Any]
  arg: str
  value: str
  x: Any = None  # the input: X unless given
  xfail: str | None = None  # why it does not raise a clear error yet (eager and under jit)
  xfail_jit: str | None = None  # ... under jax.jit only
  accept: tuple[type[Exception], ...] = ()  # the framework's own clear errors, also accepted


# No case is marked xfail today (fixed since this test was written: sync_running_stats' Python
# weights under jit, merge_moments' argument checks, integer parameters and statistics,
# moments' integer dtype, the state's dtypes, update_running_stats' batch type, nnx layers
# whose num_features does not match, nnx.InstanceNorm's feature axes and equinox.RMSNorm's
# integer input). The flax layers accept integer and boolean input and normalize it in float32,
# as flax does (the drop-in contract; tests/test_wrapper_errors.py), so it is not a bad input
# for them; the functional core and the equinox layers refuse it.


def _core_cases() -> list[Case]:
  c = Case
  m4 = jn.moments(X, 1)
  return [
      # moments
      c("moments/axes-out-of-range", lambda x: jn.moments(x, 2), "reduction_axes", "2"),
      c("moments/axes-repeated", lambda x: jn.moments(x, (0, -2)), "reduction_axes", "(0, -2)"),
      c("moments/mask-shape", lambda x: jn.moments(x, 0, mask=np.ones((3, 1), bool)), "mask",
        "(3, 1)"),
      c("moments/mask-dtype", lambda x: jn.moments(x, 0, mask=np.ones((4, 6), np.float32)),
        "mask", "float32"),
      c("moments/int-input", lambda x: jn.moments(x, 0), "x", "int32", XI),
      c("moments/bool-input", lambda x: jn.moments(x, 0), "x", "bool", XB),
      c("moments/int-dtype", lambda x: jn.moments(x, 0, dtype=jnp.int32), "dtype", "int32"),
      # merge_moments
      c("merge_moments/shapes", lambda x: jn.merge_moments(jn.moments(x, 0), m4), "b", "(4,)"),
      c("merge_moments/not-moments", lambda x: jn.merge_moments(jn.moments(x, 0), (1.0, 2.0)),
        "b", "tuple"),
      # layer_norm
      c("layer_norm/reduction-axes", lambda x: jn.layer_norm(x, reduction_axes=-3),
        "reduction_axes", "-3"),
      c("layer_norm/feature-axes-repeated", lambda x: jn.layer_norm(x, feature_axes=(1, 1)),
        "feature_axes", "(1, 1)"),
      c("layer_norm/scale-shape", lambda x: jn.layer_norm(x, jnp.ones(5)), "scale", "(5,)"),
      c("layer_norm/bias-shape", lambda x: jn.layer_norm(x, None, jnp.ones((2, 6))), "bias",
        "(2, 6)"),
      c("layer_norm/scale-int", lambda x: jn.layer_norm(x, jnp.ones(6, jnp.int32)), "scale",
        "int32"),
      c("layer_norm/bias-bool", lambda x: jn.layer_norm(x, None, jnp.ones(6, bool)), "bias",
        "bool"),
      c("layer_norm/mask-shape", lambda x: jn.layer_norm(x, mask=np.ones(5, bool)), "mask",
        "(5,)"),
      c("layer_norm/mask-dtype", lambda x: jn.layer_norm(x, mask=np.ones((4, 6), np.int32)),
        "mask", "int32"),
      c("layer_norm/int-input", lambda x: jn.layer_norm(x), "x", "int32", XI),
      c("layer_norm/bool-input", lambda x: jn.layer_norm(x), "x", "bool", XB),
      c("layer_norm/negative-epsilon", lambda x: jn.layer_norm(x, epsilon=-1e-6), "epsilon",
        "-1e-06"),
      c("layer_norm/nan-epsilon", lambda x: jn.layer_norm(x, epsilon=float("nan")), "epsilon",
        "nan"),
      c("layer_norm/implementation", lambda x: jn.layer_norm(x, implementation="cuda"),
        "implementation", "cuda"),
      # rms_norm
      c("rms_norm/reduction-axes", lambda x: jn.rms_norm(x, reduction_axes=2), "reduction_axes",
        "2"),
      c("rms_norm/scale-shape", lambda x: jn.rms_norm(x, jnp.ones(5)), "scale", "(5,)"),
      c("rms_norm/int-input", lambda x: jn.rms_norm(x), "x", "int32", XI),
      c("rms_norm/negative-epsilon", lambda x: jn.rms_norm(x, epsilon=-1.0), "epsilon", "-1.0"),
      c("rms_norm/mask-dtype", lambda x: jn.rms_norm(x, mask=np.ones(6, np.float32)), "mask",
        "float32"),
      c("rms_norm/implementation", lambda x: jn.rms_norm(x, implementation="triton2"),
        "implementation", "triton2"),
      # add_layer_norm, add_rms_norm (the fused residual add)
      c("add_layer_norm/residual-shape", lambda x: jn.add_layer_norm(x, np.ones((3, 6))),
        "residual", "(3, 6)"),
      c("add_layer_norm/residual-broadcasts", lambda x: jn.add_layer_norm(x, np.ones(6)),
        "residual", "(6,)"),
      c("add_layer_norm/residual-int", lambda x: jn.add_layer_norm(x, XI), "residual", "int32"),
      c("add_layer_norm/residual-none", lambda x: jn.add_layer_norm(x, None), "residual",
        "NoneType"),
      c("add_layer_norm/complex-input", lambda x: jn.add_layer_norm(x, X),
        "add_layer_norm", "complex64", X.astype(np.complex64)),
      c("add_layer_norm/scale-shape", lambda x: jn.add_layer_norm(x, X, jnp.ones(5)), "scale",
        "(5,)"),
      c("add_rms_norm/residual-shape", lambda x: jn.add_rms_norm(x, X3), "residual",
        "(2, 3, 6)"),
      c("add_rms_norm/int-input", lambda x: jn.add_rms_norm(x, X), "x", "int32", XI),
      c("add_rms_norm/convention", lambda x: jn.add_rms_norm(x, X, convention="hf"),
        "convention", "hf"),
      c("add_rms_norm/llama-bias", lambda x: jn.add_rms_norm(
          x, X, bias=jnp.ones(6), convention="llama"), "convention", "llama"),
      c("add_rms_norm/dtype", lambda x: jn.add_rms_norm(x, X, dtype=jnp.int32), "dtype",
        "int32"),
      c("add_rms_norm/implementation", lambda x: jn.add_rms_norm(x, X, implementation="cuda"),
        "implementation", "cuda"),
      # group_norm
      c("group_norm/num-groups", lambda x: jn.group_norm(x, num_groups=4), "num_groups", "4"),
      c("group_norm/num-groups-zero", lambda x: jn.group_norm(x, num_groups=0), "num_groups",
        "0"),
      c("group_norm/num-groups-negative", lambda x: jn.group_norm(x, num_groups=-2),
        "num_groups", "-2"),
      c("group_norm/group-size", lambda x: jn.group_norm(x, num_groups=None, group_size=4),
        "group_size", "4"),
      c("group_norm/scale-shape", lambda x: jn.group_norm(x, jnp.ones(5), num_groups=2),
        "scale", "(5,)"),
      c("group_norm/int-input", lambda x: jn.group_norm(x, num_groups=2), "x", "int32", XI),
      c("group_norm/negative-epsilon", lambda x: jn.group_norm(x, num_groups=2, epsilon=-1.0),
        "epsilon", "-1.0"),
      c("group_norm/reduction-axes", lambda x: jn.group_norm(x, num_groups=2, reduction_axes=1),
        "reduction_axes", "1", X3),
      c("group_norm/rank-1", lambda x: jn.group_norm(x, num_groups=2), "x", "(6,)", X[0]),
      c("group_norm/mask-shape", lambda x: jn.group_norm(x, num_groups=2,
                                                         mask=np.ones((3, 6), bool)),
        "mask", "(3, 6)"),
      # instance_norm
      c("instance_norm/feature-axes-batch", lambda x: jn.instance_norm(x, feature_axes=0),
        "feature_axes", "0"),
      c("instance_norm/feature-axes-range", lambda x: jn.instance_norm(x, feature_axes=5),
        "feature_axes", "5"),
      c("instance_norm/scale-shape", lambda x: jn.instance_norm(x, jnp.ones(5)), "scale",
        "(5,)", X3),
      c("instance_norm/int-input", lambda x: jn.instance_norm(x), "x", "int32", XI),
      c("instance_norm/negative-epsilon", lambda x: jn.instance_norm(x, epsilon=-1.0),
        "epsilon", "-1.0", X3),
      # normalize
      c("normalize/mean-shape", lambda x: jn.normalize(x, jnp.zeros(5), jnp.ones(6),
                                                       reduction_axes=0, epsilon=1e-5),
        "mean", "(5,)"),
      c("normalize/var-shape", lambda x: jn.normalize(x, jnp.zeros(6), jnp.ones(4),
                                                      reduction_axes=0, epsilon=1e-5),
        "var", "(4,)"),
      c("normalize/mean-int", lambda x: jn.normalize(x, jnp.zeros(6, jnp.int32), jnp.ones(6),
                                                     reduction_axes=0, epsilon=1e-5),
        "mean", "int32"),
      c("normalize/reduction-axes", lambda x: jn.normalize(x, 0.0, 1.0, reduction_axes=3,
                                                           epsilon=1e-5),
        "reduction_axes", "3"),
      c("normalize/negative-epsilon", lambda x: jn.normalize(x, jnp.zeros(6), jnp.ones(6),
                                                             reduction_axes=0, epsilon=-1.0),
        "epsilon", "-1.0"),
      c("normalize/int-input", lambda x: jn.normalize(x, jnp.zeros(6), jnp.ones(6),
                                                      reduction_axes=0, epsilon=1e-5),
        "x", "int32", XI),
      c("normalize/scale-shape", lambda x: jn.normalize(x, jnp.zeros(6), jnp.ones(6),
                                                        jnp.ones(5), reduction_axes=0,
                                                        epsilon=1e-5),
        "scale", "(5,)"),
      # batch_norm
      c("batch_norm/feature-axes", lambda x: jn.batch_norm(x, STATE, training=True,
                                                           feature_axes=2),
        "feature_axes", "2"),
      c("batch_norm/feature-axes-repeated", lambda x: jn.batch_norm(x, STATE, training=True,
                                                                    feature_axes=(1, -1)),
        "feature_axes", "(1, -1)"),
      c("batch_norm/state-shape", lambda x: jn.batch_norm(x, jn.batch_norm_init(4),
                                                          training=True),
        "state", "(4,)"),
      c("batch_norm/state-type", lambda x: jn.batch_norm(x, (jnp.zeros(6), jnp.ones(6)),
                                                         training=True),
        "state", "tuple"),
      c("batch_norm/state-int", lambda x: jn.batch_norm(
          x, jn.BatchNormState(jnp.zeros(6, jnp.int32), jnp.ones(6), jnp.zeros((), jnp.int32)),
          training=True), "state", "int32"),
      c("batch_norm/state-count-float", lambda x: jn.batch_norm(
          x, jn.BatchNormState(jnp.zeros(6), jnp.ones(6), jnp.zeros(())), training=True),
        "count", "float32"),
      c("batch_norm/momentum-1", lambda x: jn.batch_norm(x, STATE, training=True, momentum=1.01),
        "momentum", "1.01"),
      c("batch_norm/momentum-negative", lambda x: jn.batch_norm(x, STATE, training=True,
                                                                momentum=-0.1),
        "momentum", "-0.1"),
      c("batch_norm/momentum-1.5", lambda x: jn.batch_norm(x, STATE, training=True,
                                                           momentum=1.5),
        "momentum", "1.5"),
      c("batch_norm/negative-epsilon", lambda x: jn.batch_norm(x, STATE, training=True,
                                                               epsilon=-1e-5),
        "epsilon", "-1e-05"),
      c("batch_norm/int-input", lambda x: jn.batch_norm(x, STATE, training=True), "x", "int32",
        XI),
      c("batch_norm/bool-input", lambda x: jn.batch_norm(x, STATE, training=True), "x", "bool",
        XB),
      c("batch_norm/mask-shape", lambda x: jn.batch_norm(x, STATE, training=True,
                                                         mask=np.ones((3, 1), bool)),
        "mask", "(3, 1)"),
      c("batch_norm/mask-dtype", lambda x: jn.batch_norm(x, STATE, training=True,
                                                         mask=np.ones((4, 1), np.float32)),
        "mask", "float32"),
      c("batch_norm/scale-shape", lambda x: jn.batch_norm(x, STATE, jnp.ones(5), training=True),
        "scale", "(5,)"),
      c("batch_norm/bias-int", lambda x: jn.batch_norm(x, STATE, None, jnp.ones(6, jnp.int32),
                                                       training=True),
        "bias", "int32"),
      c("batch_norm/virtual-batch-size", lambda x: jn.batch_norm(x, STATE, training=True,
                                                                 virtual_batch_size=3),
        "virtual_batch_size", "3"),
      c("batch_norm/virtual-batch-size-zero", lambda x: jn.batch_norm(x, STATE, training=True,
                                                                      virtual_batch_size=0),
        "virtual_batch_size", "0"),
      c("batch_norm/training-int", lambda x: jn.batch_norm(x, STATE, training=1), "training",
        "1"),
      # batch_renorm
      c("batch_renorm/r-max", lambda x: jn.batch_renorm(x, STATE, training=True, r_max=0.5,
                                                        d_max=1.0),
        "r_max", "0.5"),
      c("batch_renorm/d-max", lambda x: jn.batch_renorm(x, STATE, training=True, r_max=2.0,
                                                        d_max=-1.0),
        "d_max", "-1.0"),
      c("batch_renorm/momentum", lambda x: jn.batch_renorm(x, STATE, training=True, r_max=2.0,
                                                           d_max=1.0, momentum=1.01),
        "momentum", "1.01"),
      c("batch_renorm/int-input", lambda x: jn.batch_renorm(x, STATE, training=True, r_max=2.0,
                                                            d_max=1.0),
        "x", "int32", XI),
      c("batch_renorm/state-shape", lambda x: jn.batch_renorm(x, jn.batch_norm_init(3),
                                                              training=True, r_max=2.0,
                                                              d_max=1.0),
        "state", "(3,)"),
      c("batch_renorm/virtual-batch-size", lambda x: jn.batch_renorm(
          x, STATE, training=True, r_max=2.0, d_max=1.0, virtual_batch_size=3),
        "virtual_batch_size", "3"),
      c("batch_renorm/negative-epsilon", lambda x: jn.batch_renorm(
          x, STATE, training=True, r_max=2.0, d_max=1.0, epsilon=-1.0), "epsilon", "-1.0"),
      # update_running_stats
      c("update_running_stats/shape", lambda x: jn.update_running_stats(STATE,
                                                                        jn.moments(x, 1)),
        "state", "(4,)"),
      c("update_running_stats/momentum", lambda x: jn.update_running_stats(
          STATE, jn.moments(x, 0), momentum=1.01), "momentum", "1.01"),
      c("update_running_stats/batch-type", lambda x: jn.update_running_stats(
          STATE, (jnp.ones(6), jnp.mean(x, 0), jnp.var(x, 0))), "batch", "tuple"),
      c("update_running_stats/state-type", lambda x: jn.update_running_stats(
          {"mean": jnp.zeros(6)}, jn.moments(x, 0)), "state", "dict"),
      # batch_norm_init
      c("batch_norm_init/negative", lambda x: jn.batch_norm_init(-3), "feature_shape", "-3"),
      c("batch_norm_init/float", lambda x: jn.batch_norm_init((2.5,)), "feature_shape", "2.5"),
      c("batch_norm_init/int-dtype", lambda x: jn.batch_norm_init(3, dtype=jnp.int32), "dtype",
        "int32"),
      # momentum_from_torch
      c("momentum_from_torch/above-1", lambda x: jn.momentum_from_torch(1.5), "momentum", "1.5"),
      c("momentum_from_torch/negative", lambda x: jn.momentum_from_torch(-0.1), "momentum",
        "-0.1"),
      # fold_batch_norm
      c("fold_batch_norm/mean-shape", lambda x: jn.fold_batch_norm(
          x, None, mean=jnp.zeros(5), var=jnp.ones(6), scale=None, offset=None, epsilon=1e-5),
        "mean", "(5,)"),
      c("fold_batch_norm/var-shape", lambda x: jn.fold_batch_norm(
          x, None, mean=jnp.zeros(6), var=jnp.ones(3), scale=None, offset=None, epsilon=1e-5),
        "var", "(3,)"),
      c("fold_batch_norm/scale-shape", lambda x: jn.fold_batch_norm(
          x, None, mean=jnp.zeros(6), var=jnp.ones(6), scale=jnp.ones(2), offset=None,
          epsilon=1e-5), "scale", "(2,)"),
      c("fold_batch_norm/bias-shape", lambda x: jn.fold_batch_norm(
          x, jnp.zeros(4), mean=jnp.zeros(6), var=jnp.ones(6), scale=None, offset=None,
          epsilon=1e-5), "bias", "(4,)"),
      c("fold_batch_norm/negative-epsilon", lambda x: jn.fold_batch_norm(
          x, None, mean=jnp.zeros(6), var=jnp.ones(6), scale=None, offset=None, epsilon=-1.0),
        "epsilon", "-1.0"),
      c("fold_batch_norm/int-kernel", lambda x: jn.fold_batch_norm(
          x, None, mean=jnp.zeros(6), var=jnp.ones(6), scale=None, offset=None, epsilon=1e-5),
        "kernel", "int32", XI),
      # sync_running_stats (across a vmapped axis of 2 replicas)
      c("sync_running_stats/weights-shape", lambda x: jax.vmap(
          lambda s: jn.sync_running_stats(s, axis_name="r", weights=jnp.ones(3)),
          axis_name="r")(_replicated(x)), "weights", "(3,)"),
      c("sync_running_stats/not-a-state", lambda x: jax.vmap(
          lambda s: jn.sync_running_stats(s, axis_name="r"), axis_name="r")(x),
        "state", "BatchTracer"),
      c("sync_running_stats/negative-weights", lambda x: jax.vmap(
          lambda s: jn.sync_running_stats(s, axis_name="r", weights=-1.0),
          axis_name="r")(_replicated(x)), "weights", "-1.0"),
  ]


def _replicated(x):
  s = jn.batch_norm_init(x.shape[-1])
  return jax.tree.map(lambda a: jnp.stack([a, a]), s)


# --- the wrappers ------------------------------------------------------------------------------

def _linen(cls, train=False, mask=None, **kw):
  def call(x):
    module = getattr(jnn, cls)(**kw)
    extra = {"use_running_average": not train} if cls == "BatchNorm" else {}
    if mask is not None:
      extra["mask"] = mask
    v = module.init(KEY, x, **extra)
    return module.apply(v, x, mutable=["batch_stats"], **extra)
  return call


def _linen_other_variables(x):
  """Variables initialized for 5 features, applied to 6."""
  module = jnn.BatchNorm(use_running_average=True)
  v = module.init(KEY, jnp.ones((4, 5)))
  return module.apply(v, x)


def _nnx(cls, n=6, mask=None, **kw):
  def call(x):
    module = getattr(jnnx, cls)(n, rngs=nnx.Rngs(0), **kw)
    return module(x) if mask is None else module(x, mask=mask)
  return call


def _eqx(cls, *args, mask=None, **kw):
  def call(x):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      layer, state = eqx.nn.make_with_state(getattr(jne, cls))(*args, **kw)
    extra = {} if mask is None else {"mask": mask}
    if cls == "BatchNorm":
      return jax.vmap(lambda v: layer(v, state, **extra), axis_name="batch",
                      out_axes=(0, None))(x)
    return jax.vmap(lambda v: layer(v, **extra))(x)
  return call


def _wrapper_cases() -> list[Case]:
  c = Case
  return [
      # linen
      c("linen.BatchNorm/axis", _linen("BatchNorm", axis=5), "axis", "5"),
      c("linen.BatchNorm/momentum", _linen("BatchNorm", True, momentum=1.5), "momentum", "1.5"),
      c("linen.BatchNorm/epsilon", _linen("BatchNorm", True, epsilon=-1.0), "epsilon", "-1.0"),
      c("linen.BatchNorm/virtual-batch-size", _linen("BatchNorm", True, virtual_batch_size=3),
        "virtual_batch_size", "3"),
      c("linen.BatchNorm/mask-shape", _linen("BatchNorm", True, mask=np.ones((3, 1), bool)),
        "mask", "(3, 1)"),
      c("linen.BatchNorm/variables-shape", _linen_other_variables, "scale", "(5,)",
        accept=(flax.errors.ScopeParamShapeError,)),
      c("linen.LayerNorm/reduction-axes", _linen("LayerNorm", reduction_axes=(1, 1)),
        "reduction_axes", "(1, 1)"),
      c("linen.LayerNorm/implementation", _linen("LayerNorm", implementation="cuda"),
        "implementation", "cuda"),
      c("linen.RMSNorm/epsilon", _linen("RMSNorm", epsilon=-1.0), "epsilon", "-1.0"),
      c("linen.GroupNorm/num-groups", _linen("GroupNorm", num_groups=4), "num_groups", "4"),
      c("linen.GroupNorm/group-size", _linen("GroupNorm", num_groups=None, group_size=4),
        "group_size", "4"),
      c("linen.InstanceNorm/feature-axes", _linen("InstanceNorm", feature_axes=0),
        "feature_axes", "0"),
      # nnx
      c("nnx.BatchNorm/num-features", _nnx("BatchNorm", 3), "num_features", "3"),
      c("nnx.BatchNorm/momentum", _nnx("BatchNorm", momentum=1.5), "momentum", "1.5"),
      c("nnx.BatchNorm/epsilon", _nnx("BatchNorm", epsilon=-1.0), "epsilon", "-1.0"),
      c("nnx.BatchNorm/axis", _nnx("BatchNorm", axis=5), "axis", "5"),
      c("nnx.BatchNorm/virtual-batch-size", _nnx("BatchNorm", virtual_batch_size=3),
        "virtual_batch_size", "3"),
      c("nnx.BatchNorm/mask-shape", _nnx("BatchNorm", mask=np.ones((3, 1), bool)), "mask",
        "(3, 1)"),
      c("nnx.LayerNorm/num-features", _nnx("LayerNorm", 5), "num_features", "5"),
      c("nnx.LayerNorm/reduction-axes", _nnx("LayerNorm", reduction_axes=(1, 1)),
        "reduction_axes", "(1, 1)"),
      c("nnx.LayerNorm/implementation", _nnx("LayerNorm", implementation="cuda"),
        "implementation", "cuda"),
      c("nnx.RMSNorm/num-features", _nnx("RMSNorm", 5), "num_features", "5"),
      c("nnx.RMSNorm/epsilon", _nnx("RMSNorm", epsilon=-1.0), "epsilon", "-1.0"),
      c("nnx.GroupNorm/num-groups", _nnx("GroupNorm", num_groups=4), "num_groups", "4"),
      c("nnx.InstanceNorm/feature-axes", _nnx("InstanceNorm", feature_axes=0), "feature_axes",
        "0"),
      c("nnx.InstanceNorm/num-features", _nnx("InstanceNorm", 5), "num_features", "5"),
      # equinox (per example, channels first, under vmap)
      c("equinox.BatchNorm/input-size", _eqx("BatchNorm", 3, "batch", mode="batch"),
        "input_size", "3"),
      c("equinox.BatchNorm/momentum", _eqx("BatchNorm", 6, "batch", mode="batch", momentum=1.5),
        "momentum", "1.5"),
      c("equinox.BatchNorm/eps", _eqx("BatchNorm", 6, "batch", mode="batch", eps=-1.0), "eps",
        "-1.0"),
      c("equinox.BatchNorm/mode", _eqx("BatchNorm", 6, "batch", mode="bogus"), "mode", "bogus"),
      c("equinox.BatchNorm/int-input", _eqx("BatchNorm", 6, "batch", mode="batch"), "x",
        "int32", XI),
      c("equinox.LayerNorm/shape", _eqx("LayerNorm", (5,)), "shape", "(5,)"),
      c("equinox.LayerNorm/eps", _eqx("LayerNorm", (6,), eps=-1.0), "eps", "-1.0"),
      c("equinox.LayerNorm/int-input", _eqx("LayerNorm", (6,)), "x", "int32", XI),
      c("equinox.LayerNorm/mask-shape", _eqx("LayerNorm", (6,), mask=np.ones(5, bool)), "mask",
        "(5,)"),
      c("equinox.GroupNorm/groups", _eqx("GroupNorm", 4, 6), "groups", "4"),
      c("equinox.RMSNorm/eps", _eqx("RMSNorm", (6,), eps=-1.0), "eps", "-1.0"),
      c("equinox.RMSNorm/int-input", _eqx("RMSNorm", (6,)), "x", "int32", XI),
  ]


CASES = _core_cases() + _wrapper_cases()
RESULTS: dict[tuple[str, str], str] = {}  # (case, mode) -> "clear" or what went wrong


def _raised_in_jaxnorm(e: BaseException) -> bool:
  """Whether the innermost frame of `e` (JAX's traceback filtering off) is in jaxnorm."""
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and frames[-1].filename.startswith(JAXNORM_DIR)


def _outcome(case: Case, mode: str) -> str:
  previous = jax.config.jax_traceback_filtering
  jax.config.update("jax_traceback_filtering", "off")
  try:
    x = X if case.x is None else case.x
    if mode == "jit":
      jax.jit(case.call).lower(x)
    else:
      case.call(x)
  except (ValueError, TypeError, *case.accept) as e:
    msg = str(e)
    missing = [s for s in (case.arg, case.value) if s not in msg]
    if missing:
      return f"{type(e).__name__} without {missing}: {msg[:300]}"
    if not isinstance(e, case.accept) and not _raised_in_jaxnorm(e):
      return f"{type(e).__name__} raised outside jaxnorm: {msg[:300]}"
    return "clear"
  except Exception as e:  # any other error is the finding
    return f"{type(e).__name__}: {str(e)[:300]}"
  finally:
    jax.config.update("jax_traceback_filtering", previous)
  return "no error"


def _params():
  out = []
  for case in CASES:
    for mode in ("eager", "jit"):
      reason = case.xfail or (case.xfail_jit if mode == "jit" else None)
      marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
      out.append(pytest.param(case, mode, id=f"{case.id}-{mode}", marks=marks))
  return out


@pytest.mark.parametrize("case,mode", _params())
def test_bad_input_raises_a_clear_error(case, mode):
  outcome = _outcome(case, mode)
  RESULTS[(case.id, mode)] = outcome
  assert outcome == "clear", outcome


def test_sync_running_stats_with_python_weights_under_jit():
  """Valid weights given as a Python number work eagerly and must work under jax.jit."""
  states = _replicated(X)
  f = jax.vmap(lambda s: jn.sync_running_stats(s, axis_name="r", weights=2.0), axis_name="r")
  np.testing.assert_array_equal(jax.jit(f)(states).var, f(states).var)


def test_count():
  """How many bad inputs were tried and how many raised a clear error (runs last)."""
  expected = len(_params())
  if len(RESULTS) < expected:
    pytest.skip(f"only {len(RESULTS)} of the {expected} cases ran")
  clear = sum(v == "clear" for v in RESULTS.values())
  known = sum(1 for p in _params() if p.marks)
  print(f"\n{len(RESULTS)} bad inputs tried ({len(CASES)} cases, eager and under jax.jit): "
        f"{clear} raised a clear error, {len(RESULTS) - clear} not yet (xfail)")
  assert clear == expected - known


def test_traced_epsilon_that_is_not_a_scalar_is_refused_by_name():
  def f(eps):
    return jn.layer_norm(jnp.ones((2, 3)), epsilon=eps)
  with pytest.raises(ValueError, match=r"epsilon must be a scalar.*shape \(3,\)"):
    jax.jit(f).lower(jnp.full((3,), 1e-5))
  with pytest.raises(ValueError, match=r"epsilon must be a scalar.*shape \(2, 1\)"):
    jax.jit(lambda e: jn.batch_norm(jnp.ones((2, 3)), jn.batch_norm_init(3), training=True,
                                    epsilon=e)).lower(jnp.full((2, 1), 1e-5))
