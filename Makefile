# `make run`: set up .venv and run build-model on the offline quickstart preset.
# `make test`: set up .venv and run the tests.   Overrides: make run SET="train.max_steps=300 tokenizer.vocab_size=2048"
# Deployments (prefect.yaml): `make server`, then `make deploy` and `make worker` (or `make serve`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# llama-cpp-python is built from source with patches/*.patch applied (patches/README.md); a new patch re-installs.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml patches/*.patch | cksum | cut -d' ' -f1)
PRESET ?= quickstart
SET ?=
# handed to the flow whole and unexpanded (--sets): quotes keep a value with spaces whole, e.g.
# SET="register.experiment='my runs'"
# $(call quote,TEXT): TEXT as one single-quoted shell word, whatever quotes it holds
quote = '$(subst ','\'',$(1))'
PREFECT := $(VENV)/bin/prefect
PREFECT_PORT ?= 4200
# the process work pool that prefect.yaml's deployments name
POOL ?= scriptorium

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup run test ui clean prune server worker deploy serve browser screenshots

$(STAMP): pyproject.toml $(wildcard patches/*.patch) patches/install_llama_cpp.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install torch==2.13.0
	$(PY) patches/install_llama_cpp.py
	$(PY) -m pip install -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# tests/test_mlflow_ui.py drives Debian's chromium headless; apt installs it once, only where it is missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

setup: $(STAMP) browser

run: $(STAMP)
	$(PY) -m flows --server --preset $(call quote,$(PRESET)) --sets $(call quote,$(value SET))

test: $(STAMP) browser
	$(PY) -m pytest -q tests

# Screenshots of the MLflow UI on two tiny runs (experiment, compare view, champion, model card): artifacts/ui-screenshots/
screenshots: $(STAMP) browser
	$(PY) benchmarks/mlflow_ui.py --out $(CURDIR)/artifacts/ui-screenshots

ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/artifacts/mlflow/mlflow.db --default-artifact-root $(CURDIR)/artifacts/mlflow/artifacts

# A local Prefect API and UI (http://127.0.0.1:$(PREFECT_PORT)); its database lives in .prefect/ (git-ignored).
server: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.prefect $(PREFECT) server start --host 127.0.0.1 --port $(PREFECT_PORT)

# The other targets talk to that server unless PREFECT_API_URL says otherwise.
worker deploy serve: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api

# Both create the process work pool if it is missing: `prefect deploy` refuses a pool that does not exist.
CREATE_POOL = $(PREFECT) work-pool inspect $(POOL) >/dev/null 2>&1 || $(PREFECT) work-pool create $(POOL) --type process

# Runs the flow runs of the pool's deployments, each as a subprocess.
worker: $(STAMP)
	$(CREATE_POOL)
	$(PREFECT) worker start --pool $(POOL) --type process

# Creates or updates every deployment in prefect.yaml (build-model/nightly and build-model/on-demand).
deploy: $(STAMP)
	$(CREATE_POOL)
	$(PREFECT) --no-prompt deploy --all

# The same deployments served from one process, without a work pool or worker (flows/serve.py).
serve: $(STAMP)
	$(PY) -m flows.serve

# Drops every stage's output and Prefect's result records (the next `make run` starts over), keeps artifacts/mlflow
# (every registered version) and artifacts/acquire/.downloads (remote files, fetched once), and refuses while a run
# holds the artifacts directory's lock (tasks/stage.py). make's wildcard skips dot names: .downloads stays.
clean:
	@mkdir -p artifacts
	@flock -n -E 75 artifacts/.lock rm -rf $(filter-out artifacts/mlflow/ artifacts/acquire/,$(wildcard artifacts/*/)) \
	  $(wildcard artifacts/acquire/*/) artifacts/.prefect-results; status=$$?; [ $$status -ne 75 ] || \
	  echo "error: a run holds artifacts/ ($$(cat artifacts/.lock)): wait for it to finish" >&2; exit $$status
	@echo "removed the stage outputs in artifacts/; kept artifacts/mlflow (every registered version: delete it by hand)" \
	  "and artifacts/acquire/.downloads (the remote files)"

# Removes the stage outputs that none of the KEEP newest registered versions came from (flows/prune.py); DRY=1 says
# what it would remove. Keeps artifacts/mlflow, what finished since those versions, and unfinished stages.
KEEP ?= 3
prune: $(STAMP)
	$(VENV)/bin/scriptorium prune --keep $(KEEP) $(if $(DRY),--dry-run)
