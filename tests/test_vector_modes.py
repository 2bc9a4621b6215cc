"""The CPU kernels have two register-block layouts: 8-wide, when tinygrad does not group loads into float4 (chosen
with CC=clang-19 or newer, or TINYVLLM_WIDE=1), and float4 otherwise. The test process uses one of them; this runs
the kernel tests and the logits-vs-NumPy tests again in a fresh process under the other, so CI checks both whatever
clang it has."""
import os
import subprocess
import sys
from pathlib import Path

from tinyvllm_core.model import wide_vectors

TESTS = Path(__file__).parent


def test_kernels_and_logits_match_numpy_in_the_other_vector_mode():
  wide = wide_vectors()
  env = dict(os.environ, TINYVLLM_WIDE="0" if wide else "1")
  mode = subprocess.run([sys.executable, "-c", "from tinyvllm_core.model import wide_vectors; print(wide_vectors())"], env=env, capture_output=True, text=True)
  assert mode.stdout.strip() == str(not wide), mode.stderr
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_kernels.py",
         "test_model_logits.py::test_logits_match_numpy_reference", "test_model_logits.py::test_kernels_split_over_threads_match_reference"]
  run = subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=1500)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
  assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1]
