"""Every error jaxnorm raises on purpose, tested in one place, laid out along the public surface.

The sections follow the API: core statistics (moments, merge_moments); the normalizers
(layer_norm, rms_norm, group_norm, instance_norm, normalize); batch norm and its state
(batch_norm, batch_renorm, update_running_stats, batch_norm_init, momentum_from_torch);
folding; replicas (sync_running_stats); recompute; interop; the kernels and `implementation`;
the wrappers (linen, nnx, equinox). A section holds up to three kinds of check:

- `Case`s, enumerated systematically (axes out of range or repeated; scale, bias, statistics,
  state and mask of the wrong shape or dtype; integer and boolean input; negative epsilon;
  momentum outside [0, 1]; group counts and ghost-batch sizes that do not divide; an unknown
  implementation). Each runs twice, eagerly and traced under `jax.jit` (`.lower`, so the error
  must come at trace time). A clear error is a ValueError or TypeError raised by jaxnorm itself
  (not from inside JAX, XLA, flax or equinox) whose message names the argument and contains
  the value received. `test_count` reports how many cases ran and how many gave a clear error;
  the cases that do not yet are marked `xfail(strict=True)`, with the reason.
- Rows `(call, error, pattern)`: a call whose message must match a pattern that says more than
  the argument and the value (what is expected, the fix), or whose exception is a KeyError or
  NotImplementedError.
- Test functions, for what needs more: a setup, several words of one message, a warning, an
  error under vmap, a missing dependency.

The tables are gathered at the end of the file, where the table-driven tests run, `test_count`
last. Some errors are still checked in the family files: in passing, by a test of a behaviour
(a fallback, then the error); with a model only that file builds (test_interop's PyTorch
ResNet); and in files not merged here yet (issue 32).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
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
from flax import linen as nn
from flax import nnx

import jaxnorm as jn
import jaxnorm.equinox as jne
from jaxnorm import interop
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx
from jaxnorm._pallas import _mosaic

KEY = jax.random.key(0)
X = np.random.RandomState(0).randn(4, 6).astype(np.float32)
X3 = np.random.RandomState(1).randn(2, 3, 6).astype(np.float32)
XI = np.arange(24, dtype=np.int32).reshape(4, 6)
XB = XI % 2 == 0
STATE = jn.batch_norm_init(6)
JAXNORM_DIR = os.path.dirname(jn.__file__)
Z = np.zeros((4, 6), np.float32)  # the rows' input, where values do not matter
Z_NCHW = np.zeros((2, 4, 5, 6), np.float32)  # channels first: 4 channels on axis 1
ONES = np.ones((4, 6), np.float32)


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
# as flax does (the drop-in contract; test_integer_input_follows_flax_in_the_layers_and_is_
# refused_by_the_core below), so it is not a bad input for them; the functional core and the
# equinox layers refuse it.


# --- core statistics: moments, merge_moments ---------------------------------------------------

def _statistics_cases() -> list[Case]:
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
  ]


_STATISTICS_ROWS = [
    (lambda: jn.moments(Z, 2), ValueError, r"reduction_axes=2 is out of range .* rank 2"),
    (lambda: jn.moments(Z, (1, -1)), ValueError, r"reduction_axes=\(1, -1\) repeats"),
    (lambda: jn.moments(Z, 0.5), TypeError, r"reduction_axes must be an int"),
    (lambda: jn.moments(Z, 0, mask=np.ones((4, 6))), TypeError,
     r"mask must be a boolean array .* got dtype float"),
    (lambda: jn.moments(np.zeros(3, bool), 0), TypeError, r"floating dtype"),
    (lambda: jn.moments(Z, 0, axis_index_groups=[[0, 1]]), ValueError,
     r"axis_index_groups was given without axis_name"),
]


# --- the normalizers: layer_norm, rms_norm, group_norm, instance_norm, normalize ---------------

def _normalizer_cases() -> list[Case]:
  c = Case
  return [
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
  ]


_NORMALIZER_ROWS = [
    (lambda: jn.layer_norm(Z, feature_axes=-3), ValueError, r"feature_axes=-3 is out of"),
    (lambda: jn.layer_norm(Z, jnp.ones(5)), ValueError,
     r"scale must have the shape .* \(6,\) or .*; got shape \(5,\)"),
    (lambda: jn.layer_norm(Z, None, jnp.ones((2, 6))), ValueError,
     r"bias must have the shape .* \(6,\) or a shape that broadcasts to the input's shape "
     r"\(4, 6\); got shape \(2, 6\)"),
    (lambda: jn.layer_norm(np.zeros((4, 3, 8), np.float32), np.ones((2, 1, 8))), ValueError,
     (r"scale must have the shape .* \(8,\) or a shape that broadcasts to the input's shape "
      r"\(4, 3, 8\); got shape \(2, 1, 8\)")),
    (lambda: jn.normalize(Z, jnp.zeros(6), jnp.ones(5), reduction_axes=0, epsilon=0.0),
     ValueError, r"var must have .* \(6,\); got shape \(5,\)"),
    (lambda: jn.layer_norm(Z, mask=np.ones((3, 1), bool)), ValueError,
     r"mask of shape \(3, 1\) does not broadcast to the input's shape \(4, 6\)"),
    (lambda: jn.layer_norm(np.zeros((2, 3), np.int32)), TypeError,
     r"x must have a floating dtype .* got int32"),
    (lambda: jn.layer_norm(Z, epsilon=-1e-6), ValueError,
     r"epsilon must be a finite, non-negative scalar; got -1e-06"),
    (lambda: jn.layer_norm(np.zeros((4, 8), np.float32), zero_centered_scale=1), TypeError,
     r"zero_centered_scale must be a bool"),
    (lambda: jn.group_norm(Z, num_groups=4), ValueError,
     r"num_groups=4 must be a positive divisor of the number of channels, 6"),
    (lambda: jn.group_norm(Z, num_groups=None, group_size=4), ValueError,
     r"group_size=4 must be a positive divisor"),
    (lambda: jn.group_norm(Z, num_groups=2, group_size=3), ValueError,
     r"exactly one of num_groups and group_size"),
    (lambda: jn.group_norm(np.zeros(6, np.float32), num_groups=2), ValueError, r"rank >= 2"),
    (lambda: jn.group_norm(np.zeros((2, 3, 4), np.float32), num_groups=2, reduction_axes=1),
     ValueError, r"must include the last"),
    (lambda: jn.instance_norm(Z, feature_axes=0), ValueError, r"includes the batch axis"),
    # rms_norm's conventions: the value and the fix
    (lambda: jn.rms_norm(jnp.ones((2, 4)), convention="mistral"), ValueError,
     r"convention='mistral' is not one of None"),
    (lambda: jn.rms_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), convention="llama"),
     ValueError, r"convention='llama' takes no bias.*convention='gemma'"),
    (lambda: jn.rms_norm(jnp.ones((2, 4)), jnp.ones(4), convention="llama",
                         zero_centered_scale=True), ValueError, r"zero_centered_scale=True"),
]


def test_traced_epsilon_that_is_not_a_scalar_is_refused_by_name():
  def f(eps):
    return jn.layer_norm(jnp.ones((2, 3)), epsilon=eps)
  with pytest.raises(ValueError, match=r"epsilon must be a scalar.*shape \(3,\)"):
    jax.jit(f).lower(jnp.full((3,), 1e-5))
  with pytest.raises(ValueError, match=r"epsilon must be a scalar.*shape \(2, 1\)"):
    jax.jit(lambda e: jn.batch_norm(jnp.ones((2, 3)), jn.batch_norm_init(3), training=True,
                                    epsilon=e)).lower(jnp.full((2, 1), 1e-5))


def test_traced_epsilon_and_momentum_are_accepted():
  # Values only known at run time cannot be checked at trace time, and must still work.
  f = jax.jit(lambda x, eps, m: jn.batch_norm(x, STATE, training=True, epsilon=eps,
                                              momentum=m))
  y, state = f(Z + np.arange(6, dtype=np.float32), 1e-5, 0.9)
  assert np.isfinite(np.asarray(y)).all() and int(state.count) == 1


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="scale must have the shape"):
    jax.jit(lambda x: jn.layer_norm(x, jnp.ones(5))).lower(Z)


# Each message holds every one of its words: what was passed, what is expected and the fix.
_MESSAGE_WORDS = [
    # A channels-first batch with a state of its channels: point to feature_axes, not to
    # a state of the width.
    (lambda: jn.batch_norm(Z_NCHW, jn.batch_norm_init(4), training=True), ValueError,
     ["state.mean has shape (4,)", "feature shape is (6,)", "feature_axes=(3,)",
      "feature_axes=1", "batch_norm_init((6,))"]),
    # The feature axes are named as axes, not listed as if they were a shape.
    (lambda: jn.layer_norm(Z, jnp.ones(5)), ValueError,
     ["scale must have the shape", "along feature_axes=(1,)", "(6,)", "got shape (5,)"]),
    # A state where scale goes, and a Python list.
    (lambda: jn.batch_norm(Z, STATE, STATE, training=True), TypeError,
     ["scale must be an array", "got a BatchNormState", "batch_norm(x, state, scale, bias"]),
    (lambda: jn.layer_norm(Z, [1.0] * 6), TypeError,
     ["scale must be an array", "got a list", "jnp.asarray"]),
    (lambda: jn.batch_norm(Z, STATE, None, [0.0] * 6, training=True), TypeError,
     ["bias must be an array", "got a list", "jnp.asarray"]),
]


@pytest.mark.parametrize("call, error, words", _MESSAGE_WORDS)
def test_messages_say_what_was_passed_what_is_expected_and_the_fix(call, error, words):
  with pytest.raises(error) as info:
    call()
  msg = str(info.value)
  for word in words:
    assert word in msg, (word, msg)
  assert "Cannot determine dtype" not in msg


# --- batch norm and its state: batch_norm, batch_renorm, update_running_stats, batch_norm_init,
# momentum_from_torch ---------------------------------------------------------------------------

STATE4 = jn.BatchNormState(jnp.array([0.3, -1.0, 2.0, 0.0]), jnp.array([0.5, 4.0, 1.0, 9.0]),
                           jnp.array(5))
XC = (np.random.default_rng(0).normal(size=(4, 3))
      + 1j * np.random.default_rng(1).normal(size=(4, 3)) + 3.0 - 2.0j).astype(np.complex64)


def _batch_norm_cases() -> list[Case]:
  c = Case
  return [
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
      c("batch_norm/cumulative-average-feature-mask", lambda x: jn.batch_norm(
          x, STATE, training=True, momentum=None, mask=np.ones((4, 6), bool)), "mask", "(4, 6)"),
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
  ]


_BATCH_NORM_ROWS = [
    (lambda: jn.batch_norm(Z, STATE, training=True, feature_axes=(1, 1)), ValueError,
     r"feature_axes=\(1, 1\) repeats"),
    (lambda: jn.batch_norm(Z, STATE, jnp.ones(3), training=True), ValueError,
     r"scale must have the shape"),
    (lambda: jn.batch_norm(np.zeros((4, 3, 8), np.float32), jn.batch_norm_init(8), None,
                           np.ones((4, 3, 8, 1)), training=True), ValueError,
     r"bias must have the shape .*; got shape \(4, 3, 8, 1\)"),
    # a state whose feature shape does not match
    (lambda: jn.batch_norm(Z, jn.batch_norm_init(4), training=True), ValueError,
     r"state.mean has shape \(4,\) but the input's feature shape is \(6,\)"),
    (lambda: jn.batch_norm(Z, (jnp.zeros(6), jnp.ones(6)), training=True), TypeError,
     r"state must be a jaxnorm.BatchNormState"),
    (lambda: jn.update_running_stats(STATE, jn.moments(Z, 1)), ValueError,
     r"state.mean has shape \(6,\) but the input's feature shape is \(4,\)"),
    (lambda: jn.batch_norm(Z, STATE, training=True, mask=np.ones((4, 6, 1), bool)),
     ValueError, r"does not broadcast"),
    (lambda: jn.batch_norm(Z, STATE, training=True, epsilon=-1.0), ValueError, "epsilon"),
    # momentum outside [0, 1] (1.0, frozen statistics, is accepted: issue 33)
    (lambda: jn.batch_norm(Z, STATE, training=True, momentum=1.01), ValueError,
     r"momentum must be a scalar in \[0, 1\].* got 1.01.*momentum_from_torch"),
    (lambda: jn.update_running_stats(STATE, jn.moments(Z, 0), momentum=-0.1), ValueError,
     r"momentum must be a scalar in \[0, 1\]"),
    # training must be static
    (lambda: jn.batch_norm(Z, STATE, training=1), TypeError, r"training must be a Python"),
    (lambda: jn.batch_norm_init(-3), ValueError, r"feature_shape"),
    (lambda: jn.batch_norm_init(3, dtype=jnp.int32), TypeError, r"floating or complex dtype"),
    # batch renormalization and ghost batches
    (lambda: jn.batch_renorm(np.zeros((4, 4), np.float32), STATE4, training=True, r_max=0.5,
                             d_max=1.0), ValueError, r"r_max must be a finite scalar >= 1.*0.5"),
    (lambda: jn.batch_renorm(np.zeros((4, 4), np.float32), STATE4, training=True, r_max=2.0,
                             d_max=-1.0), ValueError, r"d_max must be .* >= 0.*-1.0"),
    (lambda: jn.batch_norm(np.zeros((6, 4), np.float32), STATE4, training=True,
                           virtual_batch_size=4), ValueError,
     r"virtual_batch_size=4 must be a positive divisor of the batch size .*, 6"),
    (lambda: jn.batch_renorm(np.zeros((6, 4), np.float32), STATE4, training=True, r_max=2.0,
                             d_max=1.0, virtual_batch_size=0), ValueError,
     r"virtual_batch_size=0 must be a positive divisor .* 6"),
    (lambda: jn.batch_norm(np.zeros((4, 6), np.float32), jn.batch_norm_init(4), training=True,
                           feature_axes=0, virtual_batch_size=2), ValueError,
     r"axis 0 is a feature axis"),
    (lambda: jn.batch_norm(np.zeros((4, 4), np.float32), STATE4, training=True,
                           virtual_batch_size=2.0), TypeError, r"virtual_batch_size must be"),
    # complex input and state: each names the fix
    (lambda: jn.batch_norm(XC, jn.batch_norm_init(3), training=True), TypeError,
     r"batch_norm_init\(\(3,\), dtype=jnp.complex64\)"),
    (lambda: jn.batch_norm(np.real(XC), jn.batch_norm_init(3, dtype=jnp.complex64),
                           training=True), TypeError, "a real batch a real one"),
    (lambda: jn.batch_renorm(XC, jn.batch_norm_init(3, dtype=jnp.complex64), training=True,
                             r_max=3.0, d_max=5.0), TypeError, "batch_renorm"),
]


def test_a_channels_first_scale_points_to_feature_axes():
  with pytest.raises(ValueError) as info:
    jn.batch_norm(Z_NCHW, jn.batch_norm_init(6), jnp.ones(4), training=True)
  msg = str(info.value)
  for word in ["scale must have the shape", "along feature_axes=(3,)", "got shape (4,)",
               "feature_axes=1"]:
    assert word in msg, (word, msg)


def test_momentum_from_torch_rejects_out_of_range():
  assert jn.momentum_from_torch(None) is None
  with pytest.raises(ValueError, match="PyTorch's momentum"):
    jn.momentum_from_torch(-0.1)


# --- folding: fold_batch_norm, linen.fold_batch_norms ------------------------------------------

def _fold_data(kernel_shape, seed=0):
  rs = np.random.RandomState(seed)
  f = kernel_shape[-1]
  return {
      "kernel": rs.randn(*kernel_shape).astype(np.float32),
      "mean": (rs.randn(f) * 3).astype(np.float32),
      "var": (rs.rand(f) * 4 + 0.1).astype(np.float32),
  }


FOLD = _fold_data((4, 3))
FOLD_NORM = {"kernel": FOLD["kernel"],
             "scale": (np.random.RandomState(1).randn(4) + 1).astype(np.float32)}


def _fold_cases() -> list[Case]:
  c = Case
  return [
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
  ]


_FOLD_ROWS = [
    (lambda: jn.fold_batch_norm(FOLD["kernel"], None, mean=FOLD["mean"][:2], var=FOLD["var"],
                                scale=None, offset=None, epsilon=1e-5), ValueError,
     r"mean must have the shape .*\(3,\).*\(2,\)"),
    (lambda: jn.fold_batch_norm(FOLD["kernel"], None, mean=FOLD["mean"], var=FOLD["var"],
                                scale=None, offset=np.ones(4), epsilon=1e-5), ValueError,
     "offset must have the shape"),
    (lambda: jn.fold_batch_norm(np.ones((4, 3), np.int32), None, mean=FOLD["mean"],
                                var=FOLD["var"], scale=None, offset=None, epsilon=1e-5),
     TypeError, "kernel must have a floating dtype"),
    (lambda: jn.fold_batch_norm(FOLD["kernel"], None, mean=FOLD["mean"], var=FOLD["var"],
                                scale=None, offset=None, epsilon=-1.0), ValueError, "epsilon"),
    (lambda: jn.fold_batch_norm(np.float32(1.0), None, mean=FOLD["mean"][:1],
                                var=FOLD["var"][:1], scale=None, offset=None, epsilon=1e-5),
     ValueError, "at least one axis"),
    (lambda: jn.fold_batch_norm(jnp.ones((2, 3)), None, mean=jnp.zeros(3, jnp.complex64),
                                var=jnp.ones(3)), TypeError, "fold_batch_norm"),
    # fold_norm_into_dense (a (4, 3) kernel, scale of 4 features)
    (lambda: jn.fold_norm_into_dense(FOLD_NORM["kernel"], scale=FOLD_NORM["scale"][:3]),
     ValueError, r"scale must have the shape .*\(4,\).*\(3,\)"),
    (lambda: jn.fold_norm_into_dense(FOLD_NORM["kernel"], scale=FOLD_NORM["scale"],
                                     offset=np.ones(5, np.float32)),
     ValueError, r"offset must have the shape .*\(4,\).*\(5,\)"),
    (lambda: jn.fold_norm_into_dense(FOLD_NORM["kernel"], np.ones(4, np.float32),
                                     scale=FOLD_NORM["scale"]),
     ValueError, r"bias must have the shape .*\(3,\).*\(4,\)"),
    (lambda: jn.fold_norm_into_dense(FOLD_NORM["scale"], scale=FOLD_NORM["scale"]), ValueError,
     r"kernel must be a Dense kernel .*got shape \(4,\)"),
    # (layers, features, out): a leading batch axis is jax.vmap's
    (lambda: jn.fold_norm_into_dense(np.ones((2, 4, 3), np.float32),
                                     scale=np.ones((2, 4), np.float32)),
     ValueError, r"fits kernel axis 1.*jax\.vmap"),
    (lambda: jn.fold_norm_into_dense(FOLD_NORM["kernel"], scale=None), ValueError,
     "scale is required"),
    (lambda: jn.fold_norm_into_dense(np.ones((4, 3), np.int32), scale=FOLD_NORM["scale"]),
     TypeError, "kernel must have a floating dtype"),
    (lambda: jn.fold_norm_into_dense(FOLD_NORM["kernel"], scale=FOLD_NORM["scale"],
                                     offset=np.ones(4, np.complex64)),
     TypeError, "offset is complex"),
    # scale is keyword-only
    (lambda: jn.fold_norm_into_dense(FOLD_NORM["kernel"], None, FOLD_NORM["scale"]), TypeError,
     r"positional argument"),
]


def _fold_variables():
  """The variables of a Conv then a BatchNorm in a block `_Block_0`, as linen names them."""
  return {"params": {"_Block_0": {"Conv_0": {"kernel": np.ones((3, 3, 2, 4), np.float32)},
                                  "BatchNorm_0": {"scale": np.ones(4, np.float32),
                                                  "bias": np.zeros(4, np.float32)}}},
          "batch_stats": {"_Block_0": {"BatchNorm_0": {"mean": np.zeros(4, np.float32),
                                                       "var": np.ones(4, np.float32)}}}}


def test_linen_fold_batch_norms_errors():
  variables = _fold_variables()
  with pytest.raises(KeyError, match=r"'_Block_0/Conv_9'.*keys at that level"):
    jnn.fold_batch_norms(variables, [("_Block_0/Conv_9", "_Block_0/BatchNorm_0")])
  with pytest.raises(KeyError, match="BatchNorm '_Block_0/BatchNorm_7'"):
    jnn.fold_batch_norms(variables, [("_Block_0/Conv_0", "_Block_0/BatchNorm_7")])
  with pytest.raises(KeyError, match="no 'kernel'"):
    jnn.fold_batch_norms(variables, {"_Block_0/BatchNorm_0": "_Block_0/BatchNorm_0"})
  with pytest.raises(ValueError, match="pairs is empty"):
    jnn.fold_batch_norms(variables, {})


# --- replicas: sync_running_stats --------------------------------------------------------------

R = 8  # replicas, one per fake CPU device


def _replicated(x):
  s = jn.batch_norm_init(x.shape[-1])
  return jax.tree.map(lambda a: jnp.stack([a, a]), s)


def _stacked_states():
  """R replicas' states of 3 features, one batch each."""
  return jn.BatchNormState(mean=np.zeros((R, 3), np.float32), var=np.ones((R, 3), np.float32),
                           count=np.ones(R, np.int32))


