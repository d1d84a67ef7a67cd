"""Cross-device statistics: the same numbers under shard_map, pmap, vmap and sharded jit.

Every case splits one axis of a global batch across 8 devices with uneven masks (one device
holds no valid element, and masked positions hold NaN so any leak shows) and compares with a
float64 NumPy reference of the concatenated batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
from tests import jaxcompat, refs

N_DEV = 8
# sharded_jit: plain jax.jit over global arrays, no axis_name; on a mesh of Explicit axes
# (jax.make_mesh's default) and of Auto axes (GSPMD propagation, jax.sharding.Mesh's default).
KINDS = ("shard_map", "pmap", "vmap", "sharded_jit_explicit", "sharded_jit_auto")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "collective_permute",
               "collective_broadcast")


def _mesh(auto: bool = False) -> jax.sharding.Mesh:
  if auto:
    return jax.make_mesh((N_DEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.make_mesh((N_DEV,), ("d",))


def _spec(axis: int | None) -> P:
  return P() if axis is None else P(*([None] * axis + ["d"]))


def _split(a: np.ndarray, axis: int) -> np.ndarray:
  """Global array -> (N_DEV, ...): the device's block of `axis`, device axis first."""
  a = np.asarray(a)
  shape = a.shape[:axis] + (N_DEV, a.shape[axis] // N_DEV) + a.shape[axis + 1:]
  return np.moveaxis(a.reshape(shape), axis, 0)


def _unsplit(a: Any, axis: int) -> np.ndarray:
  a = np.moveaxis(np.asarray(a), 0, axis)
  return a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:])


def _first_replica(tree: Any) -> Any:
  """Per-device copies of a replicated result: checks they are bit-identical, returns one."""
  def one(a):
    a = np.asarray(a)
    for i in range(1, N_DEV):
      np.testing.assert_array_equal(a[i], a[0])
    return a[0]
  return jax.tree.map(one, tree)


def run(kind: str, fn: Callable[..., tuple], args: tuple, in_axes: tuple, out_axes: tuple
        ) -> tuple:
  """Runs `fn(*args, axis_name)` with each arg split along its entry of `in_axes` (None:
  replicated) over 8 devices, in the style `kind`, and returns global results. Each output is
  split along its entry of `out_axes`, or is replicated (None)."""
  if kind == "shard_map":
    mesh = _mesh()
    placed = [jax.device_put(a, NamedSharding(mesh, _spec(ax)))
              for a, ax in zip(args, in_axes, strict=True)]
    f = jaxcompat.shard_map(lambda *a: fn(*a, "d"), mesh=mesh, check_vma=True,
                            in_specs=tuple(_spec(ax) for ax in in_axes),
                            out_specs=tuple(_spec(ax) for ax in out_axes))
    return jax.tree.map(np.asarray, jax.jit(f)(*placed))
  if kind.startswith("sharded_jit"):  # no axis_name: XLA's partitioner inserts collectives
    mesh = _mesh(auto=kind.endswith("auto"))
    placed = [jax.device_put(a, NamedSharding(mesh, _spec(ax)))
              for a, ax in zip(args, in_axes, strict=True)]
    out = jax.jit(lambda *a: fn(*a, None))(*placed)
    # The inputs' sharding carries through to the outputs.
    for o, ax in zip(out, out_axes, strict=True):
      if ax is not None:
        assert len(o.sharding.device_set) == N_DEV
    return jax.tree.map(np.asarray, out)
  split = [a if ax is None else _split(a, ax) for a, ax in zip(args, in_axes, strict=True)]
  vin = tuple(None if ax is None else 0 for ax in in_axes)
  if kind == "pmap":
    out = jax.pmap(lambda *a: fn(*a, "d"), axis_name="d", in_axes=vin)(*split)
  else:
    out = jax.jit(jax.vmap(lambda *a: fn(*a, "d"), axis_name="d", in_axes=vin))(*split)
  return tuple(_first_replica(o) if ax is None else _unsplit(o, ax)
               for o, ax in zip(out, out_axes, strict=True))


