"""`tinyvllm bench vs-llamacpp`: the parsers of llama-bench's JSON and llama-batched-bench's table on output captured
from the llama.cpp build here, the one-line skip when the binaries are missing, the table with and without the
llama.cpp column, and one-line errors. None of it needs llama.cpp; the real run is `tinyvllm bench vs-llamacpp`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tinyvllm_cli.bench.common import BenchModel, Run, machine_info
from tinyvllm_cli.bench.vs_llamacpp import PeerFailed, VsParams, find_tools, parse_batched_bench, parse_llama_bench
from tinyvllm_cli.bench.vs_llamacpp import serve_levels, vs_report, wait_warmed_up
from tinyvllm_cli.main import app


def llama_bench_test(n_prompt: int, n_gen: int, avg_ts: float, stddev_ts: float) -> dict:
  """One entry of `llama-bench -o json` as this build prints it (fields the parser does not read trimmed)."""
  return {
    "build_commit": "unknown",
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "backends": "CPU",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_threads": 2,
    "n_prompt": n_prompt,
    "n_gen": n_gen,
    "n_depth": 0,
    "test_time": "2026-12-01T08:08:05Z",
    "avg_ns": 1593075493,
    "stddev_ns": 0,
    "avg_ts": avg_ts,
    "stddev_ts": stddev_ts,
    "samples_ns": [1593075493],
    "samples_ts": [avg_ts],
  }


BATCHED_BENCH_OUTPUT = """
llama_batched_bench: n_kv_max = 5120, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, \
is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    32 |    128 |    8 |   1280 |    0.689 |   371.55 |    5.305 |   193.03 |    5.994 |   213.55 |
|    32 |    128 |   32 |   5120 |    2.784 |   367.82 |   19.598 |   209.00 |   22.382 |   228.75 |
"""


def test_parse_llama_bench_json():
  text = json.dumps([llama_bench_test(512, 0, 248.112, 3.5), llama_bench_test(0, 128, 101.9, 4.2)], indent=2)
  tests = parse_llama_bench(text)
  assert tests == {
    "pp512": {"tok_s": 248.112, "stddev": 3.5, "model_size": 96576768},
    "tg128": {"tok_s": 101.9, "stddev": 4.2, "model_size": 96576768},
  }
  assert list(parse_llama_bench(json.dumps([llama_bench_test(16, 8, 50.0, 0.0)]))) == ["pp16+tg8"]


def test_parse_llama_batched_bench_table():
  rows = parse_batched_bench(BATCHED_BENCH_OUTPUT)
  assert [(r["B"], r["S_TG t/s"], r["S_PP t/s"]) for r in rows] == [(8, 193.03, 371.55), (32, 209.0, 367.82)]
  assert rows[1]["N_KV"] == 5120 and rows[0]["T_TG s"] == 5.305
  with pytest.raises(PeerFailed, match="no result table"):
    parse_batched_bench("llama_batched_bench: n_kv_max = 512\nmain: error\n")


def test_find_tools_names_what_is_missing(tmp_path: Path):
  tools, why = find_tools(tmp_path)
  assert tools == {} and why == f"llama-bench, llama-batched-bench, llama-server not found in {tmp_path}"
  for name in ("llama-bench", "llama-server"):
    (tmp_path / name).write_text("#!/bin/sh\n")
    (tmp_path / name).chmod(0o755)
  assert find_tools(tmp_path)[1] == f"llama-batched-bench not found in {tmp_path}"
  (tmp_path / "llama-batched-bench").write_text("#!/bin/sh\n")
  (tmp_path / "llama-batched-bench").chmod(0o755)
  tools, why = find_tools(tmp_path)
  assert why is None and tools["llama-server"] == str(tmp_path / "llama-server")


TINYVLLM = {
  "decode_1": 50.0,
  "decode_8": 190.0,
  "prefill": 450.0,
  "serve_1": 40.0,
  "serve_4": 120.0,
  "start_s": 60.0,
  "first_s": 70.0,
  "warmup_s": 130.0,
}
LLAMACPP = {
  "decode_1": 100.0,
  "decode_8": 190.0,
  "prefill": 250.0,
  "serve_1": 120.0,
  "start_s": 2.0,
  "first_s": 3.0,
}  # no serve_4


def report(tmp_path: Path, llamacpp: dict | None) -> tuple[dict, str]:
  gguf = tmp_path / "m.gguf"
  gguf.write_bytes(b"\0" * 1000)
  run = Run(
    "tinyvllm bench vs-llamacpp", "CPU", BenchModel("m", hf_config={"model_type": "llama"}), machine_info("CPU"), []
  )
  p = VsParams(gguf, 2, batch_sizes=(1, 8), concurrency=(1, 4))
  results = {"tinyvllm": {"metrics": TINYVLLM, "raw": {}}}
  skipped = {"llama.cpp": "llama-bench not found"} if llamacpp is None else {}
  if llamacpp is not None:
    results["llama.cpp"] = {"metrics": llamacpp, "raw": {}}
  return vs_report(run, p, results, skipped, bandwidth=1e5)


def table_rows(md: str) -> dict[str, list[str]]:
  lines = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
  return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in lines[1:]}


def test_report_ratio_and_bound(tmp_path: Path):
  data, md = report(tmp_path, LLAMACPP)
  rows = table_rows(md)
  assert rows["one sequence, decode tok/s (llama-bench tg128 / `bench profile` B=1)"] == [
    "100.0",
    "50.0",
    "0.50x",
    "100.0",  # 1 x 1e5 B/s / 1000 B
  ]
  assert rows["decode tok/s at 8 sequences (llama-batched-bench / `bench profile` B=8)"][2:] == ["1.00x", "800.0"]
  assert rows["prefill tok/s (llama-bench pp512 / 8 x 512-token prompts)"] == ["250.0", "450.0", "1.80x", "-"]
  serve_4 = "serving, output tok/s at concurrency 4 (`bench serve`: llama-server / serve-lite)"
  assert rows[serve_4] == ["-", "120.0", "-", "400.0"]
  assert rows["time from start to /health 200, s (lower is better)"] == ["2.0", "60.0", "30.00x", "-"]
  assert rows["time from start to the first completion (64 tokens), s (lower is better)"][2] == "23.33x"
  warmup = "time from start to warm-up done, s (serve-lite's background warm-up, before the serving levels)"
  assert rows[warmup] == ["-", "130.0", "-", "-"]  # llama-server has none
  assert "`tinyvllm bench speculative` measures it apart" in md
  assert data["preset"] == "vs-llamacpp" and data["weight_bytes"] == 1000 and data["skipped"] == {}


def test_report_without_llamacpp(tmp_path: Path):
  data, md = report(tmp_path, None)
  assert all(cells[0] == "-" and cells[2] == "-" for cells in table_rows(md).values())
  assert "Skipped llama.cpp: llama-bench not found" in md and list(data["results"]) == ["tinyvllm"]


class FakeProc:
  returncode = None

  def __init__(self, *args, **kwargs):
    pass

  def poll(self):
    return None

  def terminate(self):
    pass

  def wait(self, timeout=None):
    return 0


class WarmingServer:
  """A server's /health as the bench sees it: 503 while loading, then 200 with the warm-up's progress (serve-lite)
  or without (llama-server, serve-lite --no-warmup); one round more done per /health asked once it answers 200."""

  def __init__(self, rounds: int | None, loading: int = 1):
    self.rounds, self.loading, self.done, self.log = rounds, loading, 0, []

  def get(self, path: str):
    assert path == "/health"
    if self.loading:
      self.loading -= 1
      return 503, {"status": "loading"}
    if self.rounds is None:
      return 200, {"status": "ok"}
    body = {"status": "ok", "warmup": {"done": self.done, "rounds": self.rounds}}
    self.done = min(self.done + 1, self.rounds)
    return 200, body


def test_wait_warmed_up_polls_until_done_and_is_bounded(monkeypatch):
  import tinyvllm_cli.bench.vs_llamacpp as vs

  monkeypatch.setattr(vs.time, "sleep", lambda s: None)
  server = WarmingServer(rounds=3, loading=2)
  assert wait_warmed_up(server, FakeProc(), started=vs.now(), timeout=60) is not None and server.done == 3
  assert wait_warmed_up(WarmingServer(rounds=None, loading=0), FakeProc(), vs.now(), 60) is None  # no warm-up
  stuck = WarmingServer(rounds=10**9, loading=0)
  assert wait_warmed_up(stuck, FakeProc(), vs.now(), timeout=0.05) is None  # gave up: the levels run anyway


@pytest.mark.parametrize("wait_warmup", [True, False])
def test_serve_levels_run_after_the_warm_up_finished(monkeypatch, wait_warmup: bool):
  """serve-lite (wait_warmup): the first completion is timed as before, then the levels start only once /health says
  the warm-up finished, and warmup_s is that time; llama-server gets no wait and no warmup_s."""
  import tinyvllm_cli.bench.serve as bench_serve
  import tinyvllm_cli.bench.vs_llamacpp as vs

  server, order = WarmingServer(rounds=4), []

  class Target:
    def __init__(self, *args):
      pass

    def get(self, path):
      return server.get(path)

    def wait_ready(self):
      return "m"

    def stream(self, body):
      order.append(("first", server.done))

      class Ok:
        ok, error = True, None

      return Ok()

  def run_levels(target, model, config, out):
    order.append(("levels", server.done))
    return [{"concurrency": 1, "failed": 0, "output_throughput": 10.0}]

  monkeypatch.setattr(vs.subprocess, "Popen", FakeProc)
  monkeypatch.setattr(vs.time, "sleep", lambda s: None)
  monkeypatch.setattr(bench_serve, "Target", Target)
  monkeypatch.setattr(bench_serve, "run_levels", run_levels)
  served = serve_levels(["serve"], VsParams(Path("m.gguf"), 2, concurrency=(1,), timeout=60), wait_warmup)
  metrics = vs.serve_metrics(served)
  (_, first), (_, levels) = order  # rounds done when the first completion, then the levels, were sent
  if wait_warmup:
    assert first < 4 and levels == 4 and metrics["start_s"] <= metrics["first_s"] <= metrics["warmup_s"]
  else:
    assert levels == first < 4 and "warmup_s" not in metrics
  assert metrics["serve_1"] == 10.0


@pytest.mark.parametrize(
  "args, message",
  [
    (("--model", "toy"), "vs-llamacpp compares on one GGUF file: this model is the toy model (random weights)"),
    (("--quantize", "q4"), "--quantize 'q4': choose none, int8 or gguf"),
    (("--batch-sizes", "0"), "--batch-sizes '0': expected positive integers like 1,8,32"),
  ],
)
def test_bad_input_is_one_line(args: tuple[str, ...], message: str):
  r = CliRunner().invoke(app, ["bench", "vs-llamacpp", *args], env={"COLUMNS": "200", "NO_COLOR": "1"})
  assert r.exit_code != 0 and "Traceback" not in r.output
  assert f"error: {message}" in r.output, r.output


@pytest.fixture(scope="module")
def tiny_gguf(checkpoints, tmp_path_factory) -> Path:
  from gguf_writer import write_gguf

  path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf"
  write_gguf(path, checkpoints["llama"][0], "Q4_1")
  return path


def test_without_the_binaries_one_skip_line_and_tinyvllms_column(tmp_path: Path, tiny_gguf: Path):
  """Tiny settings on a tiny GGUF: profile, prefill and serve-lite (a process of its own) run; llama.cpp is one line."""
  out, empty = tmp_path / "results", tmp_path / "bin"
  empty.mkdir()
  tiny = ["--batch-sizes", "1", "--concurrency", "1", "--num-prompts", "1", "--max-tokens", "2", "--prefill-len", "8"]
  args = ["bench", "vs-llamacpp", "--model", str(tiny_gguf), "--llamacpp-bin", str(empty), *tiny, "--output", str(out)]
  r = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
  assert r.exit_code == 0 and "Traceback" not in r.output, r.output
  why = f"llama-bench, llama-batched-bench, llama-server not found in {empty}"
  assert [line for line in r.stderr.splitlines() if line.startswith("llama.cpp")] == [
    f"llama.cpp: {why}; its column is skipped"
  ]
  data = json.loads(next(out.glob("vs-llamacpp-*.json")).read_text())
  metrics = data["results"]["tinyvllm"]["metrics"]
  assert sorted(metrics) == ["decode_1", "first_s", "prefill", "serve_1", "start_s", "warmup_s"]
  assert min(metrics.values()) > 0 and metrics["warmup_s"] >= metrics["first_s"]  # the levels ran once warmed up
  assert data["skipped"] == {"llama.cpp": why} and "llama.cpp" not in data["results"]
  assert f"Skipped llama.cpp: {why}" in next(out.glob("vs-llamacpp-*.md")).read_text()
