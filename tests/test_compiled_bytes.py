"""The HBM byte count of benchmarks/compiled.py, and its CI budget file, on the CPU.

The accelerator programs themselves compile only where `jax[tpu]` or the CUDA plugin is
installed (`python benchmarks/compiled.py --check`, see docs/guides/performance.md); this checks
the counting on HLO text of the shapes those compilers print, and on a program XLA:CPU compiles.
"""

# ruff: noqa: E501 (HLO lines as the compilers print them)

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
  path = ROOT / "benchmarks" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"jaxnorm_benchmarks_{name}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


hlo_bytes = _load("_hlo_bytes")

# A TPU program as libtpu prints it: x prefetched into VMEM (S(1)) by a copy, in slices, a
# fusion that reads the VMEM copy and writes its result to HBM, and a view of VMEM buffers.
TPU_HLO = """HloModule m

%fused (p: f32[1024,128]) -> f32[1024,128] {
  ROOT %p = f32[1024,128]{1,0} parameter(0)
}

ENTRY %main.1 (x.1: f32[1024,128], s.1: f32[128]) -> (f32[1024,128], f32[1024,128]) {
  %x.1 = f32[1024,128]{1,0:T(8,128)} parameter(0), sharding={replicated}
  %s.1 = f32[128]{0:T(128)} parameter(1)
  %copy-start = (f32[1024,128]{1,0:T(8,128)S(1)}, f32[1024,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%x.1)
  %slice-start = ((f32[1024,128]{1,0:T(8,128)}), f32[512,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%x.1), slice={[0:512], [0:128]}
  %slice-done = f32[512,128]{1,0:T(8,128)S(1)} slice-done(%slice-start)
  %custom-call = f32[1024,128]{1,0:T(8,128)S(1)} custom-call(%slice-done, %slice-done), custom_call_target="ConcatBitcast"
  %copy-done = f32[1024,128]{1,0:T(8,128)S(1)} copy-done(%copy-start)
  %fusion = f32[1024,128]{1,0:T(8,128)} fusion(%copy-done, %s.1), kind=kLoop, calls=%fused
  %fusion.1 = f32[1024,128]{1,0:T(8,128)} fusion(%custom-call), kind=kLoop, calls=%fused
  ROOT %tuple = (f32[1024,128]{1,0:T(8,128)}, f32[1024,128]{1,0:T(8,128)}) tuple(%fusion, %fusion.1)
}
"""


def test_only_device_memory_counts():
  a = hlo_bytes.analyze(TPU_HLO)
  x = 1024 * 128 * 4
  # The copy reads x from HBM (its VMEM write is on chip), the slice half of x; each fusion
  # writes one x-sized result to HBM and reads the scale (128 floats) or nothing from HBM.
  assert a["bytes"] == x + x // 2 + 2 * x + 128 * 4
  assert a["bytes_any_space"] > a["bytes"]
  assert (a["fusions"], a["custom_calls"], a["kernels"]) == (2, 0, 2)  # ConcatBitcast: a view
  assert a["collectives"] == []


def test_a_fusion_that_slices_an_operand_reads_the_slices():
  # As the H100 compiler prints it: one fusion reads the first row of x only, the other x whole.
  text = """HloModule m

%fused_slice (param_0: f32[8192,1024]) -> f32[1,1024] {
  %param_0 = f32[8192,1024]{1,0} parameter(0)
  ROOT %slice.1 = f32[1,1024]{1,0} slice(%param_0), slice={[0:1], [0:1024]}
}

%fused_reduce (param_0.1: f32[8192,1024], param_1: f32[1,1024]) -> f32[1024] {
  %param_0.1 = f32[8192,1024]{1,0} parameter(0)
  %slice.2 = f32[1,1024]{1,0} slice(%param_0.1), slice={[0:1], [0:1024]}
  %param_1 = f32[1,1024]{1,0} parameter(1)
  %sub = f32[1,1024]{1,0} subtract(%slice.2, %param_1)
  %c = f32[] constant(0)
  ROOT %r = f32[1024]{0} reduce(%param_0.1, %c), dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[8192,1024]) -> f32[1024] {
  %x = f32[8192,1024]{1,0} parameter(0)
  %wrapped_slice = f32[1,1024]{1,0} fusion(%x), kind=kLoop, calls=%fused_slice
  ROOT %input_reduce_fusion = f32[1024]{0} fusion(%x, %wrapped_slice), kind=kInput, calls=%fused_reduce
}
"""
  a = hlo_bytes.analyze(text)
  row = 1024 * 4
  # The slicing fusion reads and writes one row; the reduction reads x (used whole, not only
  # sliced), the row, and writes its result.
  assert a["bytes"] == 2 * row + (8192 * row + row + row)
  assert a["kernels"] == 2


