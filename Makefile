# One-command setup and test. `make test` installs everything it needs (Python venv + local js-ipfs daemon).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL := 3
export TF_ENABLE_ONEDNN_OPTS := 0

.PHONY: setup chromium lint test fuzz demo bench bench-strategies clean

setup: $(VENV)/.installed node_modules/.installed chromium

# Headless Chromium for the dashboard's browser test (Playwright drives Debian's build; it downloads none).
chromium:
	@test -x /usr/bin/chromium || apt-get install -y -q chromium || sudo -n apt-get install -y -q chromium \
		|| { apt-get update -q && apt-get install -y -q chromium; } \
		|| { sudo -n apt-get update -q && sudo -n apt-get install -y -q chromium; } \
		|| echo "chromium not installed: tests/test_dashboard_browser.py will fail and say so"

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The local IPFS daemon (js-ipfs) used when no Kubo `ipfs` binary is on PATH.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: setup
	$(PY) -m ruff check grid_ipfs tests examples benchmarks

test: setup lint
	$(PY) -m pytest

# The fuzz targets of tests/test_fuzz.py with a long budget (make test runs them briefly).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_fuzz.py -q -p no:cacheprovider

demo: setup
	$(PY) -m grid_ipfs.demo

# Fashion-MNIST (for overhead_cnn) comes from Debian's dataset-fashion-mnist; without it that benchmark records why.
bench: setup
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@test -d /usr/share/datasets/fashion-mnist || apt-get install -y -q dataset-fashion-mnist \
		|| sudo -n apt-get install -y -q dataset-fashion-mnist || echo "dataset-fashion-mnist not installed"
	$(PY) -m benchmarks.run

# Only the strategies benchmark (about 5 min); the other sections of RESULTS.md are carried over.
bench-strategies: setup
	$(PY) -m benchmarks.run --only strategies

clean:
	rm -rf $(VENV) node_modules .pytest_cache build *.egg-info
