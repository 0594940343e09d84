# The two entry points a newcomer needs: `make demo` (fit the bundled data, export, serve) and `make test`.
# Both create .venv and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
PORT ?= 8000

.PHONY: install test lint typecheck pytest demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/bn-export fit bn_export/demo_data/digits.npz --targets bn_export/demo_data/digits.npz \
		--head linear --loss cross-entropy --stats population --epochs 3 --seed 0 --out $(DEMO)/digits.ckpt.npz
	$(BIN)/bn-export export $(DEMO)/digits.ckpt.npz --with-head --out $(DEMO)/models/digits/1/model.onnx
	$(BIN)/bn-export verify $(DEMO)/models/digits/1/model.onnx
	@echo
	@echo "Serving on http://127.0.0.1:$(PORT). In another terminal:"
	@echo "  curl -s -X POST http://127.0.0.1:$(PORT)/v2/models/digits/infer -H 'Content-Type: application/json' -d @bn_export/demo_data/request.json"
	@echo
	$(BIN)/bn-serve --model-repository $(DEMO)/models --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf $(VENV) $(DEMO) .mypy_cache .ruff_cache .pytest_cache .hypothesis
