"""Time from starting `tinyvllm serve-lite` until /health answers 200, then the first chat request's latency and when
the background warm-up ends.

Starts the real command on port 0 (the port it bound is read from its first line, so no other server can take it
meanwhile), polls /health every 50 ms, sends one chat request at once (greedy, 16 tokens: it waits for what it needs,
the shapes it uses and any warm-up step in flight), then waits for serve-lite's "warm-up done" line and stops it with
Ctrl+C. A warm start uses tinygrad's disk cache as it is (~/.cache/tinygrad/cache.db); the first of several runs warms
it. PYTHONPATH picks the tinyvllm that runs (a checkout's src/ to compare with another).

  python3 scripts/time_to_health.py                           # three runs
  python3 scripts/time_to_health.py --runs 1 -- --no-warmup   # arguments after -- go to tinyvllm serve-lite
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import queue
import re
import subprocess
import sys
import threading
import time

REQUEST = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}


def get(port: int, method: str, path: str, body: dict | None = None, timeout: float = 2.0) -> tuple[int, dict]:
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    data = json.dumps(body).encode() if body else None
    conn.request(method, path, data, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")
  finally:
    conn.close()


def wait_healthy(proc: subprocess.Popen, port: int) -> None:
  while proc.poll() is None:
    try:
      if get(port, "GET", "/health")[0] == 200:
        return
    except OSError:
      pass
    time.sleep(0.05)
  raise SystemExit(f"serve-lite exited with {proc.returncode} before /health answered 200")


def one_run(extra: list[str], warmup_timeout: float) -> dict[str, float | None]:
  start = time.perf_counter()
  cmd = [sys.executable, "-m", "tinyvllm_cli", "serve-lite", "--port", "0", "--quiet", "--served-model-name", "m"]
  proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
  ports: queue.Queue = queue.Queue()
  done = threading.Event()
  times: dict[str, float | None] = {"warmup_done_s": None}

  def read_lines() -> None:
    for line in proc.stdout:
      if found := re.search(r"http://127\.0\.0\.1:(\d+)/v1", line):
        ports.put(int(found.group(1)))
      if line.startswith("warm-up done"):
        times["warmup_done_s"] = time.perf_counter() - start
        done.set()

  threading.Thread(target=read_lines, daemon=True).start()
  try:
    port = ports.get(timeout=60)
    wait_healthy(proc, port)
    times["health_s"] = time.perf_counter() - start
    status, reply = get(port, "POST", "/v1/chat/completions", REQUEST | {"model": "m", "temperature": 0}, 600)
    times["first_request_s"] = time.perf_counter() - start - times["health_s"]
    assert status == 200, reply
    done.wait(warmup_timeout if "--no-warmup" not in extra else 0)
  finally:
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--warmup-timeout", type=float, default=300.0, help="seconds to wait for the warm-up's end")
  parser.add_argument("serve_args", nargs="*", help="arguments for tinyvllm serve-lite (after --)")
  args = parser.parse_args()
  for i in range(args.runs):
    t = one_run(args.serve_args, args.warmup_timeout)
    warm = "-" if t["warmup_done_s"] is None else f"{t['warmup_done_s']:.1f} s"
    load = os.getloadavg()[0]
    print(
      f"run {i + 1}: /health 200 after {t['health_s']:.1f} s, first request {t['first_request_s']:.1f} s, "
      f"warm-up done after {warm} (load average {load:.1f})",
      flush=True,
    )


if __name__ == "__main__":
  main()
