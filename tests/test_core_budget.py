"""The engine's budget (../shared/DESIGN.md): at most 1000 lines as `ruff format` lays them out (120 columns, 2-space
indent), counted as non-blank lines that are not only a comment (docstrings count). kernels/ and formats/ are outside
the budget (vLLM's csrc/, and the model files nano-vllm hands to libraries); their sizes are printed beside it."""

import re
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "src" / "tinyvllm_core"
OUTSIDE = ("kernels", "formats")


def code_lines(path: Path) -> int:
  """Non-blank, non-comment lines of the file as ruff formats it (the same text when it is already formatted)."""
  run = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(path), "-"],
    input=path.read_text(),
    capture_output=True,
    text=True,
    cwd=CORE.parent.parent,
  )
  assert run.returncode == 0, run.stderr
  return sum(1 for line in run.stdout.splitlines() if not re.fullmatch(r"\s*(#.*)?", line))


def test_engine_stays_within_1000_formatted_lines():
  files = sorted(CORE.rglob("*.py"))
  assert files, f"no Python files in {CORE}"
  sizes = {"engine": 0, **{part: 0 for part in OUTSIDE}}
  for f in files:
    part = f.relative_to(CORE).parts[0]
    sizes[part if part in OUTSIDE else "engine"] += code_lines(f)
  print(
    f"tinyvllm_core formatted lines: engine {sizes['engine']} (budget 1000), "
    f"kernels/ {sizes['kernels']}, formats/ {sizes['formats']}"
  )
  assert sizes["kernels"] > 0 and sizes["formats"] > 0, "kernels/ and formats/ are counted apart from the engine"
  assert sizes["engine"] <= 1000, (
    f"the engine (src/tinyvllm_core outside kernels/ and formats/) has {sizes['engine']} lines; the budget is 1000"
  )
