"""What the benchmark scripts share: the allocator restart and interleaved, shuffled timing.

Import it before JAX: `use_allocator_settings()` may re-execute the running script.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping

ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_MARK = "JAXNORM_BENCH_ALLOCATOR"


def use_allocator_settings() -> None:
  """On Linux, re-executes the running script once with glibc told to keep freed memory.

  By default glibc hands each large XLA:CPU buffer back to the kernel when it is freed, so every
  call page-faults its fresh output in again: on a 2-core machine that costs more than a
  normalization itself (LayerNorm forward at 8192x1024 float32: 16 ms instead of 3.4-4.4 ms,
  most of it system time) and makes timings noisy. The restart sets `MALLOC_MMAP_THRESHOLD_`,
  `MALLOC_TRIM_THRESHOLD_` and `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (huge pages), keeping any
  the user set. `--system-malloc` on the command line skips it.
  """
  if sys.platform != "linux" or "--system-malloc" in sys.argv or _MARK in os.environ:
    return
  env = dict(os.environ, **{_MARK: "1"})
  env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**30))
  env.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**32))
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
    env["GLIBC_TUNABLES"] = ":".join([*tunables, "glibc.malloc.hugetlb=1"])
  os.execve(sys.executable, [sys.executable, *sys.argv], env)


def allocator_env() -> dict[str, str]:
  """The allocator variables this process runs with (for the results' metadata)."""
  return {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}


def per_call(fn: Callable, args: tuple, inner: int) -> float:
  """Seconds per call of `fn(*args)`, over `inner` calls dispatched back to back."""
  import jax

  t0 = time.perf_counter()
  for _ in range(inner):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / inner


def interleaved_samples(cases: Mapping[Hashable, tuple[Callable, tuple]], rounds: int,
                        inner: int | Mapping[Hashable, int], *,
                        settle: bool = False) -> dict[Hashable, list[float]]:
  """Seconds per call of each case, one sample per round, sampled in interleaved rounds.

  Each round samples every case once, in a new shuffled order, so that no case always follows
  the same (memory-hungry) neighbour. `inner` is the calls per sample (one number or one per
  case); with `settle`, one unmeasured call precedes each sample (on a GPU, so that a sample
  starts with the device busy with that case).
  """
  import jax

  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))
  samples: dict[Hashable, list[float]] = {key: [] for key in cases}
  order = list(cases)
  rng = random.Random(0)
  for _ in range(rounds):
    rng.shuffle(order)
    for key in order:
      fn, args = cases[key]
      if settle:
        jax.block_until_ready(fn(*args))
      n = inner if isinstance(inner, int) else inner[key]
      samples[key].append(per_call(fn, args, n))
  return samples


def medians(samples: Mapping[Hashable, list[float]]) -> dict[Hashable, float]:
  return {key: statistics.median(v) for key, v in samples.items()}

