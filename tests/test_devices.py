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


NAMES = """
import sys, tinyvllm_core
from tinygrad import Device
for name in sys.argv[1:]:
  try:
    kept = tinyvllm_core.resolve_device(None if name == "-" else name)
    renderer = Device[Device.DEFAULT].renderer
    print(name, kept, Device.DEFAULT, type(renderer).__name__, renderer.target.arch, sep="|")
  except tinyvllm_core.ConfigError as e:
    print(name, "refused", str(e), sep="|")
"""


def test_device_strings_keep_renderer_arch_and_index_or_are_refused_in_one_line():
  """tinygrad's DEV syntax DEVICE[:RENDERER[:ARCH]] (and DEVICE:N, a device index) is kept as written, from --device
  or from DEV, never replaced by the default renderer; a renderer the device lacks is one line naming the devices."""
  env = {k: v for k, v in os.environ.items() if k != "DEV"} | {"DEV": "CPU:LLVM"}
  names = ["-", "cpu:x86", "PYTHON::sm_80", "CPU:NOPE", "CPU:0", "CPU:1", "NOPE", "CPU:LLVM"]
  run = subprocess.run([sys.executable, "-c", NAMES, *names], env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  got = {line.split("|")[0]: line.split("|")[1:] for line in run.stdout.splitlines()}
  assert got["-"][:3] == ["CPU:LLVM", "CPU", "CPULLVMRenderer"] or got["-"][0] == "refused"  # without libLLVM
  assert got["CPU:LLVM"] == got["-"]  # DEV=CPU:LLVM and --device CPU:LLVM: the same
  assert got["cpu:x86"][:3] == ["CPU:X86", "CPU", "X86Renderer"]
  assert got["PYTHON::sm_80"][:4] == ["PYTHON::sm_80", "PYTHON", "PythonRenderer", "sm_80"]  # the arch keeps its case
  assert got["CPU:0"][:2] == ["CPU", "CPU"] and got["CPU:1"][:2] == ["CPU:1", "CPU:1"]  # tinygrad drops ':0' itself
  for bad in ("CPU:NOPE", "NOPE"):
    assert got[bad][0] == "refused" and "\n" not in got[bad][1] and "available: " in got[bad][1], got[bad]
  assert "no renderer 'NOPE'" in got["CPU:NOPE"][1]


def test_device_names_are_case_insensitive():
  from tinyvllm_core import resolve_device

  assert (
    resolve_device("cpu") == "CPU"
  )  # (what follows a ':' keeps its case: tinygrad reads a renderer or an arch there)


def test_devices_command_lists_the_devices_present_and_marks_the_default():
  from tinygrad import Device
  from typer.testing import CliRunner

  from tinyvllm_cli.main import app

  r = CliRunner().invoke(app, ["devices"], prog_name="tinyvllm", env={"COLUMNS": "200", "NO_COLOR": "1"})
  assert r.exit_code == 0, r.output
  rows = {line.split()[0]: line for line in r.output.splitlines() if line and not line.startswith(("DEVICE", "not"))}
  assert set(rows) == set(Device.get_available_devices())  # CL among them once pocl is installed
  assert rows["CPU"].split()[1:3] == ["*", "CLANG"]  # this run's device (the CPU pass), its default renderer
  assert "not here: " in r.output
