"""The device the engine runs on when none is named: tinygrad's pick, except OpenCL on a CPU (pocl), which tinygrad
counts as a GPU-style backend but which only stands in for one here: then the native CPU backend."""

import os
import subprocess
import sys

PROBE = """
import tinyvllm_core
from tinygrad import Device
from tinyvllm_core.kernels.devices import _opencl_on_cpu
tinygrads = Device.DEFAULT
print(tinygrads, tinygrads == "CL" and _opencl_on_cpu(), tinyvllm_core.resolve_device(None))
"""


def test_default_device_is_never_opencl_on_a_cpu():
  env = {k: v for k, v in os.environ.items() if k != "DEV"}
  run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  tinygrads, opencl_on_cpu, ours = run.stdout.split()
  assert ours == ("CPU" if opencl_on_cpu == "True" else tinygrads)


def test_device_names_are_case_insensitive():
  from tinyvllm_core import resolve_device

  assert (
    resolve_device("cpu") == "CPU"
  )  # (what follows a ':' keeps its case: tinygrad reads a renderer or an arch there)