def test_a_slice_reads_the_part_it_writes():
  # As libtpu prints it: three columns of x, sliced by an instruction of its own (in HBM), then
  # copied on chip; the slice reads three columns, not x.
  text = """HloModule m

ENTRY %main (x: f32[16384,4096]) -> f32[16384,3] {
  %x = f32[16384,4096]{1,0:T(8,128)} parameter(0)
  %slice.0 = f32[16384,3]{1,0:T(8,128)} slice(%x), slice={[0:16384], [0:3]}
  ROOT %copy.1 = f32[16384,3]{0,1:T(4,128)S(1)} copy(%slice.0)
}
"""
  a = hlo_bytes.analyze(text)
  part = 16384 * 3 * 4
  assert a["bytes"] == 2 * part + part  # the slice's read and write, the copy's read
  assert a["other_ops"] == ["slice", "copy"] and a["kernels"] == 0


def test_custom_calls_count_their_operands_and_results():
  text = """HloModule m

ENTRY %main (x: bf16[64,256]) -> bf16[64,256] {
  %x = bf16[64,256]{1,0} parameter(0)
  %pallas_call = (bf16[64,256]{1,0}, f32[64]{0}) custom-call(%x), custom_call_target="__gpu$xla.gpu.triton"
  %all-reduce-start = f32[64]{0} all-reduce-start(%pallas_call), replica_groups={}, to_apply=%add
  %all-reduce-done = f32[64]{0} all-reduce-done(%all-reduce-start)
  ROOT %gte = bf16[64,256]{1,0} get-tuple-element(%pallas_call), index=0
}
"""
  a = hlo_bytes.analyze(text)
  # The kernel reads x and writes y and the row statistics; the tuple operand of the
  # all-reduce counts whole (this parser does not follow get-tuple-element).
  x, out = 64 * 256 * 2, 64 * 256 * 2 + 64 * 4
  assert a["bytes"] == (x + out) + (out + 64 * 4)
  assert (a["custom_calls"], a["kernels"]) == (1, 1)
  assert [op for op, _ in a["collectives"]] == ["all-reduce-start"]


def test_agrees_with_xla_cost_analysis_on_cpu():
  x = jax.ShapeDtypeStruct((256, 128), jnp.float32)
  compiled = jax.jit(lambda x: jnp.tanh(x) * 2).lower(x).compile()
  a = hlo_bytes.analyze(compiled.as_text())
  assert a["bytes"] == 2 * 256 * 128 * 4  # read x, write y
  cost = compiled.cost_analysis()
  if cost and "bytes accessed" in cost:
    assert a["bytes"] == pytest.approx(cost["bytes accessed"], rel=1e-3)


def test_budget_records_known_excesses_of_the_checked_subset():
  budget = json.loads((ROOT / "benchmarks" / "compiled_budget.json").read_text())
  assert isinstance(budget["known"], list) and "allowance" in budget["about"]
  for entry in budget["known"]:
    platform, norm, shape, dtype, kind, lib = entry["case"].split(" ")
    assert platform in ("h100", "v5e", "v6e") and lib == "jaxnorm", entry
    assert norm in ("layer_norm", "rms_norm", "batch_norm") and shape == "8192x1024", entry
    assert dtype in ("float32", "bfloat16") and kind in ("fwd", "fwd+bwd"), entry
    assert entry["ceiling_passes"] > 0 and len(entry["reason"]) > 40, entry


def test_a_conditional_counts_as_its_branch():
  # XLA keeps a conditional whose branch holds a collective, even with a constant index.
  text = """HloModule m

%branch (p: (f32[256])) -> (f32[256]) {
  %p = (f32[256]{0}) parameter(0)
  %gte = f32[256]{0} get-tuple-element(%p), index=0
  %fusion = f32[256]{0} fusion(%gte), kind=kLoop, calls=%fused
  %all-reduce = f32[256]{0} all-reduce(%fusion), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  ROOT %tuple = (f32[256]{0}) tuple(%all-reduce)
}

ENTRY %main (x: f32[256]) -> (f32[256]) {
  %x = f32[256]{0} parameter(0)
  %constant = s32[] constant(0)
  %tuple = (f32[256]{0}) tuple(%x)
  ROOT %conditional = (f32[256]{0}) conditional(%constant, %tuple), branch_computations={%branch}
}
"""
  a = hlo_bytes.analyze(text)
  assert a["bytes"] == 4 * 256 * 4  # the fusion and the all-reduce each read and write
  assert (a["kernels"], [op for op, _ in a["collectives"]]) == (1, ["all-reduce"])
  assert a["other_ops"] == ["conditional"]
