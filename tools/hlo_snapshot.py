"""Snapshots of jaxnorm's compiled programs, to show that a change leaves them as they were.

    python tools/hlo_snapshot.py save before.json        # on the old commit
    python tools/hlo_snapshot.py save after.json         # on the new one
    python tools/hlo_snapshot.py compare before.json after.json

`save` compiles, for XLA:CPU, every jaxnorm case of `benchmarks/run.py` (each normalizer,
forward and forward+backward, at every shape and dtype of its full configuration, built by
`benchmarks/cases.py`, the registry that run.py and compiled.py share) and a set of
configurations the benchmark does not reach (masks, ghost batches, batch renormalization,
complex input, per-example parameters, `shard_map` across devices, the flax and equinox
wrappers), and stores each optimized HLO module with its metadata stripped (source lines and
op names differ whenever code moves, the program does not). Nothing is executed: the inputs are
abstract (`jax.ShapeDtypeStruct`). `compare` prints the cases whose programs differ, with a
unified diff of the first few, and exits 1 if any does.

With `--pallas-cuda` (in an environment with the CUDA plugin, `JAX_PLATFORMS=cpu`), `save`
stores the lowering of the Pallas Triton kernels for an H100 target instead (the StableHLO
with its Triton custom calls, lowered without a GPU).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# This checkout's jaxnorm and benchmarks: a script's own folder heads Python's path, not the
# working directory, so a virtual environment with another checkout installed (editable) would
# otherwise give that checkout's jaxnorm, and `compare` two snapshots of the same code.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cases  # benchmarks/cases.py: the cases that benchmarks/run.py times
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm as jn

_METADATA = re.compile(r",?\s*metadata=\{[^{}]*\}")
_SOURCE = re.compile(r',?\s*(source_file|source_line|op_name|op_type|scheduling_name)="?[^,}"]*"?')


_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def strip(text: str) -> str:
  """The optimized HLO text without metadata (source positions, op names, the stack-frame
  tables that name files and functions)."""
  text = _METADATA.sub("", text)
  text = _SOURCE.sub("", text)
  lines, skipping = [], False
  for line in text.splitlines():
    if line.strip() in _TABLES:
      skipping = True
    elif skipping and not line.strip():
      skipping = False
      continue
    if not skipping:
      lines.append(line.rstrip())
  return "\n".join(lines)


_NAME = re.compile(r"(?<![\w.])(%?[A-Za-z_][\w-]*?)((?:\.\d+)+)(?![\w])")


def canonical(text: str) -> str:
  """`text` with every numbered name (`%fusion.12`, `region_0.7`) renumbered by first
  appearance, so that two programs of the same graph built in another order compare equal."""
  seen: dict[str, str] = {}

  def rename(m: re.Match[str]) -> str:
    name = m.group(0)
    if name not in seen:
      seen[name] = f"{m.group(1)}.#{len(seen)}"
    return seen[name]

  # Names taken from the jitted function's name (the module, some constants' broadcasts).
  text = re.sub(r"^HloModule [^,\s]+", "HloModule m", text)
  text = re.sub(r"\bjit_\w*?(?=[.\s,)])", "jit_", text)
  return _NAME.sub(rename, text)


_COMMUTATIVE = frozenset({"add", "multiply", "maximum", "minimum", "and", "or", "xor"})
# A computation's first line (not indented, unlike its instructions): `[ENTRY] %name (...) {`.
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-#]+)\s.*\{$")
_REF = re.compile(r"%[\w.\-#]+")


def _closing(text: str, start: int) -> int:
  """The index of the parenthesis that closes the one at `text[start]`."""
  depth = 0
  for i in range(start, len(text)):
    depth += text[i] == "("
    depth -= text[i] == ")"
    if depth == 0:
      return i
  raise ValueError(f"unbalanced parentheses in {text!r}")


def _split_instruction(line: str) -> tuple[str, str, str, str, str] | None:
  """`(name, type, opcode, operands, attributes)` of one HLO instruction line."""
  m = re.match(r"^\s*(?:ROOT\s+)?(%[\w.\-#]+)\s*=\s*", line)
  if m is None:
    return None
  rest = line[m.end():]
  # The type: a shape, or a parenthesized tuple of shapes.
  end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.find(" ")
  kind, rest = rest[:end], rest[end + 1:]
  op = re.match(r"([\w\-]+)\(", rest)
  if op is None:
    return None
  start = op.end() - 1
  close = _closing(rest, start)
  return m.group(1), kind, op.group(1), rest[start + 1:close], rest[close + 1:]


def graph(text: str) -> str:
  """A digest of the program's dataflow graph that ignores every name and the operand order
  of commutative operations, and sees through fusions' parameter numbering: two programs
  that compute the same values by the same operations, kernels and attributes have equal
  digests, whatever order their source was traced in."""
  comps: dict[str, list[tuple[str, str, str, str, str, bool]]] = {}
  entry, current = "", None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
      continue
    parts = _split_instruction(line) if current is not None else None
    if parts:
      comps[current].append((*parts, line.lstrip().startswith("ROOT")))
  memo: dict[tuple[str, tuple[str, ...]], str] = {}

  def digest(name: str, params: tuple[str, ...]) -> str:
    key = (name, params)
    if key in memo:
      return memo[key]
    values: dict[str, str] = {}
    root = ""
    for iname, kind, opcode, operands, attrs, is_root in comps[name]:
      refs = _REF.findall(operands)
      if opcode == "parameter":
        index = int(operands.strip())
        h = params[index] if index < len(params) else f"param{index}:{kind}"
      else:
        args = [values.get(r, r) for r in refs] if refs else [operands]
        if opcode in _COMMUTATIVE:
          args = sorted(args)
        called = [c.lstrip("%") for c in _REF.findall(attrs)]
        inner = tuple(values.get(r, r) for r in refs)
        subs = [digest(c, inner if opcode == "fusion" else ()) for c in called if c in comps]
        attrs_plain = _REF.sub("%", attrs)
        h = hashlib.sha1(repr((kind, opcode, args, subs, attrs_plain)).encode()).hexdigest()
      values[iname] = h
      if is_root:
        root = h
    memo[key] = root
    return root

  return digest(entry, ()) if entry else ""


def _spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def _fwd_bwd(fn: Callable[..., Any]) -> Callable[..., Any]:
  # `(y, grads, aux)`, not `cases.with_pass`'s `(y, aux, grads)`: the saved programs' outputs
  # keep their order, so that snapshots taken before and after a change compare.
  def f(p, x, dy):
    y, pullback, aux = jax.vjp(fn, p, x, has_aux=True)
    return y, pullback(dy), aux
  return f


def _cases_benchmark() -> Iterator[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
  """benchmarks/run.py's jaxnorm cases (full configuration), forward and forward+backward."""
  for shape, dtype in cases.TIMED_CONFIGS["full"]:
    for norm in cases.NORMS:
      built = cases.build("jaxnorm", norm, shape, dtype, cases.TIMED)
      if built is None:
        continue
      fn, params = built
      p = jax.tree.map(lambda a: _spec(a.shape, a.dtype), params)
      x = _spec(shape, dtype)
      label = f"{norm}/{'x'.join(map(str, shape))}/{dtype}"
      yield f"{label}/fwd", fn, (p, x)
      yield f"{label}/fwd_bwd", _fwd_bwd(fn), (p, x, x)