def _replica_cases() -> list[Case]:
  c = Case
  return [
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


_REPLICA_ROWS = [
    (lambda: jn.sync_running_stats(jn.batch_norm_init(3), axis_name=None), ValueError,
     "axis_name must name"),
    (lambda: jax.vmap(lambda s: jn.sync_running_stats({"bn": s, "w": s.mean}, axis_name="r"),
                      axis_name="r")(_stacked_states()), TypeError, "found a leaf of type"),
    (lambda: jn.sync_running_stats(jn.batch_norm_init(3), axis_name="r", weights=np.ones(3)),
     ValueError, "weights must be a scalar"),
    (lambda: jn.sync_running_stats(jn.batch_norm_init(3), axis_name="r", weights=-1.0),
     ValueError, "non-negative"),
    (lambda: jax.vmap(lambda s: jn.sync_running_stats(
        s, axis_name="r", axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]]),
        axis_name="r")(_stacked_states()), NotImplementedError, "split the mesh axis"),
]


def test_sync_running_stats_with_python_weights_under_jit():
  """Valid weights given as a Python number work eagerly and must work under jax.jit."""
  states = _replicated(X)
  f = jax.vmap(lambda s: jn.sync_running_stats(s, axis_name="r", weights=2.0), axis_name="r")
  np.testing.assert_array_equal(jax.jit(f)(states).var, f(states).var)


