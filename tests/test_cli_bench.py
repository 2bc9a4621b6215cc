"""`tinyvllm bench latency | throughput | memory`: each writes a JSON + markdown pair with the seed's table;
bad input is one `error:` line. The CLI runs in-process on tiny random-weight models (JIT capture dominates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from tinyvllm_cli.bench.common import TOY_CONFIG, random_weights, resolve_bench_model, shipped_configs
from tinyvllm_cli.bench.seed_tables import default_scale, scaled_workload
from tinyvllm_cli.bench.throughput import Workload
from tinyvllm_cli.main import app

TINY_QWEN3 = {
  "architectures": ["Qwen3ForCausalLM"],
  "model_type": "qwen3",
  "vocab_size": 512,
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 16,
  "max_position_embeddings": 512,
  "tie_word_embeddings": True,
}
SMALL = dict(num_seqs=3, input_len=(4, 8), output_len=(2, 4))  # few batch shapes: JIT capture is most of a run's time
SMALL_THROUGHPUT = (
  "--random-weights",
  "--num-seqs",
  "3",
  "--input-len",
  "4",
  "8",
  "--output-len",
  "2",
  "4",
  "--kv-cache-gb",
  "0.01",
)


def bench(*args: str):
  return CliRunner().invoke(app, ["bench", *args], prog_name="tinyvllm", env={"COLUMNS": "200", "NO_COLOR": "1"})


def written(out: Path, prefix: str) -> tuple[dict, str]:
  """The one JSON + markdown pair a run wrote, named <preset>-<model>-<device>-<timestamp>."""
  files = sorted(out.iterdir())
  assert [f.suffix for f in files] == [".json", ".md"] and files[0].stem == files[1].stem, files
  assert files[0].name.startswith(prefix), files[0].name
  return json.loads(files[0].read_text()), files[1].read_text()


def error_line(r) -> str:
  assert r.exit_code == 1 and "Traceback" not in r.output, r.output
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  return lines[0]


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
  (path := tmp_path / "tiny-qwen3.json").write_text(json.dumps(TINY_QWEN3))
  return path


# ---- latency ---------------------------------------------------------------------------------


def test_latency_toy_writes_the_seed_table(tmp_path: Path):
  out = tmp_path / "results"
  r = bench(
    "latency",
    "--device",
    "CPU",
    "--num-requests",
    "2",
    "--prompt-len",
    "4",
    "--max-tokens",
    "3",
    "--kv-cache-gb",
    "0.01",
    "--output",
    str(out),
    "--json",
    "--note",
    "shared CPU",
  )
  assert r.exit_code == 0, r.output
  data, md = written(out, "latency-toy-cpu-")
  assert json.loads(r.stdout) == data
  rows = {row["name"]: row for row in data["results"]}
  assert list(rows) == ["single_request", "sequential_2", "concurrent_2"]
  for row in rows.values():
    assert [q["output_tokens"] for q in row["requests"]] == [3] * row["num_requests"]
    assert all(0 <= q["arrival"] <= q["first_token"] <= q["finish"] for q in row["requests"])
    assert row["tokens_per_s"] > 0 and row["mean_ttft_s"] > 0 and row["mean_tpot_s"] > 0
  speedup = rows["concurrent_2"]["tokens_per_s"] / rows["sequential_2"]["tokens_per_s"]
  assert data["concurrent_vs_sequential_speedup"] == pytest.approx(speedup)
  assert data["model"]["config"]["hidden_size"] == TOY_CONFIG["hidden_size"] and data["device"] == "CPU"
  assert {"platform", "cpu_count", "tinygrad", "tinyvllm", "python", "tinygrad_backend"} <= set(data["machine"])
  assert data["parameters"]["max_tokens"] == 3 and data["notes"] == ["shared CPU"]
  assert data["decode_bound"]["weight_bytes_per_step"] > 0 and "Decode bound:" in md
  for text in (
    "| single_request |",
    "| sequential_2 |",
    "| concurrent_2 |",
    "Mean TTFT",
    f"Concurrent vs Sequential: **{speedup:.2f}x** speedup",
    "--num-requests 2",
    "Note: shared CPU",
  ):
    assert text in md


# ---- throughput ------------------------------------------------------------------------------


def test_workload_is_nano_vllms():
  """The seed's table (001): 256 sequences, 142,827 input and 133,966 generated tokens."""
  w = Workload.nano_vllm(256, (100, 1024), (100, 1024), vocab_size=151936)
  assert (len(w.prompts), w.input_tokens, w.gen_tokens) == (256, 142827, 133966)
  assert max(max(p) for p in w.prompts) <= 10000
  small = Workload.nano_vllm(8, (4, 6), (2, 3), vocab_size=50)
  assert all(4 <= len(p) <= 6 and max(p) < 50 for p in small.prompts) and all(2 <= n <= 3 for n in small.output_lens)
  other = small.other_tokens()
  assert [len(p) for p in other.prompts] == [len(p) for p in small.prompts]
  assert all(a != b for p, q in zip(small.prompts, other.prompts) for a, b in zip(p, q))


