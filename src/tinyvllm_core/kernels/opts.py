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


def has_local() -> bool:
  """A GPU-style renderer (workgroups, local memory): the kernels get workgroups there, register blocks on the CPU."""
  return Device[Device.DEFAULT].renderer.has_local


def heuristic_on_gpu(cpu_opts: tuple[Opt, ...]) -> tuple[Opt, ...] | None:
  """For kernels without a reduce worth splitting: None on a GPU-style renderer, so tinygrad's own heuristics pick the
  workgroups (or BEAM under --beam) from the kernel as it sees it; the CPU opts elsewhere."""
  return None if has_local() else cpu_opts


def divisor(n: int, *candidates: int) -> int:
  """The first candidate that divides n, else 1."""
  return next((c for c in candidates if n % c == 0), 1)


def workgroups(ranges: dict[str, int], reduces: dict[str, int], *steps: tuple[OptOps, str, int]) -> tuple[Opt, ...]:
  """Opts by range name on a renderer with local memory: LOCAL / UPCAST split an output range, GROUP / UNROLL a reduce
  range, in order; a step whose amount does not divide what is left of its range is skipped. Axis numbers follow
  tinygrad's: ranges of size 1 are not axes, a range split down to size 1 goes, GROUP's part sorts before reduces."""
  size, outs, reds = {**ranges, **reduces}, [n for n in ranges if ranges[n] > 1], [n for n in reduces if reduces[n] > 1]
  opts, groups = [], 0
  for op, name, amount in steps:
    if amount <= 1 or name not in outs + reds or size[name] % amount:
      continue
    axis = outs.index(name) if name in outs else reds.index(name) + (groups if op is OptOps.UNROLL else 0)
    opts.append(Opt(op, axis, amount))
    size[name] //= amount
    groups += op is OptOps.GROUP
    if size[name] == 1:
      (outs if name in outs else reds).remove(name)
  return tuple(opts)
