# `make run`: set up .venv and run build-model on the offline quickstart preset.
# `make test`: set up .venv and run the tests.   Overrides: make run SET="train.max_steps=300 tokenizer.vocab_size=2048"
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PRESET ?= quickstart
SET ?=

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup run test ui clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m flows --preset $(PRESET) $(foreach kv,$(SET),--set $(kv))

test: $(STAMP)
	$(PY) -m pytest -q tests

ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/artifacts/mlflow/mlflow.db --default-artifact-root $(CURDIR)/artifacts/mlflow/artifacts

clean:
	rm -rf artifacts/*/ artifacts/.prefect-results
