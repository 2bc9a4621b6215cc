"""Every CPU-only trick, imported only when the engine runs on tinygrad's CPU device:
- the compiler pick: clang >= 19 vectorizes our register blocks 8-wide (86 vs 41 GFLOPS per core at 512 rows);
- the wide-vector switch: a pure check, and the one place that changes tinygrad's renderer;
- the direct replay of captured kernels (dispatch.c), with worker threads for kernels split over the cores."""

import ctypes
import os
import functools
import gc
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tinygrad import Device, TinyJit
from tinygrad.engine.realize import get_call_arg_uops, get_runtime
from tinygrad.helpers import getenv
from tinygrad.uop.ops import Ops, UOp

MAX_ARGS = 32  # dispatch.c calls every kernel with this many 64-bit words


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


class Kernel(ctypes.Structure):
  _fields_ = [("fn", ctypes.c_void_p), ("core_id", ctypes.c_int64), ("num_threads", ctypes.c_int64)]
  _fields_ += [("argv", ctypes.c_uint64 * MAX_ARGS)]


class Patch(ctypes.Structure):
  _fields_ = [("kernel", ctypes.c_int64), ("pos", ctypes.c_int64), ("slot", ctypes.c_int64)]


@functools.cache
def dispatcher() -> ctypes.CDLL:
  """dispatch.c compiled once per source and compiler into the temp folder (a CPU device has a C compiler: clang)."""
  source = (Path(__file__).parent / "dispatch.c").read_bytes()
  cc = os.environ.get("CC", "clang")
  digest = hashlib.sha256(source + cc.encode()).hexdigest()[:16]
  path = Path(tempfile.gettempdir()) / f"tinyvllm-{os.getuid()}" / f"dispatch-{digest}.so"
  if not path.exists():
    path.parent.mkdir(exist_ok=True)
    staged = path.with_suffix(f".{os.getpid()}.so")
    cmd = [cc, "-O2", "-shared", "-fPIC", "-pthread", "-x", "c", "-", "-o", str(staged)]
    try:
      subprocess.run(cmd, input=source, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:  # the runner then keeps tinygrad's replay
      raise NotImplementedError(f"kernels/dispatch.c did not compile with {cc}: {e}") from e
    staged.replace(path)  # atomic: other processes see no file or the whole one
  lib = ctypes.CDLL(str(path))  # a CDLL call releases the GIL: the server's threads go on while a step runs
  lib.tv_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
  return lib


class CPUReplay:
  """Calls a captured TinyJit's compiled CPU kernels directly, all in one call into dispatch.c (tinygrad's replay costs
  ~40 us of Python per kernel, ~600 per decode step; a Python loop of ctypes calls ~2 us, and a hand-off to a Python
  worker thread ~20 us). Only the JIT's inputs (PARAM slots) change between calls; other arguments are fixed
  addresses, patched in C from the inputs' addresses."""

  def __init__(self, jit: TinyJit):
    self.ret, self.lib = jit.captured.ret, dispatcher()
    parts = [self._kernel(call) for call in jit.captured.linear.src]
    self.programs = [rt for rt, *_ in parts]  # they own the kernels' code
    self.kernels = (Kernel * len(parts))()
    patches = []
    for i, (rt, argv, params, core_id, num_threads) in enumerate(parts):
      self.kernels[i].fn, self.kernels[i].core_id, self.kernels[i].num_threads = rt.addr, core_id, num_threads
      self.kernels[i].argv[: len(argv)] = argv
      patches += [(i, pos, slot) for pos, slot in params]
    self.patches = (Patch * len(patches))(*patches)
    num_threads = max((k.num_threads for k in self.kernels), default=1)
    if self.lib.tv_start_workers(num_threads - 1) < num_threads - 1:
      raise NotImplementedError("no threads for the kernels' other parts")

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
    if len(argv) > MAX_ARGS:
      raise NotImplementedError(f"a kernel with {len(argv)} arguments (dispatch.c passes {MAX_ARGS})")
    params = [(pos, args[i].arg.slot) for pos, i in enumerate(prg.arg.globals) if args[i].op is Ops.PARAM]
    core_id = rt.runtimevars.get("core_id")
    num_threads = 1 if core_id is None else prg.arg.launch_dims({})[0][0]
    return rt, argv, params, -1 if core_id is None else core_id, num_threads

  def __call__(self, inputs: list[UOp]):
    addrs = (ctypes.c_uint64 * len(inputs))(*[u.buffer._buf.va_addr for u in inputs])
    self.lib.tv_run(self.kernels, len(self.kernels), self.patches, len(self.patches), addrs)
    return self.ret


class StepPlan:
  """A whole step as one call into dispatch.c: the replays of embed, every layer and head, in order, with each input
  address patched in once (the runner's inputs, weights, KV pools and the jits' outputs stay where they are)."""

  def __init__(self, calls: list[tuple[CPUReplay, list[UOp]]], ret):
    kernels = []
    for replay, inputs in calls:
      copies = [Kernel.from_buffer_copy(k) for k in replay.kernels]
      for p in replay.patches:
        copies[p.kernel].argv[p.pos] = inputs[p.slot].buffer._buf.va_addr
      kernels += copies
    self.kernels, self.ret, self.lib = (Kernel * len(kernels))(*kernels), ret, dispatcher()
    # a plan comes once a shape's jits are captured: what exists now is never collected again, so Python's full
    # collections stop walking tinygrad's graphs (14-42 ms each, now and then inside a ~5 ms decode step)
    gc.freeze()

  def __call__(self):
    self.lib.tv_run(self.kernels, len(self.kernels), None, 0, None)
    return self.ret
