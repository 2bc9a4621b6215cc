"""Device code (outside the engine's line budget, like vLLM's csrc/): paged attention, matmuls, CPU-only tricks.

attention.py and linear.py run on every device; cpu.py is imported only when the engine runs on tinygrad's CPU."""
