"""`tinyvllm bench profile`: the decode step per batch size, its phases, its kernels by part of the model
(from tinygrad's DEBUG=2 lines) and the Python/host share; bad input is one `error:` line."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_factory import make_checkpoint
from test_cli_bench import bench, error_line, written

from tinyvllm_cli.bench.common import model_config_from_dict
from tinyvllm_cli.bench.profile import (
  CATEGORIES,
  OTHER,
  batch_summary,
  categorize_step,
  linear_shapes,
  noise_line,
  ProfileParams,
  one_penalty_width,
  one_width_from,
  parse_batch_sizes,
  parse_kernel_lines,
  with_estimates,
)

# what tinygrad 0.14 prints at DEBUG=2 (colours included), plus lines that are not kernels
DEBUG_OUTPUT = """\
\x1b[35m*** CPU      540\x1b[0m gather_rows                                    arg  3 mem   0.01 GB tm      5.25us/     0.66ms (      0 GFLOPS    0|0      GB/s)
jit execs 20 calls
\x1b[35m*** CPU      541\x1b[0m E\x1b[90m_\x1b[0m\x1b[97m2\x1b[0m\x1b[90m_\x1b[0m\x1b[97m16\x1b[0m\x1b[90m_\x1b[0m\x1b[33m4\x1b[0m                                       arg  5 mem   0.01 GB tm      6.08us/     0.11ms (      0 GFLOPS    0|0      GB/s)
*** CPU     5972 linear_32_576_576                              arg  3 mem   1.62 GB tm   \x1b[33m1604.26us\x1b[0m/     1.65ms (  15 GFLOPS    1|1      GB/s)
*** CPU     5973 linear_32_49152_576                            arg  3 mem   1.62 GB tm   \x1b[33m   12.50ms\x1b[0m/    14.15ms (  15 GFLOPS    1|1      GB/s)
*** CPU     5974 r_32_256_4                                     arg  2 mem   1.62 GB tm      11.00s /    25.15s  (  15 GFLOPS    1|1      GB/s)
*** CPU     5975 \x1b[33mcopy        4.00 KB,     CPU <- CLANG  \x1b[0m arg  2 mem   1.62 GB tm      3.00us/    25.15s  (   0 GFLOPS    0|0      GB/s)
JIT GRAPHing batch with 3 kernels
"""  # noqa: E501 (tinygrad's lines as printed)

TINY_CONFIG = {
  "architectures": ["LlamaForCausalLM"],
  "vocab_size": 384,
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_hidden_layers": 1,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 16,
}


def test_parse_kernel_lines_strips_colours_and_reads_units():
  assert parse_kernel_lines(DEBUG_OUTPUT) == [
    ("gather_rows", pytest.approx(5.25e-6)),
    ("E_2_16_4", pytest.approx(6.08e-6)),
    ("linear_32_576_576", pytest.approx(1604.26e-6)),
    ("linear_32_49152_576", pytest.approx(12.5e-3)),
    ("r_32_256_4", pytest.approx(11.0)),
    ("copy 4.00 KB, CPU <- CLANG", pytest.approx(3e-6)),
  ]
  assert parse_kernel_lines("jit execs 20 calls\nhello\n") == []


def test_categorize_one_decode_step():
  shapes = linear_shapes(
    model_config_from_dict(TINY_CONFIG)
  )  # qkv (128, 64), o (64, 64), gate_up (256, 64), down (64, 128), lm_head (384, 64)
  names = [
    "gather_rows",
    "r_2_16_4",
    "E_2_16_4",
    "linear_2_128_64",
    "E_2_4_8_2",
    "kv_write",
    "paged_qk",
    "r_4_2_16",
    "E_4_16_2",
    "paged_pv",
    "E_32_4",
    "linear_2_64_64",
    "E_2_16_4",
    "linear_2_256_64",
    "E_2_64_4",
    "linear_2_64_128",
    "E_32_4",
    "gather_rows",
    "r_2_16_4",
    "linear_2_384_64",
    "r_2_256_4",
    "r_2_256_4",
    "linear_2_7_5",
  ]
  cats = [c for c, _, _ in categorize_step([(n, 1e-6) for n in names], shapes)]
  assert cats == [
    "embedding",
    OTHER,
    OTHER,
    "qkv",
    OTHER,
    "attention",
    "attention",
    "attention",
    "attention",
    "attention",
    OTHER,
    "o",
    OTHER,
    "gate_up",
    OTHER,
    "down",
    OTHER,
    OTHER,
    OTHER,
    "lm_head",
    "sampling",
    "sampling",
    "other matmul",
  ]
  # o and down share a shape when intermediate_size == heads * head_dim: the order in the layer tells them apart
  same = linear_shapes(model_config_from_dict(TINY_CONFIG | {"intermediate_size": 64}))
  cats = [
    c
    for c, _, _ in categorize_step(
      [
        (n, 1e-6)
        for n in (
          "linear_1_128_64",
          "linear_1_64_64",
          "linear_1_128_64",
          "linear_1_64_64",
          "linear_1_128_64",
          "linear_1_64_64",
        )
      ],
      same,
    )
  ]
  assert cats == ["qkv", "o", "gate_up", "down", "qkv", "o"]  # gate_up (128, 64) == qkv's shape here too


def test_parse_batch_sizes():
  assert parse_batch_sizes("1,8,32") == [1, 8, 32] and parse_batch_sizes(" 4, 2,4 ,") == [4, 2]


def test_profile_tiny_model(tmp_path: Path):
  model = make_checkpoint(tmp_path / "tiny-llama", "llama", num_layers=1)
  out = tmp_path / "results"
  r = bench(
    "profile",
    "--model",
    str(model),
    "--device",
    "CPU",
    "--batch-sizes",
    "1,2",
    "--steps",
    "2",
    "--prompt-len",
    "4",
    "--warmup-steps",
    "1",
    "--kv-cache-gb",
    "0.01",
    "--output",
    str(out),
  )
  assert r.exit_code == 0, r.output
  data, md = written(out, "profile-tiny-llama-cpu-")
  assert data["preset"] == "profile" and data["dtype"] == "float32" and data["parameters"]["batch_sizes"] == [1, 2]
  assert {"load_average", "load_average_end", "tinygrad"} <= set(data["machine"])
  assert [row["batch_size"] for row in data["results"]] == [1, 2]
  for row in data["results"]:
    k = row["kernels"]
    assert row["timed_steps"] == 2 and row["warmup_steps"] >= 1 and row["step_s"] > 0
    assert row["tokens_per_s"] == pytest.approx(row["batch_size"] / row["step_s"])
    assert set(CATEGORIES) <= set(k["categories"]) and k["linears_ms"] > 0
    assert all(
      k["categories"][c]["ms"] > 0
      for c in ("embedding", "qkv", "o", "gate_up", "down", "lm_head", "attention", "sampling", OTHER)
    )
    assert sum(c["pct"] for c in k["categories"].values()) == pytest.approx(100, abs=0.01)
    assert k["per_step"][0] == k["per_step"][1] > 10
    assert 0 < row["python_share_pct"] < 100
    assert row["python_share_pct"] == pytest.approx(sum(h["pct_of_step"] for h in row["host"].values()))
  for text in (
    "# tinyvllm bench profile: tiny-llama on CPU",
    "| B=1 | B=2 |",
    "| **tokens/s** (B / step) |",
    "| linear: gate_up |",
    "| attention |",
    "| sampling |",
    "**Python / host share**",
    "What dominates:",
    "- B=2: ",
    "load average",
    "--batch-sizes 1,2",
  ):
    assert text in md, text


@pytest.mark.parametrize(
  "args, message",
  [
    (("--batch-sizes", "0"), "--batch-sizes '0': expected positive integers like 1,8,32"),
    (("--batch-sizes", "abc"), "--batch-sizes 'abc': expected positive integers"),
    (("--batch-sizes", "1,-4"), "--batch-sizes '1,-4'"),
    (("--random-weights", "--model", "nobody/nothing"), "nobody/nothing is not downloaded"),
    (("--random-weights", "--prompt-len", "9000"), "--prompt-len 9000 is not shorter than the model's context"),
    (("--device", "NO_SUCH_DEVICE"), "is not available"),
    (("--presence-penalty", "3"), "presence_penalty must be in [-2, 2]"),
    (("--repetition-penalty", "0"), "repetition_penalty must be > 0"),
  ],
)
def test_profile_bad_input_is_one_line(
  args: tuple[str, ...], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
  from huggingface_hub import constants

  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing pulled
  monkeypatch.setenv("TINYVLLM_HOME", str(tmp_path / "tinyvllm"))
  assert message in error_line(bench("profile", *args, "--output", str(tmp_path / "results")))
  assert not (tmp_path / "results").exists()


def test_host_share_from_timings():
  """Host share = schedule + prepare + (forward - kernel time) + postprocess + the rest of step(); where the kernel
  time comes out above the forward phase (noise), the overhead is floored at 0 and estimated from another batch size."""

  def row(b: int, wall: float, forward: float, kernel: float) -> dict:
    phases = {
      "schedule_s": [0.001] * 3,
      "prepare_s": [0.002] * 3,
      "forward_s": [forward] * 3,
      "postprocess_s": [0.001] * 3,
      "launch_s": [forward / 2] * 3,  # inside forward: counted nowhere else
    }
    debug = [
      [
        ("embedding", "gather_rows", 0.0),
        ("gate_up", "linear_1_256_64", kernel * 0.75),
        (OTHER, "E_1_16", kernel * 0.25),
      ]
    ] * 2
    return batch_summary(b, [wall] * 3, phases, debug, 2, 3, 40)

  small, big = row(8, 0.100, 0.095, 0.080), row(32, 0.400, 0.395, 0.410)
  assert small["host"]["launch_overhead"]["ms"] == pytest.approx(15) and small["python_share_pct"] == pytest.approx(20)
  assert small["host"]["outside_phases"]["ms"] == pytest.approx(1) and small["kernels"]["categories"]["gate_up"][
    "pct"
  ] == pytest.approx(75)
  assert (
    big["launch_overhead_floored"]
    and big["host"]["launch_overhead"]["ms"] == 0
    and big["python_share_pct"] == pytest.approx(1.25)
  )
  with_estimates([small, big])
  assert big["python_share_estimate"] == {
    "launch_overhead_ms": pytest.approx(15),
    "from_batch_size": 8,
    "python_share_pct": pytest.approx(5),
  }
  assert "below this run's noise" in noise_line(big) and "would be 5.0%" in noise_line(big)


def test_warm_up_runs_into_the_timed_steps_block_table_width():
  # widths (blocks of 16, padded to a power of 2): contexts 33-64 -> 4 blocks, 65-128 -> 8
  assert one_width_from(33, 13, 16) == 33 and one_width_from(52, 13, 16) == 52
  assert (
    one_width_from(53, 13, 16) == 65 and one_width_from(64, 13, 16) == 65
  )  # the first step at 65 captures width 8, untimed


def test_profile_with_penalties(tmp_path: Path):
  model = make_checkpoint(tmp_path / "tiny-llama", "llama", num_layers=1)
  out = tmp_path / "results"
  penalties = ("--repetition-penalty", "1.1", "--presence-penalty", "0.5", "--frequency-penalty", "0.5")
  sizes = ("--batch-sizes", "1,2", "--steps", "2", "--prompt-len", "4", "--warmup-steps", "1")
  options = ("--device", "CPU", *sizes, *penalties, "--kv-cache-gb", "0.01", "--output", str(out))
  r = bench("profile", "--model", str(model), *options)
  assert r.exit_code == 0, r.output
  data, md = written(out, "profile-tiny-llama-cpu-")
  parameters = data["parameters"]
  assert parameters["penalized"] and parameters["repetition_penalty"] == 1.1 and parameters["presence_penalty"] == 0.5
  for row in data["results"]:
    sampling = [k["name"] for k in row["kernels"]["by_name"] if k["category"] == "sampling"]
    assert "penalize" in sampling, sampling
    assert row["timing_attempts"] == 1  # the warm-up ran until the penalties' width stays for the timed steps
  assert "greedy, penalties: repetition penalty 1.1, presence penalty 0.5, frequency penalty 0.5;" in md


def test_penalty_width_must_stay_for_the_window():
  off = ProfileParams([1]).sampling(8)
  on = ProfileParams([1], repetition_penalty=1.1).sampling(8)
  prompt = [5, 6, 7]
  # the last step penalized the prompt and the output before its own token: 3 + 2 distinct = 5 -> width 8
  tokens = {"a": (prompt, [1, 2, 3]), "b": (prompt, [1])}
  assert one_penalty_width(on, tokens, 3) and not one_penalty_width(on, tokens, 4)
  assert one_penalty_width(off, tokens, 100) and one_penalty_width(on, {}, 100)
  assert ProfileParams([1]).penalties_text() == "no penalties"
