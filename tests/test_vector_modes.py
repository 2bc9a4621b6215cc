"""The CPU kernels have two register-block layouts: 8-wide, when tinygrad does not group loads into float4 (chosen
with CC=clang-19 or newer, or TINYVLLM_WIDE=1), and float4 otherwise. The test process uses one of them; this runs
the kernel tests and the logits-vs-NumPy tests again in a fresh process under the other, so CI checks both whatever
clang it has."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tinygrad import Device

TESTS = Path(__file__).parent


def test_kernels_and_logits_match_numpy_in_the_other_vector_mode():
  wide = not Device["CPU"].renderer.supports_float4  # conftest resolved the device: the mode is set
  env = dict(os.environ, TINYVLLM_WIDE="0" if wide else "1")
  probe = (
    "import tinyvllm_core as t; from tinygrad import Device; t.resolve_device('CPU'); "
    "print(not Device['CPU'].renderer.supports_float4)"
  )
  mode = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
  assert mode.stdout.strip() == str(not wide), mode.stderr
  cmd = [
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-x",
    "-p",
    "no:cacheprovider",
    "test_kernels.py",
    "test_model_logits.py::test_logits_match_numpy_reference",
    "test_model_logits.py::test_kernels_split_over_threads_match_reference",
  ]
  run = subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=1500)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
  assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1]


def test_picked_clang_compiles_march_native_without_warnings():
  """The picked compiler (a wrapper of the newest clang-N) compiles as tinygrad calls it, and says nothing on stderr
  (clang 19 warns "invalid feature combination" for -march=native on AVX10 CPUs, once per kernel)."""
  from tinyvllm_core.kernels.cpu import quiet_clang

  clang = next((f"clang-{v}" for v in range(30, 18, -1) if shutil.which(f"clang-{v}")), None)
  if clang is None:
    pytest.skip("no clang-N >= 19 on PATH")
  cmd = [quiet_clang(clang), "-c", "-x", "c", "-O2", "-march=native", "-", "-o", "-"]
  run = subprocess.run(cmd, input=b"float f(float x) { return x * 2.0f; }", capture_output=True)
  assert run.returncode == 0 and run.stdout.startswith(b"\x7fELF") and run.stderr == b"", run.stderr
