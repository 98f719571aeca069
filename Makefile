# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# PyTorch's CPU-only wheels; a plain `torch` requirement pulls the multi-GB CUDA build on Linux.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv demo test lint proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of PyTorch from TORCH_INDEX; where that index cannot be reached, whatever the
	# configured index offers (--retries 0 --timeout 15: an unreachable index fails fast).
	$(PY) -m pip install -q --retries 0 --timeout 15 torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX) \
		|| $(PY) -m pip install -q torch==$(TORCH_VERSION) \
		|| echo "PyTorch not installed: its tests will be skipped"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q -e '.[paddle]' || echo "PaddlePaddle not installed: its tests will be skipped"
	# transformers & co. for hf: teachers, after torch and with it pinned, so pip keeps its CPU build.
	$(PY) -c 'import torch' 2>/dev/null && $(PY) -m pip install -q -e '.[llm]' torch==$(TORCH_VERSION) \
		|| echo "transformers not installed: the hf: teacher tests will be skipped"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/distill demo

# Redis and etcd servers are needed by the discovery tests (the tests start their own instances),
# Chromium and chromedriver by the dashboard's browser test, promtool by the alert rules' test.
test: venv
	@command -v redis-server >/dev/null && command -v etcd >/dev/null && command -v chromium >/dev/null \
		&& command -v chromedriver >/dev/null && command -v promtool >/dev/null || { \
		echo "installing redis-server, etcd-server, chromium, chromium-driver and prometheus (promtool) with apt-get (needs root or sudo)"; \
		bash scripts/install-services.sh; }
	bash scripts/external-teachers.sh
	$(VENV)/bin/ruff check src tests
	# Two workers, a test file each at a time: most tests wait on servers and timeouts, not the CPU.
	# With CI=true a missing external teacher venv fails its tests instead of skipping them
	# (tests/external_support.py), unless SKIP_EXTERNAL_TEACHERS=1 asked for none;
	# DISTILL_REQUIRE_EXTERNAL_TEACHERS set to 0, 1 or venv names wins.
	DISTILL_REQUIRE_EXTERNAL_TEACHERS=$(or $(DISTILL_REQUIRE_EXTERNAL_TEACHERS),$(if $(filter 1,$(SKIP_EXTERNAL_TEACHERS)),0,$(if $(filter true 1,$(CI)),1,0))) $(PY) -m pytest -q -n 2 --dist loadfile

lint: venv
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

# Regenerates the committed discovery protobuf stubs, in a venv of its own: newer grpcio-tools
# would upgrade protobuf to 7.x and emit stubs that need it.
proto:
	$(PYTHON) -m venv build/protoc-venv
	build/protoc-venv/bin/pip install -q 'grpcio-tools<1.80'
	build/protoc-venv/bin/python -m grpc_tools.protoc -I src --python_out=src --grpc_python_out=src --pyi_out=src \
		src/distill_reader/discovery/proto/discovery.proto

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