def test_throughput_random_weights_with_a_peer_that_cannot_run(tmp_path: Path, tiny_config: Path):
  out = tmp_path / "results"
  r = bench(
    "throughput",
    "--model",
    str(tiny_config),
    *SMALL_THROUGHPUT,
    "--compare",
    "nanovllm",
    "--device",
    "CPU",
    "--output",
    str(out),
  )
  assert r.exit_code == 0, r.output
  skipped = [line for line in r.stderr.splitlines() if line.startswith("nanovllm")]
  assert len(skipped) == 1 and skipped[0].endswith("; skipped"), r.stderr
  data, md = written(out, "throughput-tiny-qwen3-random-cpu-")
  expected = Workload.nano_vllm(**SMALL, vocab_size=512)
  res = data["results"]["tinyvllm"]
  assert list(data["results"]) == ["tinyvllm"] and "nanovllm" in data["skipped"]
  assert (res["num_seqs"], res["input_tokens"], res["gen_tokens"]) == (3, expected.input_tokens, expected.gen_tokens)
  assert [q["output_tokens"] for q in res["requests"]] == expected.output_lens
  assert res["gen_throughput"] == pytest.approx(res["gen_tokens"] / res["duration"])
  assert data["parameters"]["input_len"] == [4, 8] and data["model"]["random_weights"] is True
  assert (
    data["parameters"]["dtype"] == "auto"
    and res["info"]["engine"]["dtype"] == "auto"
    and res["info"]["dtype"] == "float32"
  )
  for row in (
    "Total Sequences",
    "Total Input Tokens",
    "Total Gen Tokens",
    "Total Duration",
    "Gen Throughput",
    "Total Throughput",
  ):
    assert f"| **{row}** |" in md
  assert "| Metric | tinyvllm |" in md and "Skipped nanovllm:" in md


def test_throughput_int8_weights_column(tmp_path: Path, tiny_config: Path):
  out = tmp_path / "results"
  r = bench(
    "throughput",
    "--model",
    str(tiny_config),
    *SMALL_THROUGHPUT,
    "-q",
    "none",
    "-q",
    "int8",
    "--device",
    "CPU",
    "--output",
    str(out),
  )
  assert r.exit_code == 0, r.output
  data, md = written(out, "throughput-tiny-qwen3-random-cpu-")
  assert (
    list(data["results"]) == ["tinyvllm", "tinyvllm int8"]
    and data["results"]["tinyvllm int8"]["info"]["engine"]["quantize"] == "int8"
  )
  bad = bench("throughput", "--model", str(tiny_config), "-q", "int4")
  assert bad.exit_code == 1 and "--quantize 'int4': choose none, int8 or gguf" in bad.output