# --- recompute: linen.recompute_batch_stats, nnx.recompute_batch_stats ------------------------

class _MaskedNet(nn.Module):
  @nn.compact
  def __call__(self, batch, train: bool):
    h = nn.Dense(3)(batch["x"])
    return jnn.BatchNorm(use_running_average=not train)(h, mask=batch.get("mask"))


def test_recompute_errors():
  batch = {"x": np.ones((8, 4), np.float32), "mask": np.ones((8, 1), bool)}
  model = _MaskedNet()
  variables = model.init(KEY, batch, train=False)
  with pytest.raises(ValueError, match="batches is empty"):
    jnn.recompute_batch_stats(model, variables, [], train=False)
  with pytest.raises(ValueError, match="batches is empty"):
    jnnx.recompute_batch_stats(nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
                                              jnnx.BatchNorm(3, rngs=nnx.Rngs(0))), iter([]))
  dense = nn.Dense(3)
  dv = jax.eval_shape(dense.init, jax.random.key(0), jnp.ones((2, 4)))
  dv = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), dict(dv))
  with pytest.raises(ValueError, match="Dense calls no jaxnorm BatchNorm"):
    jnn.recompute_batch_stats(dense, dv, [np.ones((2, 4), np.float32)])
  with pytest.raises(ValueError, match="Linear calls no jaxnorm BatchNorm"):
    jnnx.recompute_batch_stats(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
                               [np.ones((2, 4), np.float32)])
  empty = [{**batch, "mask": np.zeros_like(batch["mask"])}]
  with pytest.raises(ValueError, match="saw no valid element"):
    jnn.recompute_batch_stats(model, variables, empty, train=True)


