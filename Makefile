# The two commands a newcomer needs: `make demo` and `make test`. Each makes its own venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow lint typecheck bench bench-accuracy bench-elpv broker browser datasets elpv clean

# Where torch comes from: PyTorch's CPU wheel index by default (torch==2.13.0+cpu, a 190 MB wheel; on public PyPI
# a plain torch==2.13.0 is the CUDA build with gigabytes of NVIDIA wheels). A GPU machine: TORCH_INDEX set to the
# index of its CUDA version (https://download.pytorch.org/whl/cu128 ...), or empty for PyPI's default CUDA build.
# An index that does not answer within seconds is left out with one line (scripts/torch_index.py), so a machine
# that reaches only the public registries installs without minutes of retries.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $$($(PYTHON) scripts/torch_index.py '$(TORCH_INDEX)') \
	  -e '.[train,dev]'
	# tensorrt-stubs declares tensorrt itself as a dependency, which cannot install without NVIDIA's index
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps tensorrt-stubs
	# ...and ships no py.typed and five invalid signatures: without this mypy treats every TensorRT name as Any
	$(BIN)/python scripts/patch_tensorrt_stubs.py
	touch $@

venv: $(STAMP)

# Mosquitto is the broker the tests and the demo talk to (Debian package).
broker:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto >/dev/null; }

# Chromium and its WebDriver (Debian packages): the live page's test opens it in a real browser.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver (Debian packages)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# Fashion-MNIST for the accuracy protocols (Debian package: idx gz files under /usr/share/datasets/fashion-mnist/).
datasets:
	@test -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz || { \
	  echo "installing dataset-fashion-mnist (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }

# elpv solar cells for the surface protocol (PyPI package: labels.csv + 2624 grey PNGs, ~90 MB, into the venv).
# Only this target installs it: the tests that need it skip, with this command as the reason, when it is absent.
ELPV := elpv-dataset==1.0.0.post1
elpv: $(STAMP)
	@$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('elpv_dataset') is None)" || { \
	  echo "installing $(ELPV) (PyPI) into $(VENV)"; \
	  $(BIN)/pip install --quiet --disable-pip-version-check '$(ELPV)'; }

demo: $(STAMP) broker
	$(BIN)/python scripts/demo.py

# The test files run on TEST_WORKERS processes (pytest-xdist; each file on one worker, so a file's fitted bundle is
# shared by its tests), each worker pinned to its share of the cores; TEST_WORKERS=0 runs them in this one process.
# The 15 slowest tests are listed last: the suite should stay under 10 minutes on 2 idle cores.
TEST_WORKERS ?= 2
test: $(STAMP) broker browser datasets lint typecheck
	$(BIN)/pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15

test-slow: $(STAMP) broker datasets
	$(BIN)/pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check core edge trainer tests benchmarks scripts

typecheck: $(STAMP)
	$(BIN)/mypy --ignore-missing-imports core edge trainer benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

bench-accuracy: $(STAMP) datasets
	$(BIN)/python benchmarks/accuracy_synthetic.py
	$(BIN)/python benchmarks/protocol.py --dataset fashion-mnist --protocol one-normal --model patchcore --seeds 3 --train-limit 1000 --test-limit 2000 --size 64

# PatchCore and PaDiM as shipped on the elpv mono and poly cells, 3 seeds each (about an hour on 2 CPU cores).
bench-elpv: $(STAMP) elpv
	$(BIN)/python benchmarks/protocol.py --dataset elpv --cell mono,poly --models patchcore,padim --seeds 3 --threads 1

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
