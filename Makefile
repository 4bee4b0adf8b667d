# otel-ebpf - every target sets up what it needs, idempotently.
#   make run     set up this host and run the agent on its embedded defaults (as root)
#   make test    set up host + test peers, then the whole test suite
#   make bench   overhead benchmarks (prints ratios; not a test)
#   make lint    ruff + mypy on the package

VENV        ?= .venv
PY          := $(VENV)/bin/python
# BCC comes from Debian (python3-bpfcc) for the system interpreter: the venv must be made
# from that interpreter and see its site-packages.
SYSTEM_PY   ?= /usr/bin/python3
PYTEST_ARGS ?=
RUN_ARGS    ?=

.PHONY: setup host host-test venv test-deps run test bench lint clean

setup: host venv

host:
	bash deploy/host-setup.sh

host-test:
	bash deploy/host-setup.sh --test

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

run: setup
	$(VENV)/bin/otel-ebpf run $(RUN_ARGS)

# pytest's exit 5 (nothing collected) is a failure here, never a pass
test: test-deps
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

bench: test-deps
	$(PY) bench/run.py

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check otel_ebpf tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) tests/helpers/bin bench/.build