def _rows_mask(valid_per_device: list[int], per_device: int) -> np.ndarray:
  """Boolean (N_DEV * per_device,) with the first `valid_per_device[d]` rows of device d."""
  return np.concatenate([np.arange(per_device) < k for k in valid_per_device])


def _poison(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  return np.where(np.broadcast_to(mask, x.shape), x, np.nan).astype(x.dtype)


# Device 0 holds no valid row; the others hold 4, 1, 3, 2, 4, 1, 2 of 4.
VALID = [0, 4, 1, 3, 2, 4, 1, 2]


@pytest.mark.parametrize("kind", KINDS)
def test_moments_are_those_of_the_concatenated_batch(kind):
  rng = np.random.RandomState(0)
  x = (rng.randn(32, 3) * [1.0, 0.5, 2.0] + 1e4).astype(np.float32)
  mask = _rows_mask(VALID, 4)[:, None]
  (m,) = run(kind, lambda x, m, ax: (jn.moments(x, 0, mask=m, axis_name=ax),),
             (_poison(x, mask), mask), (0, 0), (None,))
  n, mean, var = refs.ref_moments(x, 0, mask)
  np.testing.assert_array_equal(m.count, n)
  # The bounds of the concatenated batch: per-device partial sums and their psum are one more
  # summation order of the same 32 terms. A mean of per-device means is off by ~0.3 here.
  refs.assert_within(m.mean, mean, refs.mean_error(x, 0, mask), "mean")
  # At offset 1e4, E[x²] - E[x]² in float32 is off by ~6: only a two-pass variance with the
  # global mean passes this (tests/test_bounds.py checks both mutations fail it).
  refs.assert_within(m.var, var, refs.var_error(x, 0, mask), "var")


@pytest.mark.parametrize("kind", KINDS)
def test_batch_norm_step_is_that_of_the_concatenated_batch(kind):
  rng = np.random.RandomState(1)
  x = (rng.randn(32, 2, 3) * 2.0 + 3.0).astype(np.float32)
  mask = _rows_mask(VALID, 4)[:, None, None]
  scale = np.array([1.0, 2.0, 0.5], np.float32)
  bias = np.array([0.0, -1.0, 3.0], np.float32)
  state = jn.BatchNormState(np.array([1.0, 2.0, 3.0], np.float32),
                            np.array([2.0, 1.0, 0.5], np.float32), np.array(3, np.int32))

  def step(x, m, ax):
    return jn.batch_norm(x, state, scale, bias, training=True, momentum=0.9, mask=m,
                         axis_name=ax)

  y, new = run(kind, step, (_poison(x, mask), mask), (0, 0), (0, None))
  ref_y, _, mean, var = refs.ref_batch_norm_train(x, scale, bias, mask=mask)
  valid = np.broadcast_to(mask, x.shape)
  red = (0, 1)
  bound = refs.norm_bound(x, ref_y, scale, red, -1, 1e-5, mask)
  refs.assert_within(y[valid], ref_y[valid], bound[valid], "y")
  refs.assert_within(new.mean, 0.9 * state.mean + 0.1 * mean,
                     refs.ema_error(0.9, state.mean, mean, refs.mean_error(x, red, mask)), "mean")
  refs.assert_within(new.var, 0.9 * state.var + 0.1 * var,
                     refs.ema_error(0.9, state.var, var, refs.var_error(x, red, mask)), "var")
  assert int(new.count) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_batch_norm_with_no_valid_element_anywhere_keeps_the_state(kind):
  x = np.random.RandomState(2).randn(16, 3).astype(np.float32)
  mask = np.zeros((16, 1), bool)
  state = jn.BatchNormState(np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32),
                            np.array(7, np.int32))
  y, new = run(kind, lambda x, m, ax: jn.batch_norm(x, state, training=True, mask=m,
                                                    axis_name=ax),
               (x, mask), (0, 0), (0, None))
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(new.mean, state.mean)
  np.testing.assert_array_equal(new.var, state.var)
  assert int(new.count) == 7