# --- interop: from_torch, to_torch, from_torch_model ------------------------------------------

_INTEROP_ROWS = [
    (lambda: interop.from_torch({"conv.weight": np.ones(3)}, "bn."), KeyError,
     r"prefix 'bn\.'.*'bn\.weight'.*'bn\.running_var'"),
    (lambda: interop.from_torch({"running_mean": np.ones(3)}), KeyError, "'running_var'"),
    (lambda: interop.from_torch({"running_mean": np.ones(3), "running_var": np.ones(3)},
                                with_count=True), KeyError, "num_batches_tracked"),
    (lambda: interop.from_torch({"weight": np.ones(3), "bias": np.ones(4)}), ValueError,
     "feature shape"),
    (lambda: interop.from_torch({"running_mean": np.ones((3, 1)),
                                 "running_var": np.ones((3, 1))}), ValueError,
     "must be a vector"),
    (lambda: interop.to_torch({"params": {"kernel": np.ones((2, 2)), "scale": np.ones(2)}}),
     ValueError, "params/kernel"),
    (lambda: interop.to_torch({"params": {}}), KeyError, "no normalization-layer entries"),
    (lambda: interop.to_torch({"batch_stats": {"mean": np.ones(2)}}), KeyError,
     "both 'mean' and 'var'"),
    (lambda: interop.to_torch({"params": {"scale": np.ones(2), "bias": np.ones(3)}}),
     ValueError, "feature shape"),
    (lambda: interop.from_torch(_resnet_state_dict()), KeyError,
     "under prefix ''"),  # a whole model: from_torch converts one layer at a time
]


