"""The per-platform choices compute the same thing: the derivative as programs compiled for GPU
and TPU evaluate it (the tangent sums of `_platform.OTHER`, which GPUs and TPUs share), run
here on the CPU under that policy, against the CPU's.

Both are float32 evaluations of the same terms in another order, so each lies within
`refs.derivative_bounds` of the exact derivative, and they differ by at most twice that bound.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from jaxnorm import _platform
from tests import refs

CASES = {
    "layer_norm": (lambda x, g, b, m: jn.layer_norm(x, g, b, mask=m), True),
    "rms_norm": (lambda x, g, b, m: jn.rms_norm(x, g, b, mask=m), False),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_the_other_platforms_derivative_equals_the_cpus(name, masked):
  f, centered = CASES[name]
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(6, 32)) * 2 + 3).astype(np.float32)
  g = (1 + 0.1 * rng.normal(size=32)).astype(np.float32)
  b = (0.1 * rng.normal(size=32)).astype(np.float32)
  cot = rng.normal(size=(6, 32)).astype(np.float32)
  mask = (np.arange(32) < 20)[None, :] if masked else None
  if masked:
    x = np.where(mask, x, np.nan).astype(np.float32)

  def grads(policy):
    with _platform.forced(policy):
      y, pullback = jax.vjp(lambda x, g, b: f(x, g, b, mask), x, g, b)
      dx, dg, db = pullback(jnp.asarray(cot))
      tangent = jax.jvp(lambda x: f(x, g, b, mask), (x,), (jnp.asarray(cot),))[1]
      return [np.asarray(a) for a in (y, dx, dg, db, tangent)]

  on_cpu = grads(_platform.CPU)
  elsewhere = grads(_platform.OTHER)
  np.testing.assert_array_equal(on_cpu[0], elsewhere[0])  # the forward pass is shared
  xr = np.where(mask, x, 0.0) if masked else x
  dx_b, dg_b, db_b = refs.derivative_bounds(xr, -1, -1, g, cot, np.zeros_like(cot), 1e-6,
                                            mask, centered)
  valid = np.broadcast_to(mask, x.shape) if masked else np.ones(x.shape, bool)
  for what, a, c, bound in (("dx", on_cpu[1], elsewhere[1], dx_b),
                            ("dscale", on_cpu[2], elsewhere[2], dg_b),
                            ("dbias", on_cpu[3], elsewhere[3], db_b)):
    if what == "dx":
      a, c = np.where(valid, a, 0.0), np.where(valid, c, 0.0)
    assert np.all(np.isfinite(c)), what
    refs.assert_within(c, a, 2 * bound, what)
  refs.assert_within(np.where(valid, elsewhere[4], 0.0), np.where(valid, on_cpu[4], 0.0),
                     2 * dx_b, "jvp")
