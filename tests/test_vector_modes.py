"""The CPU kernels have two register-block layouts: 8-wide, when tinygrad does not group loads into float4 (DMC=1,
chosen with clang >= 19), and float4 otherwise. The test process uses one of them; this runs the kernel tests and the
logits-vs-NumPy tests again in a fresh process under the other, so CI checks both whatever clang it has."""
import os
import subprocess
import sys
from pathlib import Path

from tinyvllm_core.model import WIDE

TESTS = Path(__file__).parent


def test_kernels_and_logits_match_numpy_in_the_other_vector_mode():
  env = dict(os.environ, DMC="0" if WIDE else "1")
  mode = subprocess.run([sys.executable, "-c", "from tinyvllm_core.model import WIDE; print(WIDE)"], env=env, capture_output=True, text=True)
  assert mode.stdout.strip() == str(not WIDE), mode.stderr
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_kernels.py",
         "test_model_logits.py::test_logits_match_numpy_reference", "test_model_logits.py::test_kernels_split_over_threads_match_reference"]
  run = subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=1500)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
  assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1]