def test_throughput_several_models_and_counts_in_one_table(tmp_path: Path, tiny_config: Path):
  out = tmp_path / "results"
  sizes = ("--num-seqs", "1", "--num-seqs", "2", "--input-len", "4", "8", "--output-len", "2", "4")
  models = ("--model", str(tiny_config), "--model", "toy", "--random-weights")
  r = bench("throughput", *models, *sizes, "--kv-cache-gb", "0.01", "--device", "CPU", "--output", str(out))
  assert r.exit_code == 0, r.output
  data, md = written(out, "throughput-tiny-qwen3-random-and-1-more-cpu-")
  assert [m["name"] for m in data["models"]] == ["tiny-qwen3", "toy"]
  assert data["parameters"]["num_seqs"] == [1, 2] and [w["num_seqs"] for w in data["workloads"]] == [1, 2]
  for name, vocab in (("tiny-qwen3", 512), ("toy", 1024)):
    for n in (1, 2):
      res = data["results"][f"tinyvllm ({name}, {n} seqs)"]
      assert res["gen_tokens"] == sum(Workload.nano_vllm(n, (4, 8), (2, 4), vocab).output_lens)
  toy = data["results"]["tinyvllm (toy, 1 seqs)"]["info"]["weight_bytes"]
  assert toy == 4 * (2 * 1024 * 64 + 64 + 4 * (4 * 64 * 64 + 3 * 64 * 256 + 2 * 64))  # float32, untied embeddings
  assert "| Model | Backend | Weights | Gen tok/s, 1 seq | Gen tok/s, 2 seqs |" in md
  assert (
    f"| toy | tinyvllm | {toy / 1e6:,.1f} MB |" in md and "# tinyvllm bench throughput: tiny-qwen3, toy on CPU" in md
  )


def test_throughput_float16_reaches_the_engine_and_the_report(
  tmp_path: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch
):
  import tinyvllm_core
  from tinygrad import dtypes

  LLMEngine, engines = tinyvllm_core.LLMEngine, []
  monkeypatch.setattr(tinyvllm_core, "LLMEngine", lambda *a, **kw: engines.append(LLMEngine(*a, **kw)) or engines[-1])
  out = tmp_path / "results"
  r = bench(
    "throughput",
    "--model",
    str(tiny_config),
    *SMALL_THROUGHPUT,
    "--dtype",
    "float16",
    "--device",
    "CPU",
    "--output",
    str(out),
  )
  assert r.exit_code == 0, r.output
  data, md = written(out, "throughput-tiny-qwen3-random-cpu-")
  res = data["results"]["tinyvllm float16"]
  assert list(data["results"]) == ["tinyvllm float16"] and data["parameters"]["dtype"] == "float16"
  assert res["info"]["engine"]["dtype"] == res["info"]["dtype"] == "float16" and res["gen_tokens"] == sum(
    Workload.nano_vllm(**SMALL, vocab_size=512).output_lens
  )
  model = engines[0].runner.model
  assert model.dtype == dtypes.float16 and model.layer_inputs[0]["k_pool"].dtype == dtypes.float16
  assert "| Metric | tinyvllm float16 |" in md


