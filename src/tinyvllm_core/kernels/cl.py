"""OpenCL only: a captured TinyJit's kernels enqueued directly. tinygrad's replay sets every argument of every kernel
on every call (~28 us of host time per kernel on pocl, 16.5 ms per SmolLM2 decode step); here each kernel of the
capture gets its own kernel object whose arguments are set once, so a call is one clEnqueueNDRangeKernel per kernel
(and the jit's inputs set again only when they are other buffers)."""

import ctypes

from tinygrad import TinyJit
from tinygrad.engine.realize import get_call_arg_uops, get_runtime
from tinygrad.helpers import is_image_shape
from tinygrad.runtime.autogen import opencl as cl
from tinygrad.uop.ops import Ops, UOp


def _checked(status: ctypes.c_int32, what: str) -> None:
  if status.value != 0:
    raise RuntimeError(f"OpenCL {what} failed with status {status.value}")


class _Kernel:
  def __init__(self, call: UOp):
    prg, args = call.src[0], get_call_arg_uops(call)
    if prg.op is not Ops.PROGRAM or any(a.op in (Ops.MSELECT, Ops.SHRINK, Ops.MSTACK) for a in args):
      raise NotImplementedError("only plain OpenCL kernels replay directly")
    rt = get_runtime(call.src[1].device, prg)
    if any(is_image_shape(shape) for *_, shape in rt.signature):  # tinygrad makes image arguments per call
      raise NotImplementedError("image arguments")
    self.rt, self.queue = rt, rt.dev.queue
    self.kernel = self._own_kernel(rt)
    bufs = [args[i] for i in prg.arg.globals]
    vals = prg.arg.vals({})
    self.params: list[tuple[int, int]] = []  # (kernel argument, jit input slot)
    for arg, (_, slot, dt, _) in enumerate(rt.signature):
      if slot >= len(bufs):
        self._set(arg, getattr(ctypes, f"c_int{dt.bitsize}")(vals[slot - len(bufs)]))
      elif bufs[slot].op is Ops.PARAM:
        self.params.append((arg, bufs[slot].arg.slot))
      else:
        self._set(arg, bufs[slot].buffer.ensure_allocated().get_buf(call.src[1].device))
    global_size, local_size = prg.arg.launch_dims({})
    if local_size is not None:
      global_size = tuple(g * l for g, l in zip(global_size, local_size))
    self.global_size = (ctypes.c_size_t * 3)(*global_size)
    self.local_size = (ctypes.c_size_t * 3)(*local_size) if local_size else None

  @staticmethod
  def _own_kernel(rt) -> cl.cl_kernel:
    """A kernel object of its own (tinygrad's is shared by every call of the program, with other arguments)."""
    size = ctypes.c_size_t()
    cl.clGetKernelInfo(rt.kernel, cl.CL_KERNEL_FUNCTION_NAME, 0, None, ctypes.byref(size))
    name = ctypes.create_string_buffer(size.value)
    cl.clGetKernelInfo(rt.kernel, cl.CL_KERNEL_FUNCTION_NAME, size.value, name, None)
    status = ctypes.c_int32()
    kernel = cl.clCreateKernel(rt.program, name.value, ctypes.byref(status))
    _checked(status, "clCreateKernel")
    return kernel

  def _set(self, arg: int, value) -> None:
    _checked(ctypes.c_int32(cl.clSetKernelArg(self.kernel, arg, ctypes.sizeof(value), ctypes.byref(value))), "set arg")

  def bind(self, inputs: list) -> None:
    for arg, slot in self.params:
      self._set(arg, inputs[slot])

  def enqueue(self) -> None:
    cl.clEnqueueNDRangeKernel(self.queue, self.kernel, 3, None, self.global_size, self.local_size, 0, None, None)

  def __del__(self):
    cl.clReleaseKernel(self.kernel)


class CLReplay:
  """Calls a captured TinyJit's OpenCL kernels directly (see the module's docstring)."""

  def __init__(self, jit: TinyJit):
    self.ret = jit.captured.ret
    self.kernels = [_Kernel(call) for call in jit.captured.linear.src]
    self.bound: list | None = None

  def __call__(self, inputs: list[UOp]):
    handles = [u.buffer._buf for u in inputs]
    if handles != self.bound:
      for kernel in self.kernels:
        kernel.bind(handles)
      self.bound = handles
    for kernel in self.kernels:
      kernel.enqueue()
    return self.ret
