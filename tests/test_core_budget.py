"""The engine core's budget (../shared/DESIGN.md): at most 1000 lines of code, counted as non-blank lines that are
not only a comment (docstrings count)."""
import re
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "src" / "tinyvllm_core"

def test_core_stays_within_1000_lines():
  files = sorted(CORE.glob("*.py"))
  assert files, f"no Python files in {CORE}"
  count = sum(1 for f in files for line in f.read_text().splitlines() if not re.fullmatch(r"\s*(#.*)?", line))
  assert count <= 1000, f"src/tinyvllm_core has {count} lines of code; the budget is 1000"
