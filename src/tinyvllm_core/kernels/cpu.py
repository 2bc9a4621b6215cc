"""Every CPU-only trick, imported only when the engine runs on tinygrad's CPU device:
- the compiler pick: clang >= 19 vectorizes our register blocks 8-wide (86 vs 41 GFLOPS per core at 512 rows);
- the wide-vector switch: a pure check, and the one place that changes tinygrad's renderer;
- the direct replay of captured kernels, with worker threads for kernels split over the cores."""

import ctypes
import os
import queue
import re
import shutil
import tempfile
import threading
from pathlib import Path

from tinygrad import Device, TinyJit
from tinygrad.engine.realize import get_call_arg_uops, get_runtime
from tinygrad.helpers import getenv
from tinygrad.uop.ops import Ops, UOp


def pick_compiler() -> None:
  """tinygrad compiles CPU kernels with $CC (default clang): use the newest clang-N >= 19 on PATH unless CC is set."""
  if "CC" in os.environ:
    return
  newest = next((f"clang-{v}" for v in range(30, 18, -1) if shutil.which(f"clang-{v}")), None)
  if newest:
    os.environ["CC"] = quiet_clang(newest)


def quiet_clang(clang: str) -> str:
  """A wrapper script named like clang: clang 19's -march=native warns "invalid feature combination" on AVX10 CPUs,
  for every kernel, onto the user's terminal (tinygrad's compile command has no place for flags)."""
  path = Path(tempfile.gettempdir()) / f"tinyvllm-{os.getuid()}" / clang
  script = f'#!/bin/sh\nexec {shutil.which(clang)} -Wno-unknown-warning-option -Wno-invalid-feature-combination "$@"\n'
  if not path.exists() or path.read_text() != script:
    path.parent.mkdir(exist_ok=True)
    staged = path.with_suffix(f".{os.getpid()}")
    staged.write_text(script)
    staged.chmod(0o755)
    staged.replace(path)  # atomic: other processes see the old script or the new one
  return str(path)


def wide_vectors_wanted() -> bool:
  """CPU with CC=clang-N, N >= 19 (or TINYVLLM_WIDE=1; TINYVLLM_WIDE=0 turns it off): 8-wide register blocks need
  tinygrad's float4 load grouping off, with which no clang emits ymm FMAs (README: How it works)."""
  renderer = Device["CPU"].renderer
  cc = re.fullmatch(r"clang-(\d+)", Path(getenv("CC", "clang")).name)
  default = str(int(cc is not None and int(cc.group(1)) >= 19))
  return type(renderer).__name__ == "ClangRenderer" and os.environ.get("TINYVLLM_WIDE", default) != "0"


def setup() -> None:
  """Before the first CPU kernel compiles: the compiler, then float4 grouping off on the CPU renderer only (GPUs keep
  their float4 loads) when 8-wide blocks pay."""
  pick_compiler()
  if wide_vectors_wanted():
    Device["CPU"].renderer.supports_float4 = False


def capture_settings() -> dict[str, int]:
  """Context settings while a jit captures: in the 8-wide mode kernels compile in-process, because tinygrad's compile
  workers rebuild the renderer from its target (Renderer.__reduce__) and would group loads again."""
  return {"PARALLEL": 0} if not Device["CPU"].renderer.supports_float4 else {}


class CPUReplay:
  """Calls a captured TinyJit's compiled CPU kernels directly (tinygrad's replay costs ~40 us of Python per kernel, ~600
  per decode step). Only the JIT's inputs (PARAM slots) change between calls; other arguments are fixed addresses."""

  def __init__(self, jit: TinyJit, workers: list["Worker"]):
    self.ret, self.workers = jit.captured.ret, workers
    self.kernels = [self._kernel(call) for call in jit.captured.linear.src]
    num_threads = max((k[-1] for k in self.kernels), default=1)
    workers.extend(Worker() for _ in range(num_threads - 1 - len(workers)))

  @staticmethod
  def _kernel(call: UOp) -> tuple:
    prg, args = call.src[0], get_call_arg_uops(call)
    # a SHRINK of the jit's memory plan (int_dot.py's quantized rows share one arena) is a fixed address; of an input
    # it would move with the input
    input_view = any(a.op is Ops.SHRINK and any(u.op is Ops.PARAM for u in a.toposort()) for a in args)
    unsupported = input_view or any(a.op in (Ops.MSELECT, Ops.MSTACK) for a in args)
    if prg.op is not Ops.PROGRAM or not call.src[1].device.startswith("CPU") or unsupported:
      raise NotImplementedError("only plain CPU kernels replay directly")
    rt = get_runtime(call.src[1].device, prg)
    argv = [
      0 if args[i].op is Ops.PARAM else args[i].buffer.ensure_allocated().get_buf(args[i].device).va_addr
      for i in prg.arg.globals
    ]
    argv += [v or 0 for v in prg.arg.vals({})]
    params = [(pos, args[i].arg.slot) for pos, i in enumerate(prg.arg.globals) if args[i].op is Ops.PARAM]
    fxn = ctypes.CFUNCTYPE(None, *[ctypes.c_uint64] * len(argv))(rt.addr)  # rt stays referenced: it owns the code
    core_id = rt.runtimevars.get("core_id")
    num_threads = 1 if core_id is None else prg.arg.launch_dims({})[0][0]
    return fxn, rt, argv, params, core_id, num_threads

  def __call__(self, inputs: list[UOp]):
    addrs = [u.buffer._buf.va_addr for u in inputs]
    for fxn, _, argv, params, core_id, num_threads in self.kernels:
      for pos, slot in params:
        argv[pos] = addrs[slot]
      if core_id is None:
        fxn(*argv)
      else:
        self._run_split(fxn, argv, core_id, num_threads)
    return self.ret

  def _run_split(self, fxn, argv: list[int], core_id: int, num_threads: int) -> None:
    """A kernel split over threads takes its thread index as an argument: part 0 here, the others on workers."""
    for tid in range(1, num_threads):
      self.workers[tid - 1].jobs.put((fxn, [*argv[:core_id], tid, *argv[core_id + 1 :]]))
    argv[core_id] = 0
    fxn(*argv)
    for tid in range(1, num_threads):
      self.workers[tid - 1].done.acquire()


class Worker:
  """Runs one part of kernels split over threads; ctypes calls release the GIL, so the parts run on different cores."""

  def __init__(self):
    self.jobs, self.done = queue.SimpleQueue(), threading.Semaphore(0)
    threading.Thread(target=self._run, daemon=True).start()

  def _run(self):
    while True:
      fxn, argv = self.jobs.get()
      fxn(*argv)
      self.done.release()
