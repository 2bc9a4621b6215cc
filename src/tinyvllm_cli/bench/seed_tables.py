"""`tinyvllm bench --device X`: the seed tables in one go, each run as its preset (`bench latency`, then
`bench throughput` on seed 001's workload scaled to what the device finishes in a few minutes) and written as the
preset writes it."""

from __future__ import annotations

from pathlib import Path

import typer

from tinyvllm_cli import ui
from tinyvllm_cli.bench.common import invocation
from tinyvllm_cli.models import EMBEDDED_ALIAS, last_pulled

# seed 001 (nano-vllm's bench.py): 256 sequences, prompts and outputs of 100-1024 tokens
SEED_NUM_SEQS = 256
SEED_LENGTHS = (100, 1024)
# the throughput workload is divided by this: SmolLM2-135M on a 2-core CPU finishes 1/8 (32 sequences of 12-128
# tokens, warm-up included) in about two minutes; a GPU backend gets half (128 sequences of 50-512)
CPU_SCALE = 8
OTHER_SCALE = 2


def default_scale(device: str) -> int:
  return CPU_SCALE if device.split(":")[0] == "CPU" else OTHER_SCALE


def scaled_workload(scale: int) -> dict:
  """Seed 001's sequence count and length ranges divided by `scale` (at least 1 each)."""
  lengths = tuple(max(1, n // scale) for n in SEED_LENGTHS)
  return {"num_seqs": max(1, SEED_NUM_SEQS // scale), "lengths": lengths}


def scale_line(scale: int, device: str, workload: dict) -> str:
  low, high = workload["lengths"]
  what = f"{workload['num_seqs']} sequences, prompts and outputs of {low}-{high} tokens"
  if scale == 1:
    return f"Throughput on seed 001's full workload: {what}."
  return (
    f"Throughput on seed 001's workload scaled 1/{scale} for {device}: {what} "
    f"(`--full`: {SEED_NUM_SEQS} sequences of {SEED_LENGTHS[0]}-{SEED_LENGTHS[1]} tokens)."
  )


def default_model() -> str:
  """What the other commands run without --model: the last pulled model, else the embedded SmolLM2."""
  pulled = last_pulled()
  return pulled[0] if pulled else EMBEDDED_ALIAS


def run_preset(ctx: typer.Context, name: str, args: list[str]) -> None:
  """Run `tinyvllm bench <name> <args>` in this process, as if typed (its report records that command)."""
  command = ctx.command.get_command(ctx, name)
  with command.make_context(name, args, parent=ctx) as preset_ctx:
    command.invoke(preset_ctx)


def run_seed_tables(
  ctx: typer.Context,
  model: str | None,
  device: str | None,
  scale: int | None,
  kv_cache_gb: float,
  output: Path,
  notes: list[str],
) -> None:
  from tinyvllm_core import resolve_device

  dev = resolve_device(device)
  model = model or default_model()
  scale = scale or default_scale(dev)
  workload = scaled_workload(scale)
  low, high = workload["lengths"]
  scale_text = scale_line(scale, dev, workload)
  ran_by = f"run by `{invocation(ctx)}` (the seed tables in one go)"
  common = ["--model", model, "--device", dev, "--kv-cache-gb", str(kv_cache_gb), "--output", str(output)]
  note_args = [arg for note in [*notes, ran_by] for arg in ("--note", note)]
  ui.say(f"Seed tables on {dev} ({model}): the latency table, then the throughput table. {scale_text}\n")
  run_preset(ctx, "latency", [*common, *note_args])
  sizes = ["--num-seqs", str(workload["num_seqs"]), "--input-len", str(low), str(high)]
  sizes += ["--output-len", str(low), str(high)]
  ui.say(scale_text + "\n")
  run_preset(ctx, "throughput", [*common, *sizes, *note_args, "--note", scale_text])
