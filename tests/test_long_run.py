r"""Running statistics after 10^5 updates against a float64 recurrence.

`jn.update_running_stats` runs 10^5 times in a `jax.lax.scan` on batch moments (given, or
computed by `jn.moments` from bfloat16 input), with flax's decays 0.99 and 0.9999 and PyTorch's
cumulative average (`momentum=None`). The float32 trajectory is compared at every step with the
same recurrence in float64 on the same batch moments.

Error propagation (u = 2^-24, M = the largest |value| of state or batch, ε_k the local error of
step k: the rounding of the weight w and of 1 - w, two products and a sum, all relative to
values at most M, so |ε_k| <= 4uM, plus w_k times the batch moments' own error δ_k):

* Exponential average, new = m·old + (1 - m)·batch, w = 1 - m: the error obeys
  E_k = m·E_{k-1} + ε_k. The map is a contraction (m < 1), so
  |E_K| <= Σ_j m^{K-j} |ε_j| <= max|δ| + 4uM / w, whatever K: the error saturates after about
  1/w steps and never grows again. (The bound is nearly attained: float32's 1 - fl(w) + fl(w)
  differs from 1 by up to u, a bias that every step repeats with the same sign, so the
  average converges to batch·(1 + O(u/w)): 3e-4 relative at m = 0.9999.)
* Cumulative average, w_k = 1/(k + 1): E_k = (1 - w_k)·E_{k-1} + ε_k, and the product
  Π_{i=j+1}^{K} (1 - w_i) = (j + 1)/(K + 1), so

  .. math::
    |E_K| \le \max|\delta| + \sum_{j=1}^{K} \frac{j+1}{K+1}\,4uM \approx \max|\delta|
    + 2uMK \quad\text{(worst case, linear in K)}.

  The weight's own rounding is not what grows: it contributes u·w_j·|b_j - s_{j-1}| per step,
  Σ_j u/(j+1)·(j+1)/(K+1)·2M <= 2uM in all. What grows is the rounding of the running value
  itself, each step's u·|s| remembered with weight (j+1)/(K+1). Rounding errors of the
  products and sums at different steps are not correlated the way the EMA's weight bias is (the
  weight changes every step), so the observed error follows the probabilistic estimate
  λ·4uM·sqrt(Σ_j ((j+1)/(K+1))²) ≈ λ·4uM·sqrt(K/3) (Higham & Mary 2019, as in
  `refs.sum_factor`), printed for comparison; the test asserts the worst-case bound, which
  holds for any rounding.

Each test prints the observed maximum error at K = 10^3, 10^4, 10^5 and the bounds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from tests import refs

K = 100_000
F = 4  # features
CHECKPOINTS = (1_000, 10_000, K)
RECORD: dict[str, list[tuple[int, float, float]]] = {}


def _batches(seed, offset, spread):
  rng = np.random.RandomState(seed)
  mean = (offset + spread * rng.randn(K, F)).astype(np.float32)
  var = (spread ** 2 * rng.uniform(0.5, 2.0, (K, F))).astype(np.float32)
  return mean, var


@functools.partial(jax.jit, static_argnames="momentum")
def _run(count, mean, var, momentum):
  def step(state, batch):
    state = jn.update_running_stats(state, jn.Moments(*batch), momentum=momentum)
    return state, (state.mean, state.var)
  _, (means, variances) = jax.lax.scan(step, jn.batch_norm_init(F), (count, mean, var))
  return means, variances


@functools.partial(jax.jit, static_argnames="momentum")
def _run_bfloat16(x, momentum):
  """Moments of bfloat16 batches (16 examples each) inside the scan, then the update."""
  def step(state, xb):
    state = jn.update_running_stats(state, jn.moments(xb, 0), momentum=momentum)
    return state, (state.mean, state.var)
  _, (means, variances) = jax.lax.scan(step, jn.batch_norm_init(F), x)
  return means, variances


def _ema_f64(batch, momentum, start):
  """s_k = m s_{k-1} + (1 - m) b_k in float64 (a first-order linear filter, exact recurrence)."""
  from scipy.signal import lfilter  # scipy: a dependency of jax itself
  b = refs.f64(batch)
  zi = momentum * np.full((1, F), start)  # the state before the first step
  return lfilter([1 - momentum], [1, -momentum], b, axis=0, zi=zi)[0]


def _cumulative_f64(batch):
  b = refs.f64(batch)
  return np.cumsum(b, 0) / np.arange(1, len(b) + 1)[:, None]


def _worst_case(momentum, m_abs, batch_err):
  if momentum is None:
    k = np.arange(1, K + 1)[:, None]
    return batch_err + 4 * refs.U32 * m_abs * (k + 2) / 2  # Σ_{j<=k} (j+1)/(k+1) = (k+2)/2
  return batch_err + 4 * refs.U32 * m_abs / (1 - momentum)


def _estimate(momentum, m_abs):
  """The probabilistic estimate (λ = refs.LAMBDA) of the accumulated rounding, for the record."""
  if momentum is None:
    return refs.LAMBDA * 4 * refs.U32 * m_abs * np.sqrt(K / 3)
  return refs.LAMBDA * 4 * refs.U32 * m_abs / np.sqrt(1 - momentum ** 2)


def _check(name, got, want, momentum, m_abs, batch_err):
  err = np.abs(refs.f64(got) - want)
  bound = np.broadcast_to(_worst_case(momentum, m_abs, batch_err), err.shape)
  refs.assert_within(got, want, bound, name)
  rows = [(k, float(err[:k].max()), float(bound[k - 1].max())) for k in CHECKPOINTS]
  RECORD[name] = rows  # (K, max error over the first K steps, bound at step K)
  print(f"\n{name}: estimate {_estimate(momentum, m_abs):.3g}; "
        + "; ".join(f"K={k}: max error {e:.3g} (bound {b:.3g})" for k, e, b in rows))


@pytest.mark.parametrize("momentum", [0.99, 0.9999, None], ids=["0.99", "0.9999", "cumulative"])
def test_float32_running_statistics_after_1e5_updates(momentum):
  mean, var = _batches(0, offset=3.0, spread=1.0)
  count = np.full((K, F), 16.0, np.float32)
  got_mean, got_var = _run(count, mean, var, momentum)
  if momentum is None:
    want_mean, want_var = _cumulative_f64(mean), _cumulative_f64(var)
  else:
    want_mean, want_var = _ema_f64(mean, momentum, 0.0), _ema_f64(var, momentum, 1.0)
  m_mean = max(np.abs(mean).max(), 1.0)
  m_var = max(np.abs(var).max(), 1.0)
  _check(f"mean, momentum={momentum}", got_mean, want_mean, momentum, m_mean, 0.0)
  _check(f"var, momentum={momentum}", got_var, want_var, momentum, m_var, 0.0)


@pytest.mark.parametrize("momentum", [0.99, None], ids=["0.99", "cumulative"])
def test_running_statistics_of_bfloat16_batches(momentum):
  rng = np.random.RandomState(1)
  x = jnp.asarray((2.0 + rng.randn(K, 16, F)).astype(np.float32), jnp.bfloat16)
  got_mean, got_var = _run_bfloat16(x, momentum)
  x64 = refs.f64(x.astype(jnp.float32))
  b_mean = x64.mean(1)
  b_var = ((x64 - b_mean[:, None]) ** 2).mean(1)
  # each batch's float32 moments of the exact bfloat16 values (refs.mean_error / var_error
  # over the 16 examples, vectorized here over the 10^5 batches)
  c16 = refs.sum_factor(16)
  mean_err = c16 * np.abs(x64).mean(1) + refs.U32 * np.abs(b_mean)
  var_err = mean_err ** 2 + (c16 + 4 * refs.U32) * (b_var + mean_err ** 2)
  if momentum is None:
    want_mean, want_var = _cumulative_f64(b_mean), _cumulative_f64(b_var)
  else:
    want_mean, want_var = _ema_f64(b_mean, momentum, 0.0), _ema_f64(b_var, momentum, 1.0)
  _check(f"bfloat16 batches: mean, momentum={momentum}", got_mean, want_mean, momentum,
         max(np.abs(b_mean).max(), 1.0), mean_err.max(0))
  _check(f"bfloat16 batches: var, momentum={momentum}", got_var, want_var, momentum,
         max(np.abs(b_var).max(), 1.0), var_err.max(0))
