# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nahtlos-installed
# pytest workers; 2 matches the CI machine's cores
JOBS   ?= 2

.PHONY: venv demo test lint typecheck bench clean pretrained

venv: $(STAMP)

# A GPU user's system torch is reused (the venv sees system site-packages);
# otherwise the CPU build torch==2.13.0 is installed. An existing torch is never replaced.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	@touch $(STAMP)

# ~1.5 minutes on 2 CPU cores: a 64 Mi-voxel volume predicted by the shipped networks
demo: $(STAMP)
	$(VENV)/bin/nahtlos demo

# Retrain the networks shipped in src/nahtlos/paper/pretrained/ (docs/pretrained.md; about
# 10 minutes on 2 CPU cores): training data, two `nahtlos train` runs (their configs in
# pretrained/ write to build/pretrained/), prediction-only export.
pretrained: $(STAMP)
	mkdir -p build/pretrained
	$(VENV)/bin/nahtlos synth embryo build/pretrained/embryo-train.zarr --shape 128,384,384 \
	  --seed 1 --overwrite --preview build/pretrained/embryo-train.png
	for norm in instance batchrenorm; do \
	  $(VENV)/bin/nahtlos train pretrained/embryo-$$norm.yaml && \
	  $(VENV)/bin/nahtlos export build/pretrained/embryo-$$norm/model.pt \
	    src/nahtlos/paper/pretrained/embryo-$$norm.pt --overwrite || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) lint typecheck
	$(PY) -m pytest -n $(JOBS) -q

bench: $(STAMP)
	$(PY) benchmarks/predict_vs_monai.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis demo-output
