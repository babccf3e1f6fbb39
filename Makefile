# Two commands for a fresh machine: `make demo` and `make test`. Both create the venv and install.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DURATION ?= 60

.PHONY: install demo test test-unit lint evaluate bench bench-groupby chaos broker-jars clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 'setuptools>=77'  # the packaging test builds with the venv's setuptools (SPDX license)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

broker-jars: install  ## Kafka jars from Maven Central into ~/.cache/distill-detector (once)
	$(PY) -c "from detector.broker import ensure_jars; print('kafka jars:', ensure_jars())"

demo: broker-jars  ## local broker + worker + simulated traffic; ends after DURATION seconds
	$(VENV)/bin/detector demo --duration $(DURATION)

test: broker-jars  ## the whole suite: unit, contract, doctests and integration against a real broker
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q -m "not integration"

lint: install
	$(VENV)/bin/ruff check detector tests
	$(VENV)/bin/mypy detector

evaluate: install  ## scenarios through replay; writes EVALUATION.md and plots in docs/
	$(VENV)/bin/detector evaluate --out-dir .

bench: broker-jars  ## raw consumer vs worker rate, latency, memory per account; writes bench/results/latest.json
	$(PY) -m bench.run

bench-groupby: broker-jars  ## what a Faust group_by stage keyed by cluster id adds to an event's trip; writes bench/results/groupby.json
	$(PY) -m bench.groupby

chaos: broker-jars  ## kill -9 workers, restart the broker, rebalance under load; ends with "chaos: faults=... lost=L duplicated=D uncommitted=U"
	$(VENV)/bin/detector chaos

clean:
	rm -rf $(VENV) .detector-data