def _resnet_state_dict():
  """The state_dict of test_interop's small PyTorch ResNet in NumPy: a stem, two basic blocks
  (one with a downsampling shortcut), GroupNorm, LayerNorm and a Linear layer."""
  sd = {"conv1.weight": np.ones((8, 3, 3, 3), np.float32), "fc.weight": np.ones((5, 16)),
        "fc.bias": np.zeros(5), "layer2.0.downsample.0.weight": np.ones((16, 8, 1, 1))}
  for block, cin, cout in (("layer1.0", 8, 8), ("layer2.0", 8, 16)):
    sd[f"{block}.conv1.weight"] = np.ones((cout, cin, 3, 3), np.float32)
    sd[f"{block}.conv2.weight"] = np.ones((cout, cout, 3, 3), np.float32)
  norms = {"bn1": 8, "layer1.0.bn1": 8, "layer1.0.bn2": 8, "layer2.0.bn1": 16,
           "layer2.0.bn2": 16, "layer2.0.downsample.1": 16, "gn": 16, "head_ln": 16}
  for module, n in norms.items():
    sd[f"{module}.weight"], sd[f"{module}.bias"] = np.ones(n), np.zeros(n)
    if "bn" in module or "downsample" in module:  # BatchNorm2d: running statistics
      sd[f"{module}.running_mean"], sd[f"{module}.running_var"] = np.zeros(n), np.ones(n)
      sd[f"{module}.num_batches_tracked"] = np.asarray(3, np.int64)
  return sd


