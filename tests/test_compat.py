"""jaxnorm/_compat.py: the version parse, the errors that name the JAX a feature needs, and the
one spelling of each API whatever JAX runs the tests (the floor run, `-m floor`, runs this file
on the oldest declared JAX)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
from jaxnorm import _compat
from tests import jaxcompat


@pytest.mark.parametrize(("text", "want"), [("0.6.0", (0, 6, 0)), ("0.12.8", (0, 12, 8)),
                                            ("0.7.0.dev20250601", (0, 7, 0)), ("1.0", (1, 0))])
def test_version_reads_major_minor_patch(text, want):
  assert _compat.version(text) == want


def test_the_installed_jax_is_not_older_than_the_declared_floor():
  assert _compat.JAX_VERSION >= (0, 6, 0), jax.__version__


def test_needs_jax_names_the_feature_both_versions_and_the_fix():
  msg = str(_compat.needs_jax("Some feature", "9.9.9"))
  assert "Some feature needs JAX 9.9.9 or later" in msg, msg
  assert f"this is JAX {jax.__version__}" in msg and "pip install -U 'jax>=9.9.9'" in msg, msg


def test_pallas_raises_naming_the_jax_it_needs_exactly_where_branches_are_not_pruned():
  x = jnp.ones((4, 16))
  if _compat.PRUNES_PLATFORM_BRANCHES:
    np.testing.assert_allclose(jn.layer_norm(x, implementation="pallas"), 0.0, atol=1e-6)
  else:
    with pytest.raises(RuntimeError, match=re.escape("needs JAX 0.7.2 or later")):
      jn.layer_norm(x, implementation="pallas")


def test_axis_size_under_vmap_and_a_name_error_where_unbound():
  sizes = jax.vmap(lambda x: x * 0 + _compat.axis_size("b"), axis_name="b")(jnp.zeros(3))
  np.testing.assert_array_equal(sizes, 3)
  with pytest.raises(NameError):
    jax.vmap(lambda x: x * 0 + _compat.axis_size("other"), axis_name="b")(jnp.zeros(3))


def test_pcast_varying_makes_a_replicated_value_varying_under_shard_map():
  mesh = jax.make_mesh((8,), ("r",), axis_types=(jax.sharding.AxisType.Auto,))

  def body(x):
    z = jnp.zeros((1,), x.dtype)
    if _compat.varying_axes(jax.typeof(x)) == {"r"}:  # a JAX whose types track them
      assert not _compat.varying_axes(jax.typeof(z))
      z = _compat.pcast_varying(z, ("r",))
      assert _compat.varying_axes(jax.typeof(z)) == {"r"}
    return z + x[0]

  f = jaxcompat.shard_map(body, mesh=mesh, in_specs=P("r"), out_specs=P("r"))
  np.testing.assert_array_equal(np.asarray(f(jnp.arange(8.0))), np.arange(8.0))


def test_export_serializes_a_function_returning_moments():
  exp = _compat.export.export(jax.jit(lambda x: jn.moments(x, 0)))(jnp.ones((4, 3)))
  back = _compat.export.deserialize(exp.serialize())
  got = back.call(jnp.arange(12.0).reshape(4, 3))
  assert isinstance(got, jn.Moments)
  np.testing.assert_allclose(got.mean, np.arange(12.0).reshape(4, 3).mean(0))


def test_flax_version_matches_the_installed_flax():
  flax = pytest.importorskip("flax")
  assert _compat.flax_version() == _compat.version(flax.__version__)
  assert _compat.flax_has_view() == hasattr(__import__("flax.nnx").nnx, "view")
