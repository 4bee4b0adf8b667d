# otel-ebpf - every target sets up what it needs, idempotently.
#   make run     set up this host and run the agent on its embedded defaults (as root)
#   make test    set up host + test peers, then the whole test suite
#   make bench   overhead benchmarks, incl. a real redis server (prints ratios; not a test);
#                BENCH_ARGS="--suite redis --modes nothing,empty,agent" to pick
#   make lint    ruff + mypy on the package

VENV        ?= .venv
PY          := $(VENV)/bin/python
# BCC comes from Debian (python3-bpfcc) for the system interpreter: the venv must be made
# from that interpreter and see its site-packages.
SYSTEM_PY   ?= /usr/bin/python3
PYTEST_ARGS ?=
RUN_ARGS    ?=
BENCH_ARGS  ?=

.PHONY: setup host host-test host-bench venv test-deps bench-deps run test bench lint clean

setup: host venv

host:
	bash deploy/host-setup.sh

host-test:
	bash deploy/host-setup.sh --test

# --test's packages plus redis-server, redis-tools (the redis suite) and linux-perf
host-bench:
	bash deploy/host-setup.sh --bench

$(VENV)/.created:
	$(SYSTEM_PY) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.created
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test-deps: host-test $(VENV)/.installed-test

bench-deps: host-bench $(VENV)/.installed-test

run: setup
	$(VENV)/bin/otel-ebpf run $(RUN_ARGS)

# pytest's exit 5 (nothing collected) is a failure here, never a pass
test: test-deps
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

bench: bench-deps
	$(PY) bench/run.py $(BENCH_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check otel_ebpf tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) tests/helpers/bin bench/.build