RESNET_NAME_MAP = {"bn1": "bn1", "layer1.0.bn1": "layer1_0/bn1", "layer1.0.bn2": "layer1_0/bn2",
                   "layer2.0.bn1": "layer2_0/bn1", "layer2.0.bn2": "layer2_0/bn2",
                   "layer2.0.downsample.1": "layer2_0/down_bn", "gn": "gn", "head_ln": "head_ln"}


def test_from_torch_model_errors():
  sd = _resnet_state_dict()
  partial = {k: v for k, v in RESNET_NAME_MAP.items() if k != "layer2.0.downsample.1"}
  with pytest.raises(KeyError, match=r"does not map: \['layer2\.0\.downsample\.1'\].*skip="):
    interop.from_torch_model(sd, partial)
  v = interop.from_torch_model(sd, partial, skip=["layer2.0.downsample.1"])
  assert "down_bn" not in v["batch_stats"]["layer2_0"]
  with pytest.raises(KeyError, match=r"does not have: \['layer1\.1\.bn1'\]"):
    interop.from_torch_model(sd, {**RESNET_NAME_MAP, "layer1.1.bn1": "x"})
  with pytest.raises(KeyError, match=r"skip names modules.*\['nope'\]"):
    interop.from_torch_model(sd, RESNET_NAME_MAP, skip=["nope"])
  with pytest.raises(ValueError, match="both 'bn1' and 'gn'"):
    interop.from_torch_model(sd, {**RESNET_NAME_MAP, "gn": "bn1"})
  with pytest.raises(ValueError, match="non-empty"):
    interop.from_torch_model(sd, {**RESNET_NAME_MAP, "gn": ""})
  with pytest.raises(ValueError, match=r"'params/layer1_0/bn1/scale' has shape \(8,\).*\(16,\)"):
    interop.from_torch_model(sd, RESNET_NAME_MAP, variables={
        "params": {"layer1_0": {"bn1": {"scale": jnp.ones(16)}}}})
  with pytest.raises(ValueError, match="variables hold a"):
    interop.from_torch_model(sd, RESNET_NAME_MAP,
                             variables={"params": {"layer1_0": jnp.ones(3)}})
  init = {"params": {"layer1_0": {"conv1": {"kernel": jnp.zeros((3, 3, 8, 8))}}}}
  with pytest.raises(ValueError, match=r"no 'params/layer1_0/conv1/scale'.*\['kernel'\]"):
    interop.from_torch_model(sd, {**RESNET_NAME_MAP, "layer1.0.conv1": "layer1_0/conv1"},
                             variables=init)  # a convolution mapped by mistake


