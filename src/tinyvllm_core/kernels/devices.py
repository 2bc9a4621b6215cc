"""Which device runs the kernels when the user names none."""

import ctypes

from tinygrad import Device
from tinygrad.helpers import DEV


def default_device() -> str:
  """DEV when set, else tinygrad's pick, except OpenCL on a CPU (pocl, which tinygrad counts as a GPU-style backend:
  a stand-in for one in tests, slower than the native CPU backend): then the native CPU."""
  if DEV.device or Device.DEFAULT != "CL" or not _opencl_on_cpu():
    return Device.DEFAULT
  return "CPU"


def _opencl_on_cpu() -> bool:
  from tinygrad.runtime.autogen import opencl as cl

  kind = ctypes.c_uint64()
  cl.clGetDeviceInfo(Device["CL"].cl_dev, cl.CL_DEVICE_TYPE, ctypes.sizeof(kind), ctypes.byref(kind), None)
  return bool(kind.value & cl.CL_DEVICE_TYPE_CPU)