def _feature_case(norm: str):
  """Tensor parallelism: the feature axis (16 features, 2 per device) is split; rows have
  1 to 14 valid features, so the last device holds none in any row."""
  rng = np.random.RandomState(3)
  x = (rng.randn(4, 16) * 2.0 + 5.0).astype(np.float32)
  mask = np.arange(16)[None, :] < np.array([14, 9, 3, 1])[:, None]
  scale = rng.uniform(0.5, 2.0, 16).astype(np.float32)
  bias = rng.randn(16).astype(np.float32)
  if norm == "layer_norm":
    fn = lambda x, m, s, b, ax: (jn.layer_norm(x, s, b, mask=m, axis_name=ax),)
    ref = refs.ref_layer_norm(x, scale, bias, mask=mask)
    bound = refs.norm_bound(x, ref, scale, mask=mask)
  else:
    fn = lambda x, m, s, b, ax: (jn.rms_norm(x, s, mask=m, axis_name=ax),)
    ref = refs.ref_rms_norm(x, scale, mask=mask)
    bound = refs.norm_bound(x, ref, scale, mask=mask, centered=False)
  return fn, (_poison(x, mask), mask, scale, bias), (1, 1, 0, 0), (1,), ref, bound, mask


def _sequence_case(norm: str):
  """Sequence (spatial) parallelism: the length axis (16 steps, 2 per device) is split and
  sequences have lengths 16 and 5, so devices 3 to 7 hold no valid step of the second."""
  rng = np.random.RandomState(4)
  x = (rng.randn(2, 16, 4) * 3.0 - 2.0).astype(np.float32)
  mask = (np.arange(16)[None, :] < np.array([16, 5])[:, None])[:, :, None]
  scale = rng.uniform(0.5, 2.0, 4).astype(np.float32)
  bias = rng.randn(4).astype(np.float32)
  if norm == "group_norm":
    fn = lambda x, m, s, b, ax: (jn.group_norm(x, s, b, num_groups=2, mask=m, axis_name=ax),)
    ref = refs.ref_group_norm(x, 2, scale, bias, mask=mask)
    bound = refs.group_norm_bound(x, ref, 2, scale, mask=mask)
  else:
    fn = lambda x, m, s, b, ax: (jn.instance_norm(x, s, b, mask=m, axis_name=ax),)
    ref = refs.ref_layer_norm(x, scale, bias, reduction_axes=1, feature_axes=-1, mask=mask)
    bound = refs.norm_bound(x, ref, scale, 1, -1, mask=mask)
  return fn, (_poison(x, mask), mask, scale, bias), (1, 1, None, None), (1,), ref, bound, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm", "group_norm", "instance_norm"])
def test_normalizers_over_a_split_axis_equal_the_unsplit_result(norm, kind):
  case = _feature_case if norm in ("layer_norm", "rms_norm") else _sequence_case
  fn, args, in_axes, out_axes, ref, bound, mask = case(norm)
  (y,) = run(kind, fn, args, in_axes, out_axes)
  valid = np.broadcast_to(mask, y.shape)
  refs.assert_within(y[valid], ref[valid], bound[valid], "split")
  # The unsplit call on one device gives the same numbers to float32 rounding (both within
  # the bound of the reference).
  (y1,) = fn(*(jnp.asarray(a) for a in args), None)
  refs.assert_within(y[valid], np.asarray(y1)[valid], 2 * bound[valid], "split vs unsplit")