# --- the kernels and `implementation` -----------------------------------------------------------

_X16 = jax.ShapeDtypeStruct((8, 128), jnp.float16)  # traced only: no float16 arithmetic
_X32 = jax.ShapeDtypeStruct((8, 128), jnp.float32)
_G16 = jax.ShapeDtypeStruct((128,), jnp.float16)

_KERNEL_ROWS = [
    (lambda: _mosaic.blocking(0, 128, jnp.float32), ValueError, "rows=0"),
    (lambda: _mosaic.blocking(8, 1 << 20, jnp.float32, "v5e"), ValueError,
     "features=1048576 in float32"),
    (lambda: _mosaic.blocking(8, 128, jnp.float32, "v9"), ValueError, "generation='v9'"),
    (lambda: jax.eval_shape(lambda x: _mosaic.forward_call(
        x, (), eps=1e-6, centered=True, has_scale=False, has_bias=False, interpret=True), _X16),
     ValueError, r"dtype float16\. Use the XLA path"),
    (lambda: jax.eval_shape(lambda x, g: _mosaic.backward_call(
        x, x, (), g, has_bias=False, bias_dtype=None, centered=False, interpret=True),
        _X32, _G16), ValueError, r"dtype float16\. Use the XLA path"),
]


@pytest.mark.parametrize("implementation", ["triton", "XLA", "", 1])
def test_unknown_implementation_lists_the_choices(implementation):
  for f in (jn.layer_norm, jn.rms_norm):
    with pytest.raises(ValueError, match=r"None.*'xla'.*'pallas'"):
      f(jnp.ones((2, 4)), implementation=implementation)


# --- the wrappers: linen, nnx, equinox ---------------------------------------------------------

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


def _eqx_vmapped(layer, x, state):
  return jax.vmap(lambda x, s: layer(x, s), axis_name="batch", in_axes=(0, None),
                  out_axes=(0, None))(x, state)


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
      c("linen.BatchNorm/cumulative-average-feature-mask",
        _linen("BatchNorm", True, mask=np.ones((4, 6), bool), momentum=None), "mask", "(4, 6)"),
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
      c("nnx.BatchNorm/cumulative-average-feature-mask",
        _nnx("BatchNorm", mask=np.ones((4, 6), bool), momentum=None), "mask", "(4, 6)"),
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
      c("equinox.BatchNorm/cumulative-average-feature-mask",
        _eqx("BatchNorm", 6, "batch", mode="batch", mask=np.ones(6, bool)), "mask", "(6,)"),
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


def _renorm_x():
  return jnp.asarray(np.random.RandomState(0).randn(8, 3, 4).astype(np.float32) * 2 + 1)


_WRAPPER_ROWS = [
    (lambda: jnn.LayerNorm(implementation="triton").init(jax.random.key(0), Z), ValueError,
     "implementation='triton'"),
    (lambda: jnnx.BatchNorm(4, renorm=True, rngs=nnx.Rngs(0))(_renorm_x()), ValueError,
     r"renorm=True needs r_max and d_max"),
    (lambda: jnn.BatchNorm(use_running_average=False, renorm=True).apply(
        jnn.BatchNorm(renorm=True, use_running_average=False).init(jax.random.key(0),
                                                                   _renorm_x()),
        _renorm_x(), mutable=["batch_stats"]), ValueError, r"renorm=True needs r_max and d_max"),
    (lambda: jnnx.BatchNorm(3, rngs=nnx.Rngs(0))(jnp.asarray(XC)), TypeError,
     r"dtype=jnp\.complex64"),
]


@pytest.mark.parametrize("make", [
    lambda: jnnx.BatchNorm(3, rngs=nnx.Rngs(0)),
    lambda: jnnx.LayerNorm(3, rngs=nnx.Rngs(0)),
    lambda: jnnx.RMSNorm(3, rngs=nnx.Rngs(0)),
    lambda: jnnx.InstanceNorm(3, rngs=nnx.Rngs(0)),
    lambda: jnnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0)),
])
def test_nnx_layer_with_the_wrong_num_features_names_both_and_the_fix(make):
  layer = make()
  with pytest.raises(ValueError, match=r"num_features=(3|4)\) got input of shape \(4, 6\).*"
                                       r"holds 6 features; construct it with num_features=6"):
    layer(ONES)


