"""Bad input raises at trace time, naming the argument, the value received and what is expected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

X = np.zeros((4, 6), np.float32)
STATE = jn.batch_norm_init(6)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        # axes out of range or repeated
        (lambda: jn.moments(X, 2), ValueError, r"reduction_axes=2 is out of range .* rank 2"),
        (lambda: jn.moments(X, (1, -1)), ValueError, r"reduction_axes=\(1, -1\) repeats"),
        (lambda: jn.moments(X, 0.5), TypeError, r"reduction_axes must be an int"),
        (lambda: jn.layer_norm(X, feature_axes=-3), ValueError, r"feature_axes=-3 is out of"),
        (lambda: jn.batch_norm(X, STATE, training=True, feature_axes=(1, 1)), ValueError,
         r"feature_axes=\(1, 1\) repeats"),
        # scale / bias of the wrong shape
        (lambda: jn.layer_norm(X, jnp.ones(5)), ValueError,
         r"scale must have the shape .* \(6,\) or .*; got shape \(5,\)"),
        (lambda: jn.layer_norm(X, None, jnp.ones((2, 6))), ValueError,
         r"bias must have the shape .* \(6,\) or a shape that broadcasts to the input's shape "
         r"\(4, 6\); got shape \(2, 6\)"),
        (lambda: jn.batch_norm(X, STATE, jnp.ones(3), training=True), ValueError,
         r"scale must have the shape"),
        (lambda: jn.normalize(X, jnp.zeros(6), jnp.ones(5), reduction_axes=0, epsilon=0.0),
         ValueError, r"var must have .* \(6,\); got shape \(5,\)"),
        # state whose feature shape does not match
        (lambda: jn.batch_norm(X, jn.batch_norm_init(4), training=True), ValueError,
         r"state.mean has shape \(4,\) but the input's feature shape is \(6,\)"),
        (lambda: jn.batch_norm(X, (jnp.zeros(6), jnp.ones(6)), training=True), TypeError,
         r"state must be a jaxnorm.BatchNormState"),
        (lambda: jn.update_running_stats(STATE, jn.moments(X, 1)), ValueError,
         r"state.mean has shape \(6,\) but the input's feature shape is \(4,\)"),
        # mask that does not broadcast / is not boolean
        (lambda: jn.layer_norm(X, mask=np.ones((3, 1), bool)), ValueError,
         r"mask of shape \(3, 1\) does not broadcast to the input's shape \(4, 6\)"),
        (lambda: jn.moments(X, 0, mask=np.ones((4, 6))), TypeError,
         r"mask must be a boolean array .* got dtype float"),
        (lambda: jn.batch_norm(X, STATE, training=True, mask=np.ones((4, 6, 1), bool)),
         ValueError, r"does not broadcast"),
        # non-floating input
        (lambda: jn.layer_norm(np.zeros((2, 3), np.int32)), TypeError,
         r"x must have a floating dtype .* got int32"),
        (lambda: jn.moments(np.zeros(3, bool), 0), TypeError, r"floating dtype"),
        # negative epsilon
        (lambda: jn.layer_norm(X, epsilon=-1e-6), ValueError,
         r"epsilon must be a finite, non-negative scalar; got -1e-06"),
        (lambda: jn.batch_norm(X, STATE, training=True, epsilon=-1.0), ValueError, "epsilon"),
        # momentum outside [0, 1] (1.0, frozen statistics, is accepted: issue 33)
        (lambda: jn.batch_norm(X, STATE, training=True, momentum=1.01), ValueError,
         r"momentum must be a scalar in \[0, 1\].* got 1.01.*momentum_from_torch"),
        (lambda: jn.update_running_stats(STATE, jn.moments(X, 0), momentum=-0.1), ValueError,
         r"momentum must be a scalar in \[0, 1\]"),
        # num_groups / group_size that do not divide the channels
        (lambda: jn.group_norm(X, num_groups=4), ValueError,
         r"num_groups=4 must be a positive divisor of the number of channels, 6"),
        (lambda: jn.group_norm(X, num_groups=None, group_size=4), ValueError,
         r"group_size=4 must be a positive divisor"),
        (lambda: jn.group_norm(X, num_groups=2, group_size=3), ValueError,
         r"exactly one of num_groups and group_size"),
        (lambda: jn.group_norm(np.zeros(6, np.float32), num_groups=2), ValueError,
         r"rank >= 2"),
        (lambda: jn.group_norm(np.zeros((2, 3, 4), np.float32), num_groups=2,
                               reduction_axes=1), ValueError, r"must include the last"),
        (lambda: jn.instance_norm(X, feature_axes=0), ValueError, r"includes the batch axis"),
        # training must be static
        (lambda: jn.batch_norm(X, STATE, training=1), TypeError, r"training must be a Python"),
        (lambda: jn.batch_norm_init(-3), ValueError, r"feature_shape"),
        (lambda: jn.batch_norm_init(3, dtype=jnp.int32), TypeError, r"floating or complex dtype"),
        (lambda: jn.moments(X, 0, axis_index_groups=[[0, 1]]), ValueError,
         r"axis_index_groups was given without axis_name"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, pattern):
  with pytest.raises(error, match=pattern):
    call()


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="scale must have the shape"):
    jax.jit(lambda x: jn.layer_norm(x, jnp.ones(5))).lower(X)


def test_traced_epsilon_and_momentum_are_accepted():
  # Values only known at run time cannot be checked at trace time, and must still work.
  f = jax.jit(lambda x, eps, m: jn.batch_norm(x, STATE, training=True, epsilon=eps,
                                              momentum=m))
  y, state = f(X + np.arange(6, dtype=np.float32), 1e-5, 0.9)
  assert np.isfinite(np.asarray(y)).all() and int(state.count) == 1


X_NCHW = np.zeros((2, 4, 5, 6), np.float32)  # channels first: 4 channels on axis 1


@pytest.mark.parametrize(
    "call, error, words",
    [
        # A channels-first batch with a state of its channels: point to feature_axes, not to
        # a state of the width.
        (lambda: jn.batch_norm(X_NCHW, jn.batch_norm_init(4), training=True), ValueError,
         ["state.mean has shape (4,)", "feature shape is (6,)", "feature_axes=(3,)",
          "feature_axes=1", "batch_norm_init((6,))"]),
        # The feature axes are named as axes, not listed as if they were a shape.
        (lambda: jn.layer_norm(X, jnp.ones(5)), ValueError,
         ["scale must have the shape", "along feature_axes=(1,)", "(6,)", "got shape (5,)"]),
        # A state where scale goes, and a Python list.
        (lambda: jn.batch_norm(X, STATE, STATE, training=True), TypeError,
         ["scale must be an array", "got a BatchNormState",
          "batch_norm(x, state, scale, bias"]),
        (lambda: jn.layer_norm(X, [1.0] * 6), TypeError,
         ["scale must be an array", "got a list", "jnp.asarray"]),
        (lambda: jn.batch_norm(X, STATE, None, [0.0] * 6, training=True), TypeError,
         ["bias must be an array", "got a list", "jnp.asarray"]),
    ],
)
def test_messages_say_what_was_passed_what_is_expected_and_the_fix(call, error, words):
  with pytest.raises(error) as info:
    call()
  msg = str(info.value)
  for word in words:
    assert word in msg, (word, msg)
  assert "Cannot determine dtype" not in msg


def test_a_channels_first_scale_points_to_feature_axes():
  with pytest.raises(ValueError) as info:
    jn.batch_norm(X_NCHW, jn.batch_norm_init(6), jnp.ones(4), training=True)
  msg = str(info.value)
  for word in ["scale must have the shape", "along feature_axes=(3,)", "got shape (4,)",
               "feature_axes=1"]:
    assert word in msg, (word, msg)