def test_a_tuple_of_axis_names_reduces_over_both_and_one_name_over_its_groups():
  mesh = jax.make_mesh((2, 4), ("g", "r"))
  x = (np.random.RandomState(5).randn(32, 3) + 1e4).astype(np.float32)
  mask = _rows_mask(VALID, 4)[:, None]
  spec = P(("g", "r"))
  placed = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (_poison(x, mask), mask)]

  def f(x, m):
    both = jn.moments(x, 0, mask=m, axis_name=("g", "r"))
    inner = jn.moments(x, 0, mask=m, axis_name="r")  # one group per value of 'g'
    return both, jax.tree.map(lambda a: a[None], inner)

  both, inner = jax.tree.map(np.asarray, jax.jit(jaxcompat.shard_map(
      f, mesh=mesh, in_specs=(spec, spec), out_specs=(P(), P("g"))))(*placed))
  n, mean, var = refs.ref_moments(x, 0, mask)
  np.testing.assert_array_equal(both.count, n)
  refs.assert_within(both.mean, mean, refs.mean_error(x, 0, mask), "mean")
  refs.assert_within(both.var, var, refs.var_error(x, 0, mask), "var")
  # The same groups through axis_index_groups under pmap, and in float64.
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  pm = jax.pmap(lambda x, m: jn.moments(x, 0, mask=m, axis_name="d", axis_index_groups=groups),
                axis_name="d")(_split(_poison(x, mask), 0), _split(mask, 0))
  for g in range(2):
    rows = slice(16 * g, 16 * (g + 1))
    n, mean, var = refs.ref_moments(x[rows], 0, mask[rows])
    mean_err = refs.mean_error(x[rows], 0, mask[rows])
    var_err = refs.var_error(x[rows], 0, mask[rows])
    np.testing.assert_array_equal(inner.count[g], n)
    refs.assert_within(inner.mean[g], mean, mean_err, "mean")
    refs.assert_within(inner.var[g], var, var_err, "var")
    for d in groups[g]:
      np.testing.assert_array_equal(pm.count[d], n)
      refs.assert_within(pm.mean[d], mean, mean_err, "pmap mean")
      refs.assert_within(pm.var[d], var, var_err, "pmap var")


@pytest.mark.parametrize("kind", ["shard_map", "vmap"])
def test_axis_index_groups_outside_pmap_raises_naming_the_alternative(kind):
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  fn = lambda x, ax: (jn.moments(x, 0, axis_name=ax, axis_index_groups=groups),)
  x = np.ones((16, 3), np.float32)
  with pytest.raises(NotImplementedError, match=r"axis_index_groups.*split the mesh axis"):
    run(kind, fn, (x,), (0,), (None,))


def _count_collectives(text: str) -> dict[str, int]:
  return {c: len(re.findall(rf"\b{c}\b", text)) for c in COLLECTIVES}


def _compiled_collectives(text: str) -> int:
  return len(re.findall(r"\s(?:all-reduce|all-gather|reduce-scatter|all-to-all|"
                        r"collective-permute)(?:-start)?\(", text))


