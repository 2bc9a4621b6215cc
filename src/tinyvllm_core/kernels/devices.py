"""Which device runs the kernels: the user's device string read as tinygrad reads DEV, or the default pick.

tinygrad 0.14 reads DEV as targets `[IFACE[:INDICES]+]DEVICE[:RENDERER[:ARCH]]` separated by ';' (CPU:LLVM,
PYTHON::sm_80, CUDA:PTX); a tensor's device is `DEVICE[:N]`. No renderer is named by digits, so `CUDA:1` here means
the second CUDA device, which DEV cannot say."""

import ctypes
import os
import re

import numpy as np
from tinygrad import Device, Tensor
from tinygrad.helpers import DEV, Target
from tinygrad.uop.ops import Ops

from ..config import ConfigError


def default_device() -> str:
  """DEV when set, else tinygrad's pick, except OpenCL on a CPU (pocl, which tinygrad counts as a GPU-style backend:
  a stand-in for one in tests, slower than the native CPU backend): then the native CPU."""
  if DEV.device:
    return repr(DEV)  # the renderer and arch too, not only DEV.device
  if Device.DEFAULT != "CL" or not _opencl_on_cpu():
    return Device.DEFAULT
  return "CPU"


def parse_device(name: str) -> list[Target]:
  """tinygrad's targets for a device string; `DEVICE:N` is the N-th device of a kind (ConfigError if malformed)."""
  if indexed := re.fullmatch(r"([A-Za-z]+):(\d+)", name):
    base, index = indexed[1].upper(), int(indexed[2])
    return [Target(device=f"{base}:{index}" if index else base)]
  try:
    return [Target.parse(part) for part in name.split(";")]
  except RuntimeError as e:
    raise ConfigError(f"device {name!r}: {e}") from None


def tensor_device(name: str) -> str:
  """The device tensors live on for a device string: CPU:LLVM -> CPU (the renderer stays in DEV), CUDA:1 -> CUDA:1."""
  return parse_device(name)[0].device


def use_device(name: str | None) -> str:
  """Make `name` (default: default_device()) tinygrad's default device, DEV for child processes too, and return it as
  tinygrad writes it (device upper case; renderer and arch kept). A device, renderer or arch that does not work here
  is a one-line ConfigError that lists the devices present."""
  targets, previous = parse_device(name or default_device()), DEV.value
  label = ";".join(map(repr, targets))
  DEV.value = targets
  try:
    _check(targets[0])
  except Exception as e:
    DEV.value = previous
    reason = str(e.exceptions[0] if isinstance(e, ExceptionGroup) else e).strip().splitlines() or [type(e).__name__]
    available = ", ".join(Device.get_available_devices()) or "none"
    raise ConfigError(f"device {label!r} is not available here ({reason[0]}); available: {available}") from None
  os.environ["DEV"] = label  # tinygrad's pick wrote its own choice there for spawned children
  return label


def _check(target: Target) -> None:
  """Open the device and its renderer; a named renderer or arch also compiles and runs one small kernel (some fail
  only when they compile, as CPU:LVP without its mesa library)."""
  if target.device.split(":")[0] not in Device._devices:
    raise ConfigError(f"tinygrad has no backend {target.device.split(':')[0]}")
  if target.device.split(":")[0] == "CPU":
    from . import cpu

    cpu.setup()  # before the first CPU kernel compiles, on the renderer DEV names
  renderer = Device[target.device].renderer
  if (target.renderer or target.arch) and (Tensor([1, 2, 3], device=target.device) * 2).tolist() != [2, 4, 6]:
    raise ConfigError(f"{type(renderer).__name__} computed a wrong result")


def _opencl_on_cpu() -> bool:
  from tinygrad.runtime.autogen import opencl as cl

  kind = ctypes.c_uint64()
  cl.clGetDeviceInfo(Device["CL"].cl_dev, cl.CL_DEVICE_TYPE, ctypes.sizeof(kind), ctypes.byref(kind), None)
  return bool(kind.value & cl.CL_DEVICE_TYPE_CPU)


def read_back(t: Tensor) -> np.ndarray:
  """A realized tensor's values; a plain buffer through its allocator's copy-out, which waits for the device
  (Tensor.numpy schedules a copy first: 176 us per call, 4% of a one-sequence decode step on CPU). Views (a jit's
  reshaped or shrunk outputs) take Tensor.numpy."""
  if t.uop.op is not Ops.BUFFER:
    return t.numpy()
  buf = t.uop.buffer
  out = np.empty(t.shape, dtype=np.dtype(t.dtype.fmt))
  buf.allocator._copyout(memoryview(out).cast("B"), buf._buf)
  return out