@pytest.mark.parametrize("make, axis", [
    (lambda: jnnx.BatchNorm(3, rngs=nnx.Rngs(0)), "axis=-1"),
    (lambda: jnnx.LayerNorm(3, rngs=nnx.Rngs(0)), "feature_axes=-1"),
])
def test_nnx_size_message_names_the_argument_once(make, axis):
  with pytest.raises(ValueError) as info:
    make()(ONES)
  msg = str(info.value)
  assert f"whose {axis} holds 6 features" in msg and "feature feature_axes" not in msg, msg


@pytest.mark.parametrize("family", ["linen", "nnx", "equinox"])
def test_add_layers_refuse_a_residual_of_another_shape(family):
  x, r = jnp.ones((4, 16)), jnp.ones((4, 8))
  # (per example under equinox's vmap: (16,) and (8,))
  with pytest.raises(ValueError, match=r"residual must have x's shape \((4, )?16,?\).*got "
                                       r"shape \((4, )?8,?\)"):
    if family == "linen":
      jnn.AddLayerNorm().init(KEY, x, r)
    elif family == "nnx":
      jnnx.AddRMSNorm(16, rngs=nnx.Rngs(0))(x, r)
    else:
      jax.vmap(jne.AddLayerNorm(16))(x, r)


def test_linen_batch_norm_in_training_without_mutable_batch_stats_says_how():
  bn = jnn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), ONES)
  with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
    bn.apply(variables, ONES)
  # Evaluation and update_stats=False need no mutable collection.
  jnn.BatchNorm(use_running_average=True).apply(variables, ONES)
  bn.apply(variables, ONES, update_stats=False)


def test_integer_input_follows_flax_in_the_layers_and_is_refused_by_the_core():
  xi = np.arange(24, dtype=np.int32).reshape(4, 6)
  ln = jnn.LayerNorm()
  y = ln.apply(ln.init(jax.random.key(0), xi), xi)
  assert y.dtype == jnp.float32  # flax's rule: normalized in float32
  np.testing.assert_allclose(y, jn.layer_norm(xi.astype(np.float32)), rtol=1e-6)
  with pytest.raises(TypeError, match=r"x must have a floating dtype .* got int32. Cast it"):
    jn.layer_norm(xi)


def test_equinox_shape_errors_name_the_fix():
  with pytest.raises(ValueError, match=r"jax\.vmap"):
    jne.LayerNorm(3)(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="divisible"):
    jne.GroupNorm(2, channelwise_affine=False)(jnp.ones((3, 5)))
  with pytest.raises(ValueError, match="channels"):
    jne.GroupNorm(2)
  with pytest.raises(ValueError, match="mode"):
    jne.BatchNorm(3, "batch", mode="bogus")
  bn, state = eqx.nn.make_with_state(jne.BatchNorm)(3, "batch", mode="batch")
  with pytest.raises(ValueError, match="input_size"):
    _eqx_vmapped(bn, jnp.ones((2, 4)), state)
  with pytest.warns(UserWarning, match="mode"):
    jne.BatchNorm(3, "batch")


def test_equinox_batch_norm_on_a_channels_last_example_under_vmap_says_to_move_the_channels():
  bn, state = eqx.nn.make_with_state(jne.BatchNorm)(4, "batch", mode="batch")
  with pytest.raises(ValueError) as info:
    _eqx_vmapped(bn, jnp.ones((2, 5, 6, 4)), state)  # already under jax.vmap(axis_name="batch")
  msg = str(info.value)
  assert "x.shape=(5, 6, 4)" in msg and "channels first" in msg, msg
  assert "jnp.moveaxis(x, -1, 0)" in msg and "under jax.vmap" not in msg, msg
  with pytest.raises(ValueError, match=r"x.shape=\(2, 4, 5\).*under jax.vmap\(.*"
                                       r"axis_name='batch'"):
    bn(jnp.ones((2, 4, 5)), state)  # a whole batch, outside jax.vmap


def test_without_equinox_the_import_says_how_to_install_it():
  code = ("import sys; sys.modules['equinox'] = None\n"
          "try:\n  import jaxnorm.equinox\nexcept ImportError as e:\n"
          "  ok = 'pip install -e \".[equinox]\"' in str(e) and "
          "'pip install \"jaxnorm[equinox]\"' in str(e)\n"
          "  sys.exit(0 if ok else 1)\nsys.exit(2)")
  result = subprocess.run([sys.executable, "-c", code], check=False, timeout=120)
  assert result.returncode == 0


# --- the tables, run ---------------------------------------------------------------------------

CASES = (_statistics_cases() + _normalizer_cases() + _batch_norm_cases() + _fold_cases()
         + _replica_cases() + _wrapper_cases())
ROWS = (_STATISTICS_ROWS + _NORMALIZER_ROWS + _BATCH_NORM_ROWS + _FOLD_ROWS + _REPLICA_ROWS
        + _INTEROP_ROWS + _KERNEL_ROWS + _WRAPPER_ROWS)
RESULTS: dict[tuple[str, str], str] = {}  # (case, mode) -> "clear" or what went wrong


@pytest.mark.parametrize("call, error, pattern", ROWS)
def test_bad_input_raises_the_error_its_message_describes(call, error, pattern):
  with pytest.raises(error, match=pattern):
    call()


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
