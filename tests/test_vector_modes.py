"""The CPU kernels have two register-block layouts: 8-wide, when tinygrad does not group loads into float4 (chosen
with CC=clang-19 or newer, or TINYVLLM_WIDE=1), and float4 otherwise. The test process uses one of them; this runs
the kernel tests and the logits-vs-NumPy tests again in a fresh process under the other, so CI checks both whatever
clang it has."""

import os
import subprocess
import sys
from pathlib import Path

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
