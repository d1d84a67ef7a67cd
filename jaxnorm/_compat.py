"""Every spelling of JAX, Pallas and flax that differs across the releases jaxnorm supports.

jaxnorm declares `jax>=0.6.0` (and flax 0.11.2 or later with it, pyproject.toml). Where an API
was added, moved or renamed since the floor, the rest of the package calls the one name here,
and each comment names the release where the spelling changed, so that the shim goes when the
floor rises past it. A feature that no spelling gives on an old JAX raises here, naming the JAX
it needs. Differences are found by presence of the new name, not by version numbers, so a
release that back-ports a name takes the new path.

This module imports nothing from jaxnorm, and no flax: the flax lines read an object flax made.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from typing import Any

import jax

# `jax.export` is an attribute of `jax` after a bare `import jax` only from JAX 0.8.0; before it
# the module is imported by name, and it imports absl, which those releases do not require:
# without absl-py there is no `jax.export` to register jaxnorm's types with (None then).
try:
  from jax import export as export
except ImportError:  # pragma: no cover - JAX < 0.8 without absl-py
  export = None  # type: ignore[assignment]


def version(text: str) -> tuple[int, ...]:
  """`(major, minor, patch)` of a version string such as "0.6.0", "0.12.8" or "0.7.0.dev1"."""
  return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


JAX_VERSION = version(jax.__version__)


@functools.cache
def flax_version() -> tuple[int, ...] | None:
  """The installed flax's version, or None without flax (read from its metadata: importing
  flax here would make `import jaxnorm` import it)."""
  try:
    return version(importlib.metadata.version("flax"))
  except importlib.metadata.PackageNotFoundError:
    return None


def installed(package: str) -> str:
  """The installed version of `package`, for messages ("not installed" without it)."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "(not installed)"


def needs_jax(feature: str, release: str) -> RuntimeError:
  """The error for a feature that the installed JAX lacks in any spelling."""
  return RuntimeError(
      f"{feature} needs JAX {release} or later; this is JAX {jax.__version__}. Upgrade with "
      f"pip install -U 'jax>={release}' (jaxlib moves with it).")


# JAX 0.7.2's `platform_dependent` lowers only the branch of the platform compiled for; JAX 0.6
# lowers every branch for every platform (XLA drops the others when it compiles), so a Pallas
# kernel, whose lowering exists on its own platform only, fails to lower elsewhere.
PRUNES_PLATFORM_BRANCHES = JAX_VERSION >= (0, 7, 2)


def check_pallas() -> None:
  """Raises where the installed JAX cannot hold the Pallas kernels in a per-platform program.

  From JAX 0.7.2 the kernels' Pallas spellings are the current ones (`CompilerParams` since
  0.6.2, `plgpu.load`/`store` since 0.7.1), so `_pallas` needs no shim of its own."""
  if not PRUNES_PLATFORM_BRANCHES:
    raise needs_jax("implementation='pallas' (a Pallas kernel per platform in one program)",
                    "0.7.2")


def axis_size(name: Any) -> Any:
  """The size of the named axis `name`; a NameError where no enclosing transform binds it."""
  if hasattr(jax.lax, "axis_size"):  # JAX 0.6.1
    return jax.lax.axis_size(name)
  return jax.lax.psum(1, name)  # a constant: the size, with no collective


# What JAX raises for a collective over a `jax.vmap` axis inside `jax.shard_map` with its checks
# on: an AssertionError or a ValueError about varying axes (`check_vma`, JAX 0.6.1 on), a
# KeyError naming the axis (`check_rep`, JAX 0.6.0).
VMAP_AXIS_IN_SHARD_MAP_ERRORS = (AssertionError, ValueError, KeyError)


def varying_axes(aval: Any) -> frozenset:
  """The mesh axes over which a value of type `aval` varies inside `jax.shard_map`."""
  # JAX 0.10.0 renamed `aval.vma` to `aval.manual_axis_type.varying`; before 0.6.1 neither
  # exists (shard_map tracks no varying axes in types), so nothing varies.
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def pcast_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """`x` typed as varying over the mesh axes `axes` too (no data moves)."""
  if hasattr(jax.lax, "pcast"):  # JAX 0.8.2
    return jax.lax.pcast(x, axes, to="varying")
  if hasattr(jax.lax, "pvary"):  # JAX 0.6.1 to 0.8.1 (deprecated from 0.8.2)
    return jax.lax.pvary(x, axes)
  raise needs_jax("Varying-axes types under jax.shard_map (jax.lax.pvary)", "0.6.1")


def can_update(variable: Any) -> bool:
  """Whether a flax.nnx `Variable` is backed by an array ref (flax then stops the gradient of
  its updates)."""
  # flax 0.12.1 added `Variable._can_update`; flax 0.11 and 0.12.0 call it `has_ref`.
  if hasattr(variable, "_can_update"):
    return bool(variable._can_update)
  return bool(variable.has_ref)


def nnx_promote_dtype(layer: Any) -> Any:
  """A flax.nnx normalization layer's input promotion, or None where its flax has none."""
  # flax 0.12.0 added `promote_dtype` to nnx's layers (the input and parameters cast to
  # `dtype`); flax 0.11's layers cast nothing (`_dtypes.flax_promote` says what follows).
  return getattr(layer, "promote_dtype", None)


def flax_has_view() -> bool:
  """Whether the installed flax has `nnx.view` (flax 0.12.4); before it, `nnx.Module.train()`
  and `.eval()` set the mode, or `use_running_average=` at construction or call."""
  v = flax_version()
  return v is not None and v >= (0, 12, 4)