CASES = {
    # name: (function of (x, mask, axis_name), out_specs, all-reduces expected per call).
    # out_specs=P() with check_vma=True: the statistics are known to be replicated.
    "moments": (lambda x, m, ax: jn.moments(x, 0, mask=m, axis_name=ax), P(), 2),
    "batch_norm": (lambda x, m, ax: jn.batch_norm(x, jn.batch_norm_init(3), training=True,
                                                  mask=m, axis_name=ax), (P("d"), P()), 2),
    "layer_norm": (lambda x, m, ax: jn.layer_norm(x, reduction_axes=0, mask=m, axis_name=ax),
                   P("d"), 2),
    "rms_norm": (lambda x, m, ax: jn.rms_norm(x, reduction_axes=0, mask=m, axis_name=ax),
                 P("d"), 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_reduction_costs_at_most_two_all_reduces_and_nothing_else(case):
  fn, out_specs, expected = CASES[case]
  x = np.ones((16, 3), np.float32)
  mask = np.ones((16, 1), bool)
  mesh = _mesh()
  sm = jax.jit(jaxcompat.shard_map(lambda x, m: fn(x, m, "d"), mesh=mesh,
                                   in_specs=(P("d"), P("d")), out_specs=out_specs,
                                   check_vma=True))
  pm = jax.pmap(lambda x, m: fn(x, m, "d"), axis_name="d")
  placed = [jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, mask)]
  with jaxcompat.one_platform_lowering():
    lowerings = (sm.lower(*placed), pm.lower(_split(x, 0), _split(mask, 0)))
  for lowered in lowerings:
    counts = _count_collectives(lowered.as_text())
    assert counts == {**dict.fromkeys(COLLECTIVES, 0), "all_reduce": expected}, counts
    assert 1 <= _compiled_collectives(lowered.compile().as_text()) <= expected
  # Plain jit over the sharded arrays, no axis_name: XLA's partitioner inserts the collectives,
  # and the count's all-reduce can merge with the sum's (an int32 count could not).
  with jaxcompat.one_platform_lowering():
    sj = jax.jit(lambda x, m: fn(x, m, None)).lower(*placed).compile().as_text()
  # (JAX 0.6's XLA partitioner inserts one all-reduce more: jaxcompat.PARTITIONER_EXTRA.)
  assert 1 <= _compiled_collectives(sj) <= expected + jaxcompat.PARTITIONER_EXTRA


# --- axis names that are not bound, and a jax.vmap axis inside jax.shard_map (issue 33) ------


def _mapped(kind: str, f: Callable[[jax.Array], Any]) -> Callable[[], Any]:
  """`f` on a (16, 4) batch split over the 8 devices (mesh or pmap axis 'data'), or over a
  jax.vmap axis 'data' of 8."""
  x = np.arange(64, dtype=np.float32).reshape(16, 4)
  if kind == "shard_map":
    mesh = jax.make_mesh((N_DEV,), ("data",))
    g = jaxcompat.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    return lambda: g(jax.device_put(x, NamedSharding(mesh, P("data"))))
  xs = x.reshape(N_DEV, 2, 4)
  if kind == "pmap":
    return lambda: jax.pmap(f, axis_name="data")(xs)
  return lambda: jax.vmap(f, axis_name="data")(xs)


@pytest.mark.parametrize("kind", ["shard_map", "pmap", "vmap"])
@pytest.mark.parametrize("call", ["moments", "batch_norm"])
def test_an_unbound_axis_name_is_named_with_the_axes_that_are_bound(kind, call):
  def f(x):
    if call == "moments":
      return jn.moments(x, 0, axis_name=("data", "batch")).mean[None]
    return jn.batch_norm(x, jn.batch_norm_init(4), training=True, axis_name="batch")[0]
  with pytest.raises(NameError) as info:
    _mapped(kind, f)()
  msg = str(info.value)
  assert re.search(r"axis_name=(\('data', )?'batch'\)?", msg), msg
  assert "'batch' is not bound" in msg, msg
  if kind == "vmap" or (kind == "pmap" and not jaxcompat.pmap_names_mesh_axes()):
    # JAX lists no jax.vmap axis names (nor, before it ran pmap as a shard_map, pmap's); the
    # fix says where names come from.
    assert "mesh axes bound here: none" in msg and "jax.vmap(axis_name=" in msg, msg
  else:
    assert "mesh axes bound here: ('data',)" in msg, msg


@pytest.mark.parametrize("check_vma", [False, True])
def test_a_vmap_axis_inside_shard_map_works_without_check_vma_and_says_so_with_it(check_vma):
  """Per-example code (jax.vmap, axis 'batch') inside jax.shard_map (mesh axis 'data'),
  statistics over both: JAX 0.10 refuses every collective over a jax.vmap axis inside
  shard_map when check_vma is on, so the error must name the ways that work."""
  mesh = jax.make_mesh((N_DEV,), ("data",))
  x = np.random.default_rng(0).normal(3.0, 2.0, (16, 3)).astype(np.float32)
  state = jn.batch_norm_init(3)

  def per_device(xs, s):
    return jax.vmap(lambda xi: jn.batch_norm(xi, s, training=True, axis_name=("data", "batch")),
                    axis_name="batch", out_axes=(0, None))(xs)

  f = jaxcompat.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P()),
                          out_specs=(P("data"), P()), check_vma=check_vma)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  if check_vma:
    with pytest.raises(ValueError, match=r"axis_name=\('data', 'batch'\).*'batch'.*jax\.vmap.*"
                                         r"check_vma=False.*jax\.pmap"):
      f(xs, state)
    return
  y, new = f(xs, state)
  y_ref, _, mean, var = refs.ref_batch_norm_train(x)
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=refs.atol(jnp.float32))
  np.testing.assert_allclose(np.asarray(new.mean), 0.01 * mean, atol=refs.atol(jnp.float32))
  np.testing.assert_allclose(np.asarray(new.var), 0.99 + 0.01 * var, atol=refs.atol(jnp.float32))
