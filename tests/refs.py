"""Float64 NumPy references and the error bounds that every test's tolerance comes from.

Tolerances are derived from floating-point error bounds of the computation jaxnorm performs,
evaluated on the test's own data, never from the numbers one run printed: XLA:CPU chooses a
different reduction kernel per instruction set (SSE4.2, AVX2, AVX-512) and per thread count, so
the order of a float32 sum, and with it the last bits of every statistic, differs between
machines. Each bound below is valid for every summation order.

Notation: u is the unit roundoff of the arithmetic (2**-24 for float32, 2**-8 for bfloat16,
2**-11 for float16), and a float sum of n terms is off by at most c(n)·Σ|xᵢ| (`sum_factor`).
Every bound is first order in u (the O(u²) terms are below 1e-12 relative here).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

# Absolute tolerance on normalized outputs (values of order 1) per input dtype, for comparisons
# where no bound below applies (wrapper-vs-flax comparisons use tests/flax_cases.py).
_ATOL = {
    np.dtype(np.float64): 1e-9,
    np.dtype(np.float32): 2e-5,
    np.dtype(jnp.bfloat16): 4e-2,
    np.dtype(np.float16): 4e-3,
}

# Confidence factor of the probabilistic sum bound (see `sum_factor`): the probability that
# one sum exceeds it is below 2·exp(-LAMBDA²/2) = 7.5e-6 under the rounding model.
LAMBDA = 5.0


def atol(dtype) -> float:
  """Tolerance for outputs of order 1 computed from input of `dtype`."""
  return _ATOL[np.dtype(dtype)]


def unit_roundoff(dtype=np.float32) -> float:
  """u = 2**-(p) for a format with p significand bits (round to nearest): 2**-24 for float32."""
  return 2.0 ** -(jnp.finfo(dtype).nmant + 1)


U32 = unit_roundoff(np.float32)


def sum_factor(n, dtype=np.float32, worst=False) -> float:
  r"""c(n) such that a float sum of n terms, in any order, is off by at most c(n)·Σ|xᵢ|.

  Any summation order (sequential, pairwise, the blocked and vectorized loops XLA emits, a
  `psum` of per-device partial sums) is a binary tree of n - 1 additions, and the computed sum
  is :math:`\hat s = s + \sum_k \delta_k \hat s_k` over the tree's partial sums
  :math:`\hat s_k`, each rounding :math:`|\delta_k| \le u`, and every
  :math:`|\hat s_k| \le \sum_i |x_i|` (to first order). Hence two bounds:

  * worst case, deterministic (Higham, *Accuracy and Stability of Numerical Algorithms*, 2002,
    §4.2): :math:`|\hat s - s| \le \gamma_{n-1} \sum|x_i|`, :math:`\gamma_k = ku/(1-ku)`;
  * probabilistic (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019, Thm 3.1): with the
    :math:`\delta_k` independent and of mean zero, Azuma-Hoeffding's inequality gives
    :math:`|\sum_k \delta_k \hat s_k| \le \lambda u \sqrt{\sum_k \hat s_k^2}
    \le \lambda\sqrt{n-1}\,u\sum|x_i|` except with probability
    :math:`2e^{-\lambda^2/2}` (`LAMBDA` = 5: 7.5e-6).

  Both hold, so their minimum does: the worst case for n ≤ 26, the √n bound beyond. It stays
  pessimistic (it replaces every partial sum by Σ|xᵢ|), which is what makes it hold for every
  kernel XLA may choose. `worst=True` keeps only the deterministic bound, for data whose
  roundings are correlated (a constant input rounds the same way at every step).
  """
  n = max(int(n), 1)
  u = unit_roundoff(dtype)
  gamma = (n - 1) * u / (1 - (n - 1) * u)
  return gamma if worst else min(gamma, LAMBDA * np.sqrt(n - 1) * u)


def _axes(axes, ndim) -> tuple[int, ...]:
  return tuple(sorted(a % ndim for a in ((axes,) if isinstance(axes, int) else axes)))


def _valid(x, mask):
  return np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)


def mean_error(x, axes, mask=None, dtype=np.float32, worst=False) -> np.ndarray:
  r"""Bound on |μ̂ - μ| of a masked mean over `axes`, accumulated in `dtype` (float32).

  .. math::
    |\hat\mu - \mu| \le c(N)\,\frac{\sum_i m_i|x_i|}{n} + u|\mu|

  The sum runs over N = the number of positions reduced (masked ones add an exact zero), the
  count n is exact, and the division rounds once. The bound scales with the data's magnitude
  (Σ|x|/n), not with the mean's own size: a mean near 0 of data of scale 3 is off by
  about as much as the mean of the same data offset by 3. Cross-device means are the same
  sum split into per-device partial sums plus a `psum`: another tree over the same N terms.
  """
  x = f64(x)
  axes = _axes(axes, x.ndim)
  m = _valid(x, mask)
  big_n = int(np.prod([x.shape[a] for a in axes]))
  n = np.maximum(m.sum(axes), 1)
  abs_mean = np.where(m, np.abs(x), 0.0).sum(axes) / n
  mean = np.where(m, x, 0.0).sum(axes) / n
  u = unit_roundoff(dtype)
  return sum_factor(big_n, dtype, worst) * abs_mean + u * np.abs(mean)


def var_error(x, axes, mask=None, dtype=np.float32, worst=False) -> np.ndarray:
  r"""Bound on |σ̂² - σ²| of jaxnorm's two-pass population variance (mean first, then the
  mean of centred squares).

  With the computed mean :math:`\hat\mu = \mu + \delta` (`mean_error`), the exact mean of
  :math:`(x_i - \hat\mu)^2` is :math:`\sigma^2 + \delta^2` (because
  :math:`\sum_i m_i(x_i - \mu) = 0`); each centred square carries three roundings
  (difference, square; the difference of two nearby numbers is often exact), the sum of these
  non-negative terms c(N) relative, the division one more:

  .. math::
    |\hat\sigma^2 - \sigma^2| \le \delta^2 + (c(N) + 4u)(\sigma^2 + \delta^2)

  There is no term in μ²: `E[x²] - E[x]²` would be off by about c(N)·(μ² + σ²), i.e. by
  order 1 for data of std 1 at offset 1e4 in float32 (see tests/test_bounds.py).
  """
  _, _, var = ref_moments(x, axes, mask)
  x = f64(x)
  big_n = int(np.prod([x.shape[a] for a in _axes(axes, x.ndim)]))
  d = mean_error(x, axes, mask, dtype, worst)
  u = unit_roundoff(dtype)
  return d * d + (sum_factor(big_n, dtype, worst) + 4 * u) * (var + d * d)


def mean_square_error(x, axes, mask=None, dtype=np.float32) -> np.ndarray:
  r"""Bound on the error of RMS normalization's mean square :math:`\frac1n\sum m_i x_i^2`:
  one rounding per square, c(N) for the sum of non-negative terms, one for the division:
  :math:`(c(N) + 2u)\,\overline{x^2}`."""
  x = f64(x)
  axes = _axes(axes, x.ndim)
  m = _valid(x, mask)
  n = np.maximum(m.sum(axes), 1)
  ms = np.where(m, x * x, 0.0).sum(axes) / n
  big_n = int(np.prod([x.shape[a] for a in axes]))
  return (sum_factor(big_n, dtype) + 2 * unit_roundoff(dtype)) * ms


def output_error(x, mean, var, mean_err, var_err, scale, y, reduction_axes, feature_axes,
                 epsilon, out_dtype=np.float32) -> np.ndarray:
  r"""Bound on |ŷ - y| of a normalized output, elementwise, from its statistics' bounds.

  jaxnorm computes :math:`\hat y = \mathrm{fl}((x - \hat\mu)\cdot\mathrm{fl}(\hat r\gamma) +
  \beta)` in float32 with :math:`\hat r = \mathrm{rsqrt}(\hat\sigma^2 + \epsilon)`. To first
  order, with :math:`r = (\sigma^2 + \epsilon)^{-1/2}`:

  .. math::
    |\hat r - r| \le r\Big(\frac{|\hat\sigma^2 - \sigma^2|}{2(\sigma^2+\epsilon)} + 4u\Big)
    \qquad\text{(the addition of ε, rsqrt's two roundings, ε's own rounding)}

  .. math::
    |\hat y - y| \le |\gamma|\,r\,\big(|\hat\mu - \mu| + |x - \mu|\,(\rho + 3u)\big)
    + 2u|y| + u_{\text{out}}|y| + \eta_{\text{out}}

  where ρ is the bracket above, 3u covers the difference x - μ̂ and the two products, 2u the
  bias addition, and :math:`u_{\text{out}}` the final rounding to the output dtype (0 for
  float32 and wider). Below the output dtype's smallest normal number that rounding is
  absolute, not relative: at most :math:`\eta_{\text{out}}`, half the smallest subnormal
  (3e-8 for float16, whose subnormals reach 6e-5: an output of 4e-5 is off by up to 3e-8,
  0.07% of itself). `mean` may be None (RMS normalization: no centring, no mean error).
  """
  x = f64(x)
  red = _axes(reduction_axes, x.ndim)
  feat = _axes(feature_axes, x.ndim)
  fshape = tuple(x.shape[i] if i in feat else 1 for i in range(x.ndim))
  narrow = jnp.finfo(out_dtype).bits < 32
  out_u = unit_roundoff(out_dtype) if narrow else 0.0
  out_eta = float(jnp.finfo(out_dtype if narrow else np.float32).smallest_subnormal) / 2
  e = lambda a: f64(a) if np.ndim(a) == 0 else np.expand_dims(f64(a), red)
  with np.errstate(divide="ignore", invalid="ignore"):  # inf/NaN only where var + ε = 0
    return out_eta + _output_error(x, e, var, mean, mean_err, var_err, scale, y, fshape,
                                   epsilon, out_u)


def _output_error(x, e, var, mean, mean_err, var_err, scale, y, fshape, epsilon, out_u):
  u = U32
  r = 1.0 / np.sqrt(e(var) + epsilon)
  rho = e(var_err) / (2 * (e(var) + epsilon)) + 4 * u
  g = 1.0 if scale is None else np.abs(f64(scale)).reshape(fshape)
  if mean is None:
    centred, dmean = np.abs(x), 0.0
  else:
    centred, dmean = np.abs(x - e(mean)), e(mean_err)
  return g * r * (dmean + centred * (rho + 3 * u)) + (2 * u + out_u) * np.abs(f64(y))


def ema_error(momentum, old, batch, batch_err, state_dtype=np.float32) -> np.ndarray:
  r"""Bound on a running-statistics update :math:`(1-w)\,old + w\,b` with w = 1 - momentum.

  jaxnorm rounds w and 1 - w to float32 (u each), then two products and a sum:

  .. math::
    |\Delta| \le w\,|\hat b - b| + 4u\,\big((1-w)|old| + w|b|\big) + u_{\text{state}}|new|
  """
  w = 1.0 - momentum
  old, batch = f64(old), f64(batch)
  new = (1 - w) * old + w * batch
  out_u = unit_roundoff(state_dtype) if jnp.finfo(state_dtype).bits < 32 else 0.0
  return w * f64(batch_err) + 4 * U32 * ((1 - w) * np.abs(old) + w * np.abs(batch)) \
      + out_u * np.abs(new)


def cumulative_average_error(batch_values, batch_errors) -> np.ndarray:
  r"""Bound on the exact cumulative average (momentum=None) after K updates, each
  :math:`s_k = (1 - w_k)s_{k-1} + w_k b_k` with :math:`w_k = 1/(k+1)` in float32.

  The error obeys :math:`E_k \le (1-w_k)E_{k-1} + w_k|\hat b_k - b_k| + 4uM`, with M the
  largest :math:`|b_k|` (a running average of them never exceeds it), hence
  :math:`E_K \le \max_k |\hat b_k - b_k| + 4uKM`.
  """
  b = np.abs(f64(batch_values))
  return np.max(f64(batch_errors), 0) + 4 * U32 * len(b) * b.max(0)


def ema_chain_error(momentum, batch_values, batch_errors) -> np.ndarray:
  r"""Bound on running statistics after many `ema_error` updates with the same momentum.

  :math:`E_k \le m E_{k-1} + w|\hat b_k - b_k| + 4uM` (w = 1 - m, M the largest |value| of
  state or batch) has the fixed point :math:`E \le \max_k |\hat b_k - b_k| + 4uM/w`.
  """
  w = 1.0 - momentum
  m = max(np.abs(f64(batch_values)).max(), 1.0)
  return np.max(f64(batch_errors), 0) + 4 * U32 * m / w


def stochastic_ema_error(momentum, steps, target, state_dtype, k=10.0) -> float:
  r"""Bound, holding with probability at least :math:`1 - 1/k^2`, on a running mean that
  starts at 0 and absorbs `steps` batches whose mean is exactly `target` > 0 (representable
  in `state_dtype`), stored in `state_dtype` with unbiased stochastic rounding.

  Each step computes :math:`x_t = m s_t + (1-m)\,target` in float32 (error at most
  :math:`2u\,target`, summing to :math:`2u\,target/(1-m)`), then rounds to one of the two
  neighbours of :math:`x_t`, which lie in :math:`[s_t, target]`: the state rises monotonically
  and never passes `target`. The rounding is unbiased, so :math:`E[target - s_t] = target\,m^t`
  (up to the float32 error), and its variance is at most :math:`ulp \cdot d_t` with
  :math:`d_t \le (1-m)(target - s_t)` the distance of :math:`x_t` to the grid. Summed with
  weights :math:`m^{2(T-t)}`, the variance of the final error is at most
  :math:`ulp \cdot target \cdot m^T`, with ulp the spacing below `target`; Chebyshev's
  inequality gives the k-sigma bound.
  """
  m = float(momentum)
  spacing = float(jnp.finfo(state_dtype).eps) * target  # at least the spacing below target
  return k * np.sqrt(spacing * target * m**steps) + 2 * U32 * target / (1 - m)


def sync_error(means, variances, weights, state_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
  r"""Bounds on `sync_running_stats` of R replicas' float32 states (axis 0) with `weights`.

  The merged mean is a weighted mean of R exact inputs (a product, c(R) for the sum, a
  division); the variance is the two-pass variance of the replicas' means plus their
  variances, :math:`\sum_i w_i(v_i + (m_i - \hat\mu)^2)/W`, so as in `var_error` the mean's
  error δ enters only squared, and each term carries five roundings:

  .. math::
    |\hat\mu - \mu| \le (c(R) + 2u)\,\frac{\sum_i w_i|m_i|}{W} = \delta, \qquad
    |\hat\sigma^2 - \sigma^2| \le \delta^2 + (c(R) + 6u)(\sigma^2 + \delta^2)

  plus the final rounding to the state's dtype.
  """
  means, variances = f64(means), f64(variances)
  w = f64(weights).reshape((-1,) + (1,) * (means.ndim - 1))
  big_w = w.sum(0)
  mean = (w * means).sum(0) / big_w
  var = (w * (variances + (means - mean) ** 2)).sum(0) / big_w
  r = means.shape[0]
  u = U32
  out_u = unit_roundoff(state_dtype) if jnp.finfo(state_dtype).bits < 32 else 0.0
  d = (sum_factor(r) + 2 * u) * (w * np.abs(means)).sum(0) / big_w
  return (d + out_u * np.abs(mean),
          d * d + (sum_factor(r) + 6 * u) * (var + d * d) + out_u * var)


def leading_shift(x, axes, sample_axes=None) -> np.ndarray:
  """The shift of `jaxnorm._stats.shifted_moments` in float64: per set, the median of its first
  three elements along the last of `axes` (or of `sample_axes`) that has three, the other
  sample axes at 0 (a set of fewer: its first element); with `sample_axes`, the mean over the
  other reduced axes (the channels of a group) of those medians."""
  x = f64(x)
  axes = _axes(axes, x.ndim)
  sample = axes if sample_axes is None else _axes(sample_axes, x.ndim)
  along = next((a for a in reversed(sample) if x.shape[a] >= 3), None)
  lead = x
  for a in sample:
    lead = np.take(lead, np.arange(3 if a == along else 1), axis=a)
  if along is not None:
    lead = np.median(lead, axis=along, keepdims=True)
  return lead.mean(axes)


def _shifted_errors(x, axes, dtype, sample_axes=None):
  _, mean, var = ref_moments(x, axes)
  x = f64(x)
  axes = _axes(axes, x.ndim)
  n = int(np.prod([x.shape[a] for a in axes]))
  shift = leading_shift(x, axes, sample_axes)
  u = unit_roundoff(dtype)
  big_d = np.abs(mean - shift) + u * np.abs(shift)
  a = np.abs(x - np.expand_dims(shift, axes)).mean(axes)
  c = sum_factor(n, dtype)
  e_d = (c + u) * a + u * big_d
  mean_err = e_d + u * (np.abs(mean) + e_d) + u * np.abs(shift)
  var_err = (c + 6 * u) * (var + big_d ** 2) + 2 * big_d * e_d
  return mean, var, mean_err, var_err


def shifted_errors(x, axes, dtype=np.float32, blocks=1, sample_axes=None
                   ) -> tuple[np.ndarray, np.ndarray]:
  r"""Bounds on |μ̂ - μ| and |σ̂² - σ²| of the one-read moments about a shift K
  (`jaxnorm._stats.shifted_moments`).

  With :math:`d_i = x_i - K`, :math:`D = \mu - K` and :math:`A = \sum|d_i|/N \le
  \sqrt{\sigma^2 + D^2}`: each :math:`d_i` rounds once, the sums of d and d² are off by
  c(N) relative to :math:`\sum|d_i|` and :math:`\sum d_i^2 = N(\sigma^2 + D^2)`, the
  squares by 2u, and :math:`\bar d` by one more rounding, so to first order

  .. math::
    |\hat{\bar d} - D| \le e_d = (c(N) + u)A + u|D|, \qquad
    |\hat\mu - \mu| \le e_d + u(|\mu| + e_d) + u|K|

  .. math::
    |\hat\sigma^2 - \sigma^2| \le (c(N) + 6u)(\sigma^2 + D^2) + 2|D|\,e_d

  (the product :math:`\bar d\sum d`, the subtraction and the division round once each, on
  terms no larger than :math:`\sigma^2 + D^2`), and a last :math:`u|K|` in the mean: XLA may
  evaluate K (a small mean) once for x - K and again, unrounded inside a fused multiply-add,
  for K + d̄. No other term grows with the offset μ: the shift removes it before anything is
  summed. K enters the variance's bound through D only; it is the float64 `leading_shift`
  here, and the float32 K differs by :math:`u|K|`, which `D` absorbs. K is the median of the
  set's first three elements (`leading_shift`; with `sample_axes`, group normalization's
  spatial axes, the mean of each channel's median), so no single element can make
  :math:`D^2` exceed the square of the other two's distance from the mean: to first order the
  bound is the two-pass one's (`var_error`) times :math:`1 + D^2/\sigma^2`.

  With `blocks` > 1 (`blocked=True` there), the first reduction axis is split into that many
  blocks, each shifted by the median of its first three elements and bounded as above, and
  the blocks' moments :math:`(\mu_b, \sigma_b^2)` (errors :math:`e_b, v_b`) are merged by the
  law of total variance, which adds its own sums over the B blocks:

  .. math::
    e_M = \overline{e_b} + c(B)\,\overline{|\mu_b|} + u|\mu|, \qquad
    |\hat\sigma^2 - \sigma^2| \le \overline{v_b + 2|\mu_b - \mu|(e_b + e_M) + (e_b + e_M)^2}
    + (c(B) + 3u)\,\overline{\sigma_b^2 + (\mu_b - \mu)^2} + u\sigma^2

  (bars: means over the blocks, which hold equal counts). Here the block means, each off by
  about :math:`u|\mu|`, enter the variance at first order, through
  :math:`2|\mu_b - \mu|\,e_b`.
  """
  x = f64(x)
  axes = _axes(axes, x.ndim)
  if blocks == 1:
    _, _, mean_err, var_err = _shifted_errors(x, axes, dtype, sample_axes)
    return mean_err, var_err
  a0 = axes[0]
  xb = x.reshape(x.shape[:a0] + (blocks, x.shape[a0] // blocks) + x.shape[a0 + 1:])
  mb, vb, eb, evb = _shifted_errors(xb, tuple(a + 1 for a in axes), dtype)
  _, mean, var = ref_moments(x, axes)
  u = unit_roundoff(dtype)
  c = sum_factor(blocks, dtype)
  avg = lambda a: a.mean(a0)
  e_m = avg(eb) + c * avg(np.abs(mb)) + u * np.abs(mean)
  dev = np.abs(mb - np.expand_dims(mean, a0))
  e_all = eb + np.expand_dims(e_m, a0)
  var_err = (avg(evb + 2 * dev * e_all + e_all ** 2) + (c + 3 * u) * avg(vb + dev ** 2)
             + u * var)
  return e_m, var_err



def merge_error(a, a_err, b, b_err) -> tuple[np.ndarray, np.ndarray]:
  r"""Bounds on `merge_moments` (Chan et al.) of float64 moments `a`, `b` = (n, μ, σ²), whose
  float32 values are off by `a_err`, `b_err` = (mean bound, variance bound).

  :math:`\mu = \mu_a + \delta w_b`, :math:`\sigma^2 = (n_a\sigma_a^2 + n_b\sigma_b^2 +
  \delta^2 n_a w_b)/n` with :math:`\delta = \mu_b - \mu_a`, :math:`w_b = n_b/n`. The inputs'
  errors propagate with weights :math:`w_a, w_b` (and :math:`2|\delta|w_a w_b` into the
  variance); each formula adds at most five roundings of terms no larger than its inputs.
  """
  (na, ma, va), (nb, mb, vb) = [tuple(map(f64, t)) for t in (a, b)]
  (dma, dva), (dmb, dvb) = [tuple(map(f64, t)) for t in (a_err, b_err)]
  n = np.maximum(na + nb, 1)
  wa, wb = na / n, nb / n
  delta = mb - ma
  u = U32
  mean_err = wa * dma + wb * dmb + 4 * u * (np.abs(ma) + np.abs(mb))
  var = wa * va + wb * vb + delta * delta * wa * wb
  var_err = (wa * dva + wb * dvb + 2 * np.abs(delta) * wa * wb * (dma + dmb)
             + (dma + dmb) ** 2 * wa * wb + 6 * u * (var + delta * delta * wa * wb))
  return mean_err, var_err


def staged_error(fan_ins, magnitude, growth=4.0, dtype=np.float32) -> float:
  """A bound on the rounding error of a float evaluation of a network, as a sequence of
  stages (a dot product, a norm's sums, a softmax-weighted sum) of the given fan-ins.

  A stage of fan-in n is off by at most (γ_{n-1} + 2u)·Σ|terms| (its sum, `sum_factor(worst=
  True)`, then its own rounding and that of what it feeds: an activation, a residual add); to
  first order the errors of successive stages add. The bound takes every stage's Σ|terms| to
  be at most `growth` times the output's `magnitude`, and every later stage to pass an error
  on unamplified: true of a transformer whose parameters are O(1) and whose activations are
  normalized before each layer, not of a network in general.
  """
  u = unit_roundoff(dtype)
  return growth * magnitude * sum(sum_factor(n, dtype, worst=True) + 2 * u for n in fan_ins)


def assert_within(actual, desired, bound, what="") -> None:
  """|actual - desired| <= bound elementwise (NaN nowhere), with the worst offender reported."""
  a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  b = np.broadcast_to(np.asarray(bound, np.float64), np.broadcast_shapes(a.shape, d.shape))
  err = np.abs(a - d)
  assert np.all(np.isfinite(a) == np.isfinite(d)), f"{what}: non-finite values differ"
  bad = ~(err <= b) & np.isfinite(d)
  if bad.any():
    i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(b, 1e-300), 0)), bad.shape)
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.size} elements outside the bound; worst at {i}: "
        f"actual {np.broadcast_to(a, bad.shape)[i]!r}, "
        f"desired {np.broadcast_to(d, bad.shape)[i]!r}, "
        f"|error| {err[i]:.3g} > bound {b[i]:.3g}")


@functools.cache
def float16_compiles() -> bool:
  """Whether XLA:CPU can run float16 arithmetic here (it cannot without F16C: jax 0.10.2 then
  fails to link `__extendhfsf2`); any other error propagates."""
  import jax
  try:
    jax.block_until_ready(jax.jit(lambda v: v * v)(jnp.ones(2, jnp.float16)))
  except jax.errors.JaxRuntimeError as e:
    if "materialize symbols" in str(e):
      return False
    raise
  return True


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


# --- tolerances of whole normalizers, from the bounds above -----------------------------------

def norm_bound(x, y, scale=None, reduction_axes=-1, feature_axes=-1, epsilon=1e-6, mask=None,
               centered=True, out_dtype=np.float32) -> np.ndarray:
  """Elementwise bound on a normalizer's output `y` (the float64 reference) computed by jaxnorm
  from the float32 values of `x`: statistics over `reduction_axes` (`mean_error`, `var_error`,
  or `mean_square_error` without centring), then `output_error`."""
  x = f64(x)
  if centered:
    _, mean, var = ref_moments(x, reduction_axes, mask)
    merr, verr = mean_error(x, reduction_axes, mask), var_error(x, reduction_axes, mask)
  else:
    axes = _axes(reduction_axes, x.ndim)
    m = _valid(x, mask)
    mean, merr = None, None
    var = np.where(m, x * x, 0.0).sum(axes) / np.maximum(m.sum(axes), 1)
    verr = mean_square_error(x, reduction_axes, mask)
  return output_error(x, mean, var, merr, verr, scale, y, reduction_axes, feature_axes, epsilon,
                      out_dtype)


def group_norm_bound(x, y, num_groups, scale=None, epsilon=1e-6, mask=None,
                     out_dtype=np.float32) -> np.ndarray:
  """`norm_bound` of group normalization (statistics per example and group of channels)."""
  x = f64(x)
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))
  mg = None if mask is None else np.broadcast_to(np.asarray(mask), x.shape).reshape(xg.shape)
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  g = None if scale is None else np.broadcast_to(f64(scale), (c,)).reshape(xg.shape[-2:])
  return norm_bound(xg, f64(y).reshape(xg.shape), g, axes, (x.ndim - 1, x.ndim), epsilon, mg,
                    out_dtype=out_dtype).reshape(x.shape)


def derivative_bounds(x, reduction_axes, feature_axes, scale, cot, cot_err, epsilon=1e-6,
                      mask=None, centered=True) -> tuple[float, float, float]:
  r"""Bounds (max-norm) on the float32 derivatives of a normalizer: input, scale and bias.

  With :math:`h = \gamma g` for the cotangent (or tangent) g of y, the derivative of a
  normalization over n valid elements is
  :math:`\partial x_i = r\,(h_i - \overline{h} - \hat x_i S)`, :math:`S = \overline{h\hat x}`
  (no :math:`\overline{h}` without centring), :math:`\partial\gamma = \sum g\hat x`,
  :math:`\partial\beta = \sum g`, the last two over the M elements of each feature. jaxnorm's
  float32 evaluation (any order of the same terms) differs, to first order, through r's
  relative error ρ and x̂'s absolute error :math:`d_i` (`output_error`'s terms, from the
  forward statistics' bounds), h's error :math:`\delta h_i` (`cot_err` times |γ|), the two
  sums (c(N) relative to the sums of |h| and |h x̂|) and four roundings:

  .. math::
    |\delta\partial x_i| \le \rho A_i + r\big[\delta h_i + \overline{\delta h} + c(N)\overline{|h|}
    + d_i|S| + |\hat x_i|\,(\overline{\delta h|\hat x|} + \overline{|h|d}
    + c(N)\overline{|h\hat x|}) + 4u A_i / r\big]

  with :math:`A_i = r(|h_i| + |\overline h| + |\hat x_i S|)`, and

  .. math::
    |\delta\partial\gamma| \le \sum (c(M)|g\hat x| + \delta g\,|\hat x| + |g|d), \qquad
    |\delta\partial\beta| \le \sum (c(M)|g| + \delta g)

  `x`, `cot` and `cot_err` have the statistics' reduction axes explicit (group norm: reshape
  to (..., groups, channels per group) first, as `group_norm_bound` does).
  """
  x, cot, cot_err = f64(x), f64(cot), f64(cot_err)
  red, feat = _axes(reduction_axes, x.ndim), _axes(feature_axes, x.ndim)
  m = _valid(x, mask)
  u = U32
  big_n = int(np.prod([x.shape[a] for a in red]))
  cn = sum_factor(big_n)
  e = lambda a: np.expand_dims(f64(a), red)
  if centered:
    _, mean, var = ref_moments(x, red, mask)
    merr, verr = mean_error(x, red, mask), var_error(x, red, mask)
  else:
    var = np.where(m, x * x, 0.0).sum(red) / np.maximum(m.sum(red), 1)
    mean, merr, verr = np.zeros_like(var), np.zeros_like(var), mean_square_error(x, red, mask)
  n = e(np.maximum(m.sum(red), 1))
  avg = lambda a: np.where(m, a, 0.0).sum(red, keepdims=True) / n
  r = 1.0 / np.sqrt(e(var) + epsilon)
  xhat = np.where(m, (x - e(mean)) * r, 0.0)
  rho = e(verr) / (2 * (e(var) + epsilon)) + 4 * u
  d = np.where(m, r * (e(merr) + np.abs(x - e(mean)) * (rho + 3 * u)), 0.0)
  fshape = tuple(x.shape[i] if i in feat else 1 for i in range(x.ndim))
  gam = np.ones(fshape) if scale is None else np.abs(f64(scale)).reshape(fshape)
  sgam = np.ones(fshape) if scale is None else f64(scale).reshape(fshape)
  h = np.where(m, sgam * cot, 0.0)
  dh = np.where(m, gam * (cot_err + u * np.abs(cot)), 0.0)
  hbar = avg(h) if centered else 0.0
  big_s = avg(h * xhat)
  a = r * (np.abs(h) + np.abs(hbar) + np.abs(xhat * big_s))
  bx = rho * a + r * (dh + avg(dh) + cn * avg(np.abs(h)) + d * np.abs(big_s)
                      + np.abs(xhat) * (avg(dh * np.abs(xhat)) + avg(np.abs(h) * d)
                                        + cn * avg(np.abs(h * xhat)))) + 4 * u * a
  other = tuple(i for i in range(x.ndim) if i not in feat)
  cm = sum_factor(int(np.prod([x.shape[i] for i in other])))
  gv = np.where(m, np.abs(cot), 0.0)
  dg = np.where(m, cot_err, 0.0)
  bscale = (cm * gv * np.abs(xhat) + dg * np.abs(xhat) + gv * d).sum(other)
  bbias = (cm * gv + dg).sum(other)
  return float(np.where(m, bx, 0.0).max()), float(bscale.max()), float(bbias.max())


def ref_batch_renorm_train(x, state_mean, state_var, r_max, d_max, scale=None, bias=None,
                           feature_axes=-1, epsilon=1e-5, mask=None):
  """(y, count, mean, var) of a training step of batch renormalization in float64."""
  x = f64(x)
  feat = _axes(feature_axes, x.ndim)
  red = tuple(a for a in range(x.ndim) if a not in feat)
  n, mean, var = ref_moments(x, red, mask)
  sigma_b, sigma = np.sqrt(var + epsilon), np.sqrt(f64(state_var) + epsilon)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mean - f64(state_mean)) / sigma, -d_max, d_max)
  fshape = tuple(x.shape[i] if i in feat else 1 for i in range(x.ndim))
  g = np.ones(fshape) if scale is None else f64(scale).reshape(fshape)
  b = np.zeros(fshape) if bias is None else f64(bias).reshape(fshape)
  xhat = ref_normalize(x, mean, var, None, None, red, feat, epsilon)
  y = xhat * r.reshape(fshape) * g + d.reshape(fshape) * g + b
  return y, n, mean, var


def renorm_bound(x, y, state_mean, state_var, r_max, d_max, scale=None, bias=None,
                 feature_axes=-1, epsilon=1e-5, mask=None, out_dtype=np.float32) -> np.ndarray:
  r"""Elementwise bound on batch renormalization's output, from the batch statistics' bounds.

  jaxnorm normalizes with the batch's moments and the effective parameters
  :math:`\gamma' = r\gamma`, :math:`\beta' = d\gamma + \beta`, where
  :math:`r = \mathrm{clip}(\mathrm{fl}(\sqrt{\hat\sigma_B^2 + \epsilon}) \cdot
  \mathrm{rsqrt}(\sigma^2 + \epsilon))` and :math:`d = \mathrm{clip}((\hat\mu_B - \mu) \cdot
  \mathrm{rsqrt}(\sigma^2 + \epsilon))` with the running (exact float32) μ, σ². Clipping is
  1-Lipschitz, so the clipped values are off by no more than the unclipped ones
  (:math:`r_0, d_0`):

  .. math::
    |\hat r - r| \le r_0\Big(\frac{|\hat\sigma_B^2 - \sigma_B^2|}{2(\sigma_B^2+\epsilon)}
    + 8u\Big), \qquad
    |\hat d - d| \le \frac{|\hat\mu_B - \mu_B|}{\sqrt{\sigma^2+\epsilon}} + 6u|d_0|

  (the sum and square root of σ_B, the sum, rsqrt's two roundings and ε's rounding of the
  running σ, the product; for d the difference, the product and the same four). Then
  :math:`\hat y = \hat x\,\mathrm{fl}(\hat r\gamma) + \mathrm{fl}(\hat d\gamma + \beta)`: the
  error of x̂ and of the output's own roundings is `output_error` with γ' as the scale; the
  errors of r and d add :math:`|\gamma|(|\hat x|(|\hat r - r| + u r) + |\hat d - d|)` and the
  roundings of β': :math:`2u(|d\gamma| + |\beta|)`.
  """
  x = f64(x)
  feat = _axes(feature_axes, x.ndim)
  red = tuple(a for a in range(x.ndim) if a not in feat)
  fshape = tuple(x.shape[i] if i in feat else 1 for i in range(x.ndim))
  u = U32
  _, mean, var = ref_moments(x, red, mask)
  merr, verr = mean_error(x, red, mask), var_error(x, red, mask)
  sigma = np.sqrt(f64(state_var) + epsilon)  # the running σ
  r0, d0 = np.sqrt(var + epsilon) / sigma, (mean - f64(state_mean)) / sigma
  r, d = np.clip(r0, 1 / r_max, r_max), np.clip(d0, -d_max, d_max)
  g = np.ones(fshape) if scale is None else f64(scale).reshape(fshape)
  b = np.zeros(fshape) if bias is None else f64(bias).reshape(fshape)
  dr = r0 * (verr / (2 * (var + epsilon)) + 8 * u)
  dd = merr / sigma + 6 * u * np.abs(d0)
  xhat = ref_normalize(x, mean, var, None, None, red, feat, epsilon)
  base = output_error(x, mean, var, merr, verr, r.reshape(fshape) * g, y, red, feat, epsilon,
                      out_dtype)
  return (base + np.abs(g) * (np.abs(xhat) * (dr + u * r).reshape(fshape) + dd.reshape(fshape))
          + 2 * u * (np.abs(d.reshape(fshape) * g) + np.abs(b)))
