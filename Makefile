# pyproxymap -- the two commands a newcomer needs are `make run` and `make test`.
# Debian's own Python by preference: the worker drops privileges to mail_owner, which must
# be able to read the interpreter and its standard library (a Python under /root is not).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CONF   ?= $(CURDIR)/conf

# Debian packages the Python bindings compile against (Berkeley DB 5.3 for hash:/btree:,
# OpenLDAP and SASL for python-ldap), and the C libraries loaded at run time (PCRE2 for
# pcre:, glibc's regcomp for regexp:).
# Installed only when missing and only when running as root.
SYSTEM_BUILD_DEPS := libdb5.3-dev libldap-dev libsasl2-dev libpcre2-8-0 python3-venv python3-dev gcc

.PHONY: all deps venv install run test lint bench fuzz clean

all: install

deps:
	@missing=""; for p in $(SYSTEM_BUILD_DEPS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -q || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "please install (as root):$$missing"; fi; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	$(MAKE) deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip wheel setuptools
	# compat: the checkout goes on sys.path through a plain .pth line. The default editable
	# mode installs an import hook that every worker would load at start (pathlib, re,
	# urllib...): 13 ms and 2 MB per process for nothing.
	$(PIP) install -q -e '.[tables,databases,fast,test]' --config-settings editable_mode=compat
	touch $@

venv install: $(VENV)/.installed

run: install
	$(VENV)/bin/proxymap-master -c $(CONF) start

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m tests.bench.run $(BENCH_ARGS)

# Coverage-guided fuzzing (atheris): >= 1 000 000 inputs over the attribute decoder, the
# request scanner and whole connections (tests/fuzz/run.py; FUZZ_ARGS="--runs N -- -seed=1").
fuzz: install
	$(PY) -m tests.fuzz.run $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info run/
