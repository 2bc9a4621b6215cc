"""Kernel optimization options shared by the attention and linear kernels."""

from tinygrad import Device
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.helpers import NUM_CPU_THREADS


def accumulators() -> int:
  """Register accumulators per block: 8 when the renderer keeps loads ungrouped (8-wide FMA chains, kernels/cpu.py
  turns float4 grouping off for clang >= 19), else 4 float4 accumulators."""
  return 4 if Device[Device.DEFAULT].renderer.supports_float4 else 8


def upcast(ranges: dict[str, int], *amounts: tuple[str, int]) -> tuple[Opt, ...]:
  """UPCAST opts by range name (opts number only the ranges of size > 1); the first range is split over the CPU's
  threads when the renderer runs threads (the runner runs the parts in parallel)."""
  names = [name for name, size in ranges.items() if size > 1]
  opts = tuple(
    Opt(OptOps.UPCAST, names.index(name), amount) for name, amount in amounts if amount > 1 and name in names
  )
  first = next(iter(ranges))
  threads = NUM_CPU_THREADS.value if Device[Device.DEFAULT].renderer.has_threads else 1
  first_parts = ranges[first] // dict(amounts).get(first, 1)
  splits = threads > 1 and names[:1] == [first] and first_parts % threads == 0
  return opts + ((Opt(OptOps.THREAD, 0, threads),) if splits else ())
