"""Device code (outside the engine's line budget, like vLLM's csrc/): paged attention, matmuls, penalties, CPU-only
tricks, and tinygrad's compiled-kernel cache made usable from every thread.

attention.py and linear.py run on every device; cpu.py is imported only when the engine runs on tinygrad's CPU."""

import threading


def _per_thread_tinygrad_cache() -> None:
  """tinygrad keeps one sqlite connection for its disk cache, usable only by the thread that opened it."""
  import tinygrad.helpers as helpers

  local, lock, open_connection = threading.local(), threading.Lock(), helpers.db_connection

  def db_connection():
    if getattr(local, "connection", None) is None:
      with lock:
        helpers._db_connection = None
        local.connection = open_connection()
    return local.connection

  helpers.db_connection = db_connection


_per_thread_tinygrad_cache()  # engine loops, model loaders and server threads all compile kernels