def test_throughput_transformers_vs_a_missing_backend(tmp_path: Path, tiny_config: Path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = tmp_path / "results"
  r = bench(
    "throughput",
    "--model",
    str(tiny_config),
    *SMALL_THROUGHPUT,
    "--backend",
    "transformers",
    "--compare",
    "vllm",
    "--output",
    str(out),
    "--json",
  )
  assert r.exit_code == 0, r.output
  assert len([line for line in r.stderr.splitlines() if line.startswith("vllm: ")]) == 1, r.stderr
  data, md = written(out, "throughput-tiny-qwen3-random-")
  res = data["results"]["transformers"]
  expected = Workload.nano_vllm(**SMALL, vocab_size=512)
  assert (res["input_tokens"], res["gen_tokens"]) == (expected.input_tokens, expected.gen_tokens)
  assert res["info"]["computed_gen_tokens"] >= res["gen_tokens"] and "random weights" in md


# ---- memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "args", [(), ("--model", "Qwen/Qwen3-0.6B", "--kv-cache-gb", "4", "--max-model-len", "4096", "--block-size", "32")]
)
def test_memory_paged_fits_more_than_naive(tmp_path: Path, args: tuple[str, ...]):
  out = tmp_path / "results"
  r = bench("memory", "--device", "CPU", *args, "--output", str(out), "--json")
  assert r.exit_code == 0, r.output
  data, md = written(out, "memory-")
  naive, paged, lay = data["results"]["naive"], data["results"]["paged"], data["layout"]
  mml, bs = data["parameters"]["max_model_len"], data["parameters"]["block_size"]
  assert paged["sequences"] >= naive["sequences"] >= 1
  assert (
    paged["block_manager_sequences"] == paged["sequences"] and naive["block_manager_sequences"] == naive["sequences"]
  )
  assert naive["reserved_tokens"] == naive["sequences"] * -(-mml // bs) * bs <= lay["slots"]
  assert paged["used_tokens"] <= paged["reserved_tokens"] <= lay["slots"]
  assert paged["reserved_tokens"] - paged["used_tokens"] < paged["sequences"] * bs  # waste < one block per sequence
  assert 0 <= paged["wasted_fraction"] < naive["wasted_fraction"] < 1
  assert data["paged_vs_naive_sequences"] == pytest.approx(paged["sequences"] / naive["sequences"])
  assert "Paged vs naive:" in md and "agrees with the arithmetic" in md


# ---- models and bad input --------------------------------------------------------------------


def test_shipped_configs_parse_and_build_random_weights():
  assert set(shipped_configs()) == {
    "Qwen/Qwen3-0.6B",
    "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "meta-llama/Llama-3.2-1B",
  }
  shapes = {name: resolve_bench_model(name, random_weights=True).model_config() for name in shipped_configs()}
  assert (
    shapes["Qwen/Qwen3-0.6B"].family,
    shapes["Qwen/Qwen3-0.6B"].num_layers,
    shapes["Qwen/Qwen3-0.6B"].head_dim,
  ) == ("qwen3", 28, 128)
  assert shapes["meta-llama/Llama-3.2-1B"].hidden_size == 2048
  assert resolve_bench_model("smollm2", random_weights=True).model_config().num_kv_heads == 3
  mc = resolve_bench_model("toy", random_weights=False).model_config()
  w = random_weights(mc, "CPU")
  assert w["embed"].shape == (1024, 64) and w["lm_head"] is not w["embed"] and w["layers.3.qkv"].shape == (3 * 64, 64)
  assert w["layers.0.gate_up"].shape == (512, 64) and w["layers.0.down"].shape == (64, 256) and "layers.4.o" not in w
  q = random_weights(resolve_bench_model("Qwen/Qwen3-0.6B", random_weights=True).model_config(), "CPU")
  assert (
    q["lm_head"] is q["embed"]
    and q["layers.0.q_norm"].shape == (128,)
    and q["layers.0.qkv"].shape == ((16 + 16) * 128, 1024)
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (("throughput", "--backend", "tgi"), "unknown backend 'tgi'"),
    (("throughput", "--compare", "nope"), "unknown backend 'nope'"),
    (("throughput", "--random-weights", "--input-len", "10", "5"), "--input-len 10 5"),
    (("throughput", "--random-weights", "--output-len", "0", "5"), "--output-len 0 5"),
    (
      ("throughput", "--model", "toy", "--input-len", "100", "2000", "--output-len", "10", "100"),
      "exceeds the model's context",
    ),
    (("throughput", "--random-weights", "--model", "nobody/nothing"), "nobody/nothing is not downloaded"),
    (("throughput", "--model", "Qwen/Qwen3-0.6B"), "--random-weights"),
    (("throughput", "--random-weights", "--warmup", "some"), "--warmup"),
    (
      ("throughput", "--random-weights", "--dtype", "fp16"),
      "--dtype 'fp16': choose auto, float32, float16 or bfloat16",
    ),
    (("latency", "--model", "/no/such/model.gguf"), "no such model folder or .gguf file"),
    (("latency", "--device", "NO_SUCH_DEVICE"), "is not available"),
    (("memory", "--model", "/no/such/config.json"), "no such config file"),
    (("memory", "--kv-cache-gb", "0.001", "--max-model-len", "8192"), "less than one --max-model-len"),
    (("--full", "--scale", "2"), "--full and --scale: give one"),
    (("--device", "CPU", "latency"), "--device goes after the preset's name (`tinyvllm bench latency --device"),
    (("--device", "NO_SUCH_DEVICE"), "is not available"),
  ],
)
def test_bad_input_is_one_line(args: tuple[str, ...], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing pulled
  monkeypatch.setenv("TINYVLLM_HOME", str(tmp_path / "tinyvllm"))
  assert message in error_line(bench(*args, "--output", str(tmp_path / "results")))
  assert not (tmp_path / "results").exists()


# ---- the seed tables in one go ---------------------------------------------------------------


def test_bench_help_shows_the_seed_tables_command_first():
  r = bench("--help")
  assert r.exit_code == 0, r.output
  first_lines = r.output.split("Options")[0]
  assert "tinyvllm bench --device X` runs the seed tables in one go" in " ".join(first_lines.split())


def test_seed_workload_scale():
  assert scaled_workload(1) == {"num_seqs": 256, "lengths": (100, 1024)}
  assert scaled_workload(8) == {"num_seqs": 32, "lengths": (12, 128)}
  assert scaled_workload(1000) == {"num_seqs": 1, "lengths": (1, 1)}
  assert default_scale("CPU") == 8 and default_scale("METAL") == 2 and default_scale("CUDA:1") == 2


def test_bench_device_writes_both_seed_tables(tmp_path: Path):
  out = tmp_path / "results"
  args = ("--device", "CPU", "--model", "toy", "--scale", "64", "--kv-cache-gb", "0.01", "--output", str(out))
  r = bench(*args, "--note", "shared CPU")
  assert r.exit_code == 0, r.output
  scale_text = "seed 001's workload scaled 1/64 for CPU: 4 sequences, prompts and outputs of 1-16 tokens"
  assert scale_text in r.stdout
  files = sorted(f.name for f in out.iterdir())
  assert [f.split("-")[0] for f in files] == ["latency"] * 2 + ["throughput"] * 2, files
  assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md"] * 2, files
  latency = json.loads((out / files[0]).read_text())
  throughput = json.loads((out / files[2]).read_text())
  ran_by = "run by `tinyvllm bench --model toy --device CPU --scale 64 --kv-cache-gb 0.01 --output"
  assert latency["preset"] == "latency" and latency["device"] == "CPU" and latency["model"]["name"] == "toy"
  assert [row["name"] for row in latency["results"]] == ["single_request", "sequential_5", "concurrent_5"]
  assert latency["command"].startswith("tinyvllm bench latency --model toy --device CPU --kv-cache-gb 0.01")
  assert latency["notes"][0] == "shared CPU" and latency["notes"][1].startswith(ran_by)
  assert throughput["preset"] == "throughput" and throughput["workload"]["num_seqs"] == 4
  assert throughput["parameters"]["input_len"] == [1, 16] and throughput["parameters"]["output_len"] == [1, 16]
  assert throughput["results"]["tinyvllm"]["gen_tokens"] == throughput["workload"]["gen_tokens"] > 0
  assert "--num-seqs 4 --input-len 1 16 --output-len 1 16" in throughput["command"]
  assert any(scale_text in note for note in throughput["notes"])
  markdown = (out / files[3]).read_text()
  assert "| **Gen Throughput** |" in markdown and "scaled 1/64 for CPU" in markdown


def test_speculative_compares_drafts_with_none_on_both_workloads(tmp_path: Path):
  """The embedded SmolLM2, a few tokens per prompt: both workloads with and without drafts, the same greedy tokens,
  and the drafts counted."""
  result = bench("speculative", "--max-tokens", "12", "-k", "3", "-o", str(tmp_path), "--json")
  assert result.exit_code == 0, result.output
  data = json.loads(result.stdout[result.stdout.index("{") :])
  rows = {(r["workload"], r["num_speculative_tokens"]): r for r in data["results"]}
  assert set(rows) == {("chat", 0), ("chat", 3), ("edit", 0), ("edit", 3)}
  assert all(r["same_tokens_as_without"] and r["tokens"] > 0 for r in rows.values())
  assert rows[("edit", 3)]["drafts"] > 0 and rows[("chat", 0)]["drafts"] == 0
  assert len(list(tmp_path.glob("speculative-*.md"))) == 1
