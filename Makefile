# eobblast: `make demo` runs the pipeline on embedded defaults, `make test` runs lint and tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_EVENTS ?= 500
DEMO_OUT ?= demo-out
DEBIAN_TOOLS := postfix opendkim opendkim-tools kcat chromium chromium-driver

.PHONY: demo test lint bench bench-memory venv system-deps clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian tools the tests and benchmarks verify against (smtp-sink, opendkim, kcat, socat
# as the TLS front of a test broker, promtool for the alert rules and the metrics endpoint).
# Installed only when missing and when we are root; otherwise the tests that need
# them say so and skip.
system-deps:
	@missing=""; \
	command -v smtp-sink >/dev/null || missing="$$missing postfix"; \
	command -v opendkim >/dev/null || missing="$$missing opendkim opendkim-tools"; \
	command -v kcat >/dev/null || missing="$$missing kcat"; \
	command -v socat >/dev/null || missing="$$missing socat"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (not root: install them yourself)"; \
	  fi; \
	fi
	@# promtool only: the package's Prometheus server is stopped and disabled where systemd
	@# would start it (containers' policy-rc.d already keeps it from starting).
	@if ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package prometheus (for promtool)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus >/dev/null || exit 1; \
	    if [ -d /run/systemd/system ]; then systemctl disable --now prometheus || true; fi; \
	  else \
	    echo "missing Debian package: prometheus, for promtool (not root: install it yourself)"; \
	  fi; \
	fi

demo: $(STAMP)
	$(VENV)/bin/eobblast demo --events $(DEMO_EVENTS) --out $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

# Two processes (pytest-xdist), each test file whole in one: a file's tests share its
# sandbox addresses.
test: $(STAMP) system-deps lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

bench: $(STAMP) system-deps
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_kafka.py

# A worker's memory with a million events queued (takes about six minutes).
bench-memory: $(STAMP) system-deps
	$(PY) benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
