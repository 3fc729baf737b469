# Two commands set up a fresh machine: `make demo` and `make test`. Both create (or reuse) .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tpc-installed
# Every pip call carries the constraints file: it pins torch==2.13.0 (the local CPU wheel).
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install demo test lint bench-taps bench-llava bench-openvla bench-executorch bench-select clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[onnx,tensorrt,executorch,coreml,bench,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tpc export zoo:tiny-llava --method hiprune --keep 64 --target onnx --output out/demo --force
	$(BIN)/tpc verify out/demo

test: $(STAMP)
	$(BIN)/ruff check tpc tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check tpc tests benchmarks
	$(BIN)/ruff format --check tpc tests benchmarks

bench-taps: $(STAMP)
	$(BIN)/python benchmarks/attention_tap.py

bench-llava: $(STAMP)
	$(BIN)/python benchmarks/llava_prefill.py

bench-openvla: $(STAMP)
	$(BIN)/python benchmarks/openvla_control.py

bench-executorch: $(STAMP)
	$(BIN)/python benchmarks/executorch_islands.py

bench-select: $(STAMP)
	$(BIN)/python benchmarks/select_kernel.py

clean:
	rm -rf out .pytest_cache .ruff_cache
