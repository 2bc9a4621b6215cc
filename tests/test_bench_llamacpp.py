"""`tinyvllm bench throughput --compare llamacpp`: llama.cpp (llama-cpp-python) on the same GGUF file as tinyvllm.
Not installed or not a GGUF model: one skip line and the run goes on. The real run needs llama-cpp-python
(skipped without it)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tinyvllm_cli.bench.peers import BackendOptions, BackendUnavailable, run_backend
from tinyvllm_cli.bench.common import resolve_bench_model
from tinyvllm_cli.bench.throughput import Workload
from tinyvllm_cli.main import app

SMALL = (
  "--num-seqs",
  "2",
  "--input-len",
  "4",
  "8",
  "--output-len",
  "2",
  "4",
  "--kv-cache-gb",
  "0.01",
  "--device",
  "CPU",
)
NOT_INSTALLED = "not installed (pip install llama-cpp-python)"


def bench(*args: str):
  return CliRunner().invoke(app, ["bench", *args], prog_name="tinyvllm", env={"COLUMNS": "200", "NO_COLOR": "1"})


def written(out: Path) -> tuple[dict, str]:
  files = sorted(out.iterdir())
  assert [f.suffix for f in files] == [".json", ".md"] and files[0].name.startswith("throughput-"), files
  return json.loads(files[0].read_text()), files[1].read_text()


def skip_lines(r) -> list[str]:
  return [line for line in r.stderr.splitlines() if line.startswith("llamacpp: ")]


@pytest.fixture
def llama_cpp_missing(monkeypatch: pytest.MonkeyPatch) -> None:
  """`import llama_cpp` fails and find_spec says it is not there, whether or not it is installed."""
  monkeypatch.setitem(sys.modules, "llama_cpp", None)


@pytest.fixture(scope="module")
def tiny_gguf(checkpoints, tmp_path_factory) -> Path:
  from gguf_writer import write_gguf

  path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf"
  write_gguf(path, checkpoints["llama"][0], "Q4_1")
  return path


def test_llamacpp_not_installed_is_one_skip_line(tmp_path: Path, tiny_gguf: Path, llama_cpp_missing):
  out = tmp_path / "results"
  r = bench("throughput", "--model", str(tiny_gguf), "--compare", "llamacpp", *SMALL, "--output", str(out))
  assert r.exit_code == 0 and "Traceback" not in r.output, r.output
  assert skip_lines(r) == [f"llamacpp: {NOT_INSTALLED}; skipped"], r.stderr
  data, md = written(out)
  assert list(data["results"]) == ["tinyvllm"] and data["skipped"] == {"llamacpp": NOT_INSTALLED}
  assert data["results"]["tinyvllm"]["gen_tokens"] == sum(Workload.nano_vllm(2, (4, 8), (2, 4), 384).output_lens)
  assert f"Skipped llamacpp: {NOT_INSTALLED}" in md and "| Metric | tinyvllm |" in md


def test_llamacpp_needs_a_gguf_model(tmp_path: Path, llama_cpp_missing):
  """The toy model (random weights): the GGUF reason, not the install hint (installing would not help)."""
  out = tmp_path / "results"
  r = bench("throughput", "--model", "toy", "--compare", "llamacpp", *SMALL, "--output", str(out))
  assert r.exit_code == 0 and "Traceback" not in r.output, r.output
  why = "llama.cpp runs GGUF files; this model is the toy model (random weights)"
  assert skip_lines(r) == [f"llamacpp: {why}; skipped"], r.stderr
  data, md = written(out)
  assert (
    list(data["results"]) == ["tinyvllm"] and data["skipped"] == {"llamacpp": why} and f"Skipped llamacpp: {why}" in md
  )


@pytest.mark.parametrize("case", ["folder", "random-weights gguf"])
def test_llamacpp_gguf_reason_for_folders_and_random_weights(
  case: str, checkpoints, tiny_gguf: Path, llama_cpp_missing
):
  model = (
    resolve_bench_model(str(checkpoints["llama"][0]), random_weights=False)
    if case == "folder"
    else resolve_bench_model(str(tiny_gguf), random_weights=True)
  )
  with pytest.raises(BackendUnavailable) as e:
    run_backend("llamacpp", model, "CPU", Workload([[1, 2, 3]], [2]), BackendOptions())
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("llama.cpp runs GGUF files; this model is ")
  assert ("a Hugging Face model folder" if case == "folder" else "random weights (--random-weights)") in msg


def test_llamacpp_real_run_on_the_embedded_smollm2(tmp_path: Path, smollm2_path: Path):
  pytest.importorskip("llama_cpp")
  out = tmp_path / "results"
  r = bench(
    "throughput",
    "--model",
    "smollm2",
    "--backend",
    "llamacpp",
    "--num-seqs",
    "2",
    "--input-len",
    "8",
    "16",
    "--output-len",
    "4",
    "12",
    "--device",
    "CPU",
    "--output",
    str(out),
  )
  assert r.exit_code == 0 and "Traceback" not in r.output, r.output
  assert not skip_lines(r), r.stderr
  data, md = written(out)
  expected = Workload.nano_vllm(2, (8, 16), (4, 12), vocab_size=49152)
  res = data["results"]["llamacpp"]
  assert data["model"]["path"] == str(smollm2_path) and data["skipped"] == {}
  assert (res["num_seqs"], res["input_tokens"], res["gen_tokens"]) == (2, expected.input_tokens, expected.gen_tokens)
  assert [q["output_tokens"] for q in res["requests"]] == expected.output_lens
  assert [q["prompt_tokens"] for q in res["requests"]] == [len(p) for p in expected.prompts]
  assert all(0 <= q["arrival"] <= q["first_token"] <= q["finish"] <= res["duration"] for q in res["requests"])
  assert res["requests"][0]["finish"] <= res["requests"][1]["arrival"]  # one at a time
  info = res["info"]
  assert info["n_threads"] == os.cpu_count() and info["version"] and info["weights"] == "Q4_1"
  assert any("one at a time" in n for n in info["notes"]) and any("Q4_1" in n for n in info["notes"])
  assert "| Metric | llamacpp |" in md and "Note (llamacpp): requests run one at a time" in md
