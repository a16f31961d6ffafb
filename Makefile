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

# `make install-systemd`: the standalone master as a system service. The installed files
# name these paths; DESTDIR only stages them (packaging, tests).
DESTDIR    ?=
PREFIX     ?= /opt/pyproxymap
SYSCONFDIR ?= /etc/pyproxymap
SPOOLDIR   ?= /var/spool/pyproxymap
DATADIR    ?= /var/lib/pyproxymap
UNITDIR    ?= /etc/systemd/system

.PHONY: all deps venv install run test lint bench fuzz clean install-systemd install-prefix

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

test: install lint
	$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m tests.bench.run $(BENCH_ARGS)

# Coverage-guided fuzzing (atheris): >= 1 000 000 inputs over the attribute decoder, the
# request scanner and whole connections (tests/fuzz/run.py; FUZZ_ARGS="--runs N -- -seed=1").
fuzz: install
	$(PY) -m tests.fuzz.run $(FUZZ_ARGS)

# The software in $(PREFIX): a venv of the system Python (mail_owner must be able to run
# it). Left alone when it is there already; a venv cannot be staged under DESTDIR.
install-prefix:
	@if [ -x "$(DESTDIR)$(PREFIX)/bin/proxymap-master" ]; then \
	  echo "using the installation in $(DESTDIR)$(PREFIX)"; \
	elif [ -n "$(DESTDIR)" ]; then \
	  echo "no $(DESTDIR)$(PREFIX)/bin/proxymap-master: install the software there first" >&2; \
	  exit 1; \
	else \
	  $(MAKE) deps && $(PYTHON) -m venv $(PREFIX) && \
	  $(PREFIX)/bin/pip install -q -U pip wheel setuptools && \
	  $(PREFIX)/bin/pip install -q '$(CURDIR)[tables,databases,fast]'; \
	fi

# /etc/pyproxymap (main.cf, master.cf, tables: kept when present), /var/spool/pyproxymap,
# /var/lib/pyproxymap and the unit. main.cf gets the system layout, master.cf unprivileged
# workers (mail_owner), the unit these paths.
install-systemd: install-prefix
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR) $(DESTDIR)$(SYSCONFDIR)/tables \
	  $(DESTDIR)$(SPOOLDIR) $(DESTDIR)$(UNITDIR)
	install -d -m 0700 $(DESTDIR)$(DATADIR)
	@for f in conf/tables/*; do t=$(DESTDIR)$(SYSCONFDIR)/tables/$$(basename $$f); \
	  [ -e $$t ] || install -m 0644 $$f $$t; done
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/main.cf ]; then \
	  echo "kept $(DESTDIR)$(SYSCONFDIR)/main.cf"; \
	else \
	  sed -e '/^pyproxymap_home = /d' \
	      -e 's|^queue_directory = .*|queue_directory = $(SPOOLDIR)|' \
	      -e 's|^data_directory = .*|data_directory = $(DATADIR)|' \
	      -e 's|^daemon_directory = .*|daemon_directory = $(PREFIX)/bin|' \
	      conf/main.cf > $(DESTDIR)$(SYSCONFDIR)/main.cf.new && \
	  chmod 0644 $(DESTDIR)$(SYSCONFDIR)/main.cf.new && \
	  mv $(DESTDIR)$(SYSCONFDIR)/main.cf.new $(DESTDIR)$(SYSCONFDIR)/main.cf; \
	fi
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/master.cf ]; then \
	  echo "kept $(DESTDIR)$(SYSCONFDIR)/master.cf"; \
	else \
	  sed -E 's/^(proxymap|proxywrite)( +unix +- +)n /\1\2- /' conf/master.cf \
	    > $(DESTDIR)$(SYSCONFDIR)/master.cf.new && \
	  chmod 0644 $(DESTDIR)$(SYSCONFDIR)/master.cf.new && \
	  mv $(DESTDIR)$(SYSCONFDIR)/master.cf.new $(DESTDIR)$(SYSCONFDIR)/master.cf; \
	fi
	sed -e 's|/opt/pyproxymap|$(PREFIX)|g' -e 's|/etc/pyproxymap|$(SYSCONFDIR)|g' \
	    -e 's|/var/spool/pyproxymap|$(SPOOLDIR)|g' -e 's|/var/lib/pyproxymap|$(DATADIR)|g' \
	    conf/pyproxymap.service > $(DESTDIR)$(UNITDIR)/pyproxymap.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/pyproxymap.service
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; check with: $(PREFIX)/bin/proxymap-master -c $(SYSCONFDIR) check"
	@echo "then: systemctl enable --now pyproxymap"

clean:
	rm -rf $(VENV) build *.egg-info run/
