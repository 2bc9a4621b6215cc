"""`tinyvllm bench speculative`: one sequence at a time, greedy, with and without prompt-lookup drafts, on a chat
workload (answers that rarely repeat the prompt) and an edit workload (the answer repeats a paragraph of the
prompt with small changes).
The same engine runs both (the draft count is read every step), so captured shapes and weights are shared."""

from __future__ import annotations

from tinyvllm_cli.bench.common import Run, markdown_table, now

CHAT = [
  "Explain in a few sentences why the sky is blue.",
  "Give me three tips for a good night's sleep.",
  "What is the difference between a list and a tuple in Python?",
]
TEXT = (
  "The quick brown fox jumps over the lazy dog. The dog wakes up and chases the fox across the field, but the fox is "
  "too fast and escapes into the forest. Later that evening the dog returns home, tired and hungry, and falls asleep "
  "by the fire while the rain begins to fall on the old wooden roof of the farmhouse."
)
EDIT = [  # the answer repeats the text with small changes: prompt lookup finds most of it in the prompt
  "Fix the spelling mistakes in this text and write out the corrected text:\n\n"
  + TEXT.replace("quick", "quik").replace("forest", "forrest").replace("hungry", "hungy"),
  "Copy this text word for word:\n\n" + TEXT,
  "Rewrite this text with 'cat' instead of 'dog' and write it out:\n\n" + TEXT,
]
WORKLOADS = {"chat": CHAT, "edit": EDIT}


def run_workload(engine, prompts: list[str], max_tokens: int) -> dict:
  """Each prompt alone, greedy: generated tokens, seconds, drafts verified and accepted."""
  from tinyvllm_core import SamplingParams

  before = engine.stats()
  tokens, seconds, outputs = 0, 0.0, []
  for prompt in prompts:
    ids = engine.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    start = now()
    engine.add_request(ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    while engine.has_unfinished_requests():
      for out in engine.step():
        if out.finished:
          tokens, outputs = tokens + len(out.token_ids), outputs + [out.token_ids]
    seconds += now() - start
  after = engine.stats()
  drafts, accepted = (after[k] - before[k] for k in ("num_draft_tokens", "num_accepted_drafts"))
  return {"tokens": tokens, "seconds": seconds, "drafts": drafts, "accepted": accepted, "outputs": outputs}


def run_speculative(run: Run, quantize: str | None, draft_counts: list[int], max_tokens: int) -> list[dict]:
  """Per workload and draft count (0 = off): tok/s, acceptance, and whether the tokens equal those without drafts."""
  from tinyvllm_core import LLMEngine

  engine = LLMEngine(run.model.files(run.device), device=run.device, quantize=quantize, kv_cache_gb=0.5)
  results = []
  for name, prompts in WORKLOADS.items():
    without = None
    for k in [0, *draft_counts]:
      engine.config.num_speculative_tokens = k
      for _ in range(2):  # untimed: the first captures the prompts' shapes, the second those of their cached prefixes
        run_workload(engine, prompts, max_tokens)  # (a timed run with a 3 s capture in it read 62 tok/s, not 186)
      r = run_workload(engine, prompts, max_tokens)
      without = without or r["outputs"]
      same = r.pop("outputs") == without
      results.append({"workload": name, "num_speculative_tokens": k, **r, "same_tokens_as_without": same})
  return results


def speculative_report(run: Run, results: list[dict]) -> tuple[dict, str]:
  base = {r["workload"]: r["tokens"] / r["seconds"] for r in results if r["num_speculative_tokens"] == 0}
  rows = []
  for r in results:
    tok_s = r["tokens"] / r["seconds"]
    acceptance = f"{r['accepted'] / r['drafts']:.0%}" if r["drafts"] else "-"
    speedup = f"{tok_s / base[r['workload']]:.2f}x"
    k = str(r["num_speculative_tokens"] or "off")
    rows.append(
      [r["workload"], k, str(r["tokens"]), f"{tok_s:.1f}", acceptance, speedup, str(r["same_tokens_as_without"])]
    )
  header = ["workload", "drafts/step", "tokens", "tok/s", "accepted", "vs off", "same tokens"]
  lines = [
    "One sequence at a time, greedy, chat template; prompt-lookup drafts (no draft model) verified in one step.",
    "",
    markdown_table(header, rows),
  ]
  data = run.data("speculative", results=results)
  return data, run.markdown("speculative", lines)