def _cases_features() -> Iterator[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
  """Configurations the benchmark does not reach, each forward+backward (and forward)."""
  shape, c = (64, 8, 32), 32
  state = jn.BatchNormState(jnp.zeros(c), jnp.ones(c), jnp.zeros((), jnp.int32))
  p = {"scale": _spec((c,), jnp.float32), "bias": _spec((c,), jnp.float32)}
  mask = np.arange(64)[:, None, None] < 40

  def case(name, fn, dtype="float32", params=p, xshape=shape):
    x = _spec(xshape, dtype)

    def f(p, x):
      out = fn(p, x)
      return (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
    yield f"{name}/{dtype}/fwd", f, (params, x)
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating):
      yield f"{name}/{dtype}/fwd_bwd", _fwd_bwd(f), (params, x, x)

  def bn(**kw):
    return lambda p, x: jn.batch_norm(x, state, p["scale"], p["bias"], training=True, **kw)

  for dtype in ("float32", "bfloat16"):
    yield from case("layer_norm_mask", lambda p, x: jn.layer_norm(
        x, p["scale"], p["bias"], mask=mask), dtype)
    yield from case("layer_norm_axes01", lambda p, x: jn.layer_norm(
        x, reduction_axes=(1, 2), feature_axes=(1, 2)), dtype, params={})
    yield from case("rms_norm_zero_centered", lambda p, x: jn.rms_norm(
        x, p["scale"], zero_centered_scale=True), dtype)
    yield from case("batch_norm_mask", bn(mask=mask), dtype)
    yield from case("batch_norm_ghost", bn(virtual_batch_size=16), dtype)
    yield from case("batch_norm_cumulative_unbiased", bn(momentum=None,
                                                         unbiased_running_var=True), dtype)
    yield from case("batch_renorm", lambda p, x: jn.batch_renorm(
        x, state, p["scale"], p["bias"], training=True, r_max=3.0, d_max=5.0), dtype)
    yield from case("batch_norm_eval", lambda p, x: jn.batch_norm(
        x, state, p["scale"], p["bias"], training=False), dtype)
    yield from case("normalize", lambda p, x: jn.normalize(
        x, jnp.full((c,), 0.5), jnp.full((c,), 2.0), p["scale"], p["bias"],
        reduction_axes=(0, 1), epsilon=1e-5), dtype)
    yield from case("group_norm_rank2", lambda p, x: jn.group_norm(
        x, p["scale"], p["bias"], num_groups=4), dtype, xshape=(64, c))
    yield from case("group_norm_mask", lambda p, x: jn.group_norm(
        x, p["scale"], p["bias"], num_groups=4, mask=mask), dtype)
    yield from case("instance_norm", lambda p, x: jn.instance_norm(
        x, p["scale"], p["bias"]), dtype)
    per_example = {"scale": _spec((64, 1, c), jnp.float32), "bias": _spec((64, 1, c),
                                                                           jnp.float32)}
    yield from case("layer_norm_per_example", lambda p, x: jn.layer_norm(
        x, p["scale"], p["bias"]), dtype, params=per_example)
    yield f"moments/{dtype}/fwd", lambda x: jn.moments(x, (0, 1), mask=mask), (
        _spec(shape, dtype),)
  cstate = jn.BatchNormState(jnp.zeros(c, jnp.complex64), jnp.ones(c), jnp.zeros((),
                                                                              jnp.int32))
  yield from case("batch_norm_complex", lambda p, x: jn.batch_norm(
      x, cstate, p["scale"], p["bias"], training=True), "complex64")
  yield from case("layer_norm_complex", lambda p, x: jn.layer_norm(x, p["scale"]), "complex64")


def _cases_devices() -> Iterator[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
  """Batch norm and layer norm across 8 devices: shard_map with axis_name, and sharded jit."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  c = 32
  state = jn.BatchNormState(jnp.zeros(c), jnp.ones(c), jnp.zeros((), jnp.int32))
  mask = np.arange(64)[:, None] < 37

  def local(x, m):
    return jn.batch_norm(x, state, training=True, mask=m, axis_name="data")

  sm = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P("data"), P()))
  x = _spec((64, c), jnp.float32)
  m = jax.ShapeDtypeStruct((64, c), jnp.bool_)
  yield "shard_map_batch_norm/fwd", lambda x, m: sm(x, m), (x, m)
  yield "shard_map_batch_norm/fwd_bwd", (
      lambda x, m, dy: jax.vjp(lambda x: sm(x, m)[0], x)[1](dy)), (x, m, x)
  xs = jax.ShapeDtypeStruct((64, c), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  yield "sharded_jit_batch_norm/fwd", lambda x: jn.batch_norm(
      x, state, training=True, mask=jnp.asarray(mask)), (xs,)
  yield "pmap_style_vmap_layer_norm/fwd", jax.vmap(
      lambda x: jn.layer_norm(x, axis_name="i", reduction_axes=0, feature_axes=0),
      axis_name="i"), (_spec((8, 16), jnp.float32),)


def _cases_wrappers() -> Iterator[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
  """The flax.linen, flax.nnx and equinox layers, forward and forward+backward."""
  from flax import linen as nn
  from flax import nnx

  import jaxnorm.equinox as jne
  import jaxnorm.linen as jnn
  import jaxnorm.nnx as jnnx

  x32 = jnp.zeros((16, 8, 24), jnp.float32)
  for name, mod in (("linen_batch_norm", jnn.BatchNorm(use_running_average=False)),
                    ("linen_layer_norm", jnn.LayerNorm()),
                    ("linen_rms_norm", jnn.RMSNorm()),
                    ("linen_group_norm", jnn.GroupNorm(num_groups=4))):
    variables = jax.eval_shape(lambda m=mod: m.init(jax.random.key(0), x32))
    for dtype in ("float32", "bfloat16"):
      def f(v, x, mod=mod):
        return mod.apply(v, x, mutable=["batch_stats"])
      yield f"{name}/{dtype}/fwd", f, (variables, _spec(x32.shape, dtype))
  for name, make in (("nnx_batch_norm", lambda: jnnx.BatchNorm(24, rngs=nnx.Rngs(0))),
                     ("nnx_layer_norm", lambda: jnnx.LayerNorm(24, rngs=nnx.Rngs(0)))):
    graphdef, state = nnx.split(make())
    sstate = jax.tree.map(lambda a: _spec(a.shape, a.dtype), state)

    def g(s, x, graphdef=graphdef):
      m = nnx.merge(graphdef, s)
      y = m(x)
      return y, nnx.state(m)
    yield f"{name}/float32/fwd", g, (sstate, _spec(x32.shape, "float32"))
  import equinox as eqx

  del nn
  bn, bstate = eqx.nn.make_with_state(jne.BatchNorm)(24, "batch", mode="batch")
  step = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  yield "equinox_batch_norm/float32/fwd", lambda x, s: step(x, s), (
      _spec((16, 24, 8), "float32"), bstate)
  for name, layer, xs in (("equinox_group_norm", jne.GroupNorm(4, 24), (16, 24, 8)),
                          ("equinox_rms_norm", jne.RMSNorm(24), (16, 24)),
                          ("equinox_layer_norm", jne.LayerNorm(24), (16, 24))):
    yield f"{name}/float32/fwd", lambda x, layer=layer: jax.vmap(layer)(x), (
        _spec(xs, "float32"),)
    yield f"{name}/float32/fwd_bwd", (lambda x, dy, layer=layer: jax.vjp(
        jax.vmap(layer), x)[1](dy)), (_spec(xs, "float32"), _spec(xs, "float32"))


def _cases_pallas() -> Iterator[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
  for norm in cases.PALLAS_NORMS:
    for dtype in cases.DTYPES:
      f = getattr(jn, norm)
      p = {"scale": _spec((1024,), jnp.float32)}
      fn = lambda p, x, f=f: (f(x, p["scale"], implementation="pallas"), None)
      x = _spec((4096, 1024), dtype)
      yield f"pallas_{norm}/{dtype}/fwd", fn, (p, x)
      yield f"pallas_{norm}/{dtype}/fwd_bwd", _fwd_bwd(fn), (p, x, x)


def save(path: str, pallas_cuda: bool = False) -> None:
  out: dict[str, str] = {}
  if pallas_cuda:
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    config = pathlib.Path(__file__).parent.parent.joinpath("benchmarks",
                                                           "h100_sxm.txtpb").read_text()
    topo = topologies.get_topology_desc(platform="cuda", target_config=config,
                                        topology="1x1x1")
    device = topo.devices[0]
    for name, fn, args in _cases_pallas():
      args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
          s.shape, s.dtype, sharding=SingleDeviceSharding(device)), args)
      out[name] = strip(jax.jit(fn).lower(*args).as_text())
      print(name, flush=True)
  else:
    groups = (_cases_benchmark(), _cases_features(), _cases_devices(), _cases_wrappers(),
              _cases_pallas())
    for group in groups:
      for name, fn, args in group:
        out[name] = strip(jax.jit(fn).lower(*args).compile().as_text())
        print(name, flush=True)
  pathlib.Path(path).write_text(json.dumps(out, indent=0, sort_keys=True))
  print(f"{len(out)} programs of {os.path.dirname(jn.__file__)} written to {path}")


def compare(a_path: str, b_path: str, show: int = 3) -> int:
  a, b = ({k: canonical(strip(v)) for k, v in json.loads(pathlib.Path(p).read_text()).items()}
          for p in (a_path, b_path))
  only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
  # Programs whose texts differ only in names and in the operand order of commutative
  # operations: the same graph, traced in another order.
  renamed = [k for k in differ if graph(a[k]) == graph(b[k])]
  differ = [k for k in differ if k not in renamed]
  same = len(set(a) & set(b)) - len(differ) - len(renamed)
  print(f"{same} programs identical, {len(renamed)} the same graph with other names or "
        f"commutative operands swapped, {len(differ)} differ, {len(only_a)} only in {a_path}, "
        f"{len(only_b)} only in {b_path}")
  for k in only_a + only_b:
    print("  missing on one side:", k)
  for k in differ:
    print("  differs:", k)
  for k in differ[:show]:
    sys.stdout.writelines(difflib.unified_diff(
        a[k].splitlines(True), b[k].splitlines(True), f"{a_path}:{k}", f"{b_path}:{k}", n=2))
  return 1 if differ or only_a or only_b else 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("save")
  s.add_argument("path")
  s.add_argument("--pallas-cuda", action="store_true")
  c = sub.add_parser("compare")
  c.add_argument("a")
  c.add_argument("b")
  args = parser.parse_args(argv)
  if args.cmd == "save":
    save(args.path, args.pallas_cuda)
    return 0
  return compare(args.a, args.b)


if __name__ == "__main__":
  sys.exit(main())
