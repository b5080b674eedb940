# Two commands for a fresh machine (see README.md):
#   make run    set everything up and start the gateway (demo backend when no CONFIG is given)
#   make test   run the whole test suite (tox: Python 3.11/3.12/3.13, lint, typecheck)

PYTHON ?= python3.11
VENV   ?= .venv
CONFIG ?=
ARGS   ?=

.PHONY: run test setup bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]' tox
	touch $@

setup: $(VENV)/.installed

# twistd finds the plugin in twisted/plugins/ through the working directory on sys.path.
# Stopped by Ctrl-C or SIGTERM, twistd drains and exits by that signal (130 / 143):
# that is a normal end of `make run`, not an error.
run: setup
	@trap true INT TERM; \
	PYTHONPATH=$(CURDIR) $(VENV)/bin/twistd --pidfile= -n nexus $(if $(CONFIG),--config $(CONFIG)) $(ARGS); \
	code=$$?; [ $$code -eq 130 ] || [ $$code -eq 143 ] || exit $$code

test: setup
	VENV=$(VENV) ./scripts/run-tests

bench: setup
	./scripts/ensure-system-tools
	$(VENV)/bin/pip install --quiet py-spy
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) .tox build dist *.egg-info
