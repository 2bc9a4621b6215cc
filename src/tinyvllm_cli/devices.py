"""`tinyvllm devices`: the tinygrad backends that open on this machine, what --device accepts for each."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tinyvllm_cli.ui import out, say


def devices() -> None:
  """List the tinygrad devices present here and their renderers; * marks the one used without --device.

  --device (or DEV) takes a name from this list, optionally with a renderer (CPU:LLVM), an arch
  (PYTHON::sm_80) or a device index (CUDA:1).

  Example:

    tinyvllm devices
  """
  from tinygrad import Device
  from tinygrad.device import ALL_DEVICES

  from tinyvllm_core.kernels.devices import default_device, tensor_device

  default, present = tensor_device(default_device()).split(":")[0], set(Device.get_available_devices())
  table = Table("DEVICE", "RENDERER", "OTHER RENDERERS", "NOTE", box=None, pad_edge=False)
  for name in [d for d in ALL_DEVICES if d in present]:
    dev = Device[name]
    chosen = dev._renderer_name(type(dev.renderer))
    others = [dev._renderer_name(r) for r in dev.renderers if dev._renderer_name(r) != chosen]
    table.add_row(name + (" *" if name == default else ""), chosen, ", ".join(others), _note(name))
  (out if out.is_terminal else Console(width=1000, highlight=False)).print(table)  # pipes get whole lines
  say("not here: " + (", ".join(d for d in ALL_DEVICES if d not in present) or "none"))


def _note(name: str) -> str:
  if name != "CL":
    return ""
  from tinyvllm_core.kernels.devices import _opencl_on_cpu

  return "OpenCL on the CPU (pocl): a GPU-style stand-in, not picked by default" if _opencl_on_cpu() else ""
