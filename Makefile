# jemd build.  `make` builds build/jem and build/jemd (release); `make run`
# serves the default model; `make test` builds and runs every test.
# MODE=asan builds everything with ASan+UBSan under build/asan/.

PKGS     := libmicrohttpd jansson libuv openblas zlib hiredis
MODE     ?= release
PYTHON   ?= /usr/bin/python3
PREFIX   ?= /usr/local
DESTDIR  ?=

ifeq ($(MODE),release)
  B := build
else
  B := build/$(MODE)
endif

CC       ?= cc
WARN     := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
            -Wmissing-prototypes -Wvla -Wformat=2
CFLAGS   := -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE $(WARN) \
            -Icore -Icore/internal -MMD -MP -pthread $(shell pkg-config --cflags $(PKGS))
LDLIBS   := $(shell pkg-config --libs $(PKGS)) -lm -lpthread
LDFLAGS  :=

ifeq ($(MODE),release)
  # Never -ffast-math: the energy and softmax code relies on IEEE semantics.
  CFLAGS += -O2 -g -march=x86-64-v2 -mtune=native
else ifeq ($(MODE),asan)
  CFLAGS  += -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
             -fno-sanitize-recover=all
  LDFLAGS += -fsanitize=address,undefined
else ifeq ($(MODE),fuzz)
  CC      := clang
  CFLAGS  += -O1 -g -fno-omit-frame-pointer -Wno-unused-command-line-argument \
             -fsanitize=fuzzer-no-link,address,undefined
  LDFLAGS += -fsanitize=fuzzer,address,undefined
endif

CORE_SRC := $(wildcard core/*.c)
CLI_SRC  := $(wildcard cli/*.c)
SRV_SRC  := $(filter-out server/main.c,$(wildcard server/*.c))
TEST_SRC := $(wildcard tests/test_*.c)
BENCH_SRC:= $(wildcard bench/*.c)
FUZZ_SRC := $(wildcard fuzz/fuzz_*.c)

CORE_OBJ := $(CORE_SRC:%.c=$(B)/obj/%.o)
CLI_OBJ  := $(CLI_SRC:%.c=$(B)/obj/%.o)
SRV_OBJ  := $(SRV_SRC:%.c=$(B)/obj/%.o)
TESTS    := $(TEST_SRC:tests/%.c=$(B)/tests/%)
BENCHES  := $(BENCH_SRC:bench/%.c=$(B)/bench/%)
FUZZERS  := $(FUZZ_SRC:fuzz/%.c=$(B)/fuzz/%)

all: $(B)/jem $(B)/jemd

$(B)/obj/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c $< -o $@

$(B)/libjem.a: $(CORE_OBJ)
	@rm -f $@
	$(AR) rcs $@ $^

$(B)/libjemsrv.a: $(SRV_OBJ) $(B)/obj/gen/assets.o
	@rm -f $@
	$(AR) rcs $@ $^

# Files jemd serves, built into it: the page at / (web/), the spec and its
# reference at /docs, generated from the spec by scripts/apidocs.py (python3
# and python3-yaml of DEPS_BUILD; no node).  scripts/embed.c turns them into a
# C file of byte arrays (no runtime paths).
ASSET_FILES := web/index.html web/app.js web/app.css web/docs.css openapi.yaml \
               $(B)/gen/docs.html
ASSETS := web/index.html / 'text/html; charset=utf-8' \
          web/app.js /ui/app.js 'text/javascript; charset=utf-8' \
          web/app.css /ui/app.css 'text/css; charset=utf-8' \
          web/docs.css /ui/docs.css 'text/css; charset=utf-8' \
          openapi.yaml /openapi.yaml 'application/yaml; charset=utf-8' \
          $(B)/gen/docs.html /docs 'text/html; charset=utf-8'
$(B)/embed: scripts/embed.c
	@mkdir -p $(@D)
	$(CC) -std=c11 -O1 -Wall -Wextra -Werror $< -o $@
$(B)/gen/docs.html: scripts/apidocs.py openapi.yaml
	@mkdir -p $(@D)
	$(PYTHON) scripts/apidocs.py openapi.yaml $@
$(B)/gen/assets.c: $(B)/embed $(ASSET_FILES)
	@mkdir -p $(@D)
	$(B)/embed $@ $(ASSETS)
$(B)/obj/gen/assets.o: $(B)/gen/assets.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Iserver -c $< -o $@

$(B)/jem: $(CLI_OBJ) $(B)/libjem.a
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# The daemon's fallback model directory, $(PREFIX)/share/jemd/models/.  The
# stamp holds the PREFIX config.o was built with, so `make install PREFIX=/usr`
# after a plain `make` recompiles it instead of keeping /usr/local.
$(B)/obj/server/config.o: CFLAGS += -DJEMD_DATADIR='"$(PREFIX)/share/jemd"'
$(B)/obj/server/config.o: $(B)/prefix.stamp
$(B)/prefix.stamp: FORCE
	@mkdir -p $(@D)
	@echo '$(PREFIX)' | cmp -s - $@ || echo '$(PREFIX)' > $@
FORCE:

$(B)/jemd: $(B)/obj/server/main.o $(B)/libjemsrv.a $(B)/libjem.a
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# Unit tests: one cmocka binary per tests/test_*.c, linked with the core and
# the server library.  The no-allocation test wraps malloc and friends.
$(B)/tests/test_noalloc: TEST_LDFLAGS := -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=free,--wrap=aligned_alloc,--wrap=posix_memalign
$(B)/tests/%: $(B)/obj/tests/%.o $(B)/libjemsrv.a $(B)/libjem.a
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $(TEST_LDFLAGS) $^ $(LDLIBS) $(shell pkg-config --libs cmocka) -o $@

$(B)/bench/%: $(B)/obj/bench/%.o $(B)/libjem.a
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(B)/fuzz/%: $(B)/obj/fuzz/%.o $(B)/libjemsrv.a $(B)/libjem.a
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# ---------------------------------------------------------------------------
# Dependencies: Debian packages, installed when missing (needs root).
DEPS_BUILD := build-essential pkg-config libmicrohttpd-dev libjansson-dev \
              libopenblas-dev libuv1-dev libstb-dev libcmocka-dev zlib1g-dev \
              dataset-fashion-mnist python3 python3-yaml python3-numpy \
              python3-pil fonts-dejavu-core fonts-dejavu-extra prometheus \
              systemd procps clang libclang-rt-14-dev chromium libhiredis-dev redis-server
DEPS_BENCH := python3-torch python3-numpy wrk

define apt_ensure
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  if [ -n "$$sudo" ] && ! command -v sudo >/dev/null; then \
	    echo "make: installing these Debian packages needs root (or sudo):$$missing" >&2; \
	    exit 1; \
	  fi; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call apt_ensure,$(DEPS_BUILD))

# npm tools of the tests (tests/node/package.json, versions pinned by its lock
# file): puppeteer-core drives Debian's chromium through the page at /.
# Installed into tests/node/node_modules (git-ignored) when the lock changes.
NODE_DIR := tests/node
# Debian's npm only where no npm is on PATH: a machine with NodeSource's
# nodejs has one, and Debian's npm would conflict with it.
$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || $(MAKE) --no-print-directory deps-npm
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@
node-deps: $(NODE_DIR)/node_modules/.installed
deps-npm:
	$(call apt_ensure,nodejs npm)

deps-bench: deps
	$(call apt_ensure,$(DEPS_BENCH))

# The OOD corpus of `jem eval` and `jem calibrate` (scripts/make_ood_sets.py):
# the photo, illustration and icon families come from these packages.
DEPS_OOD := python3-skimage plasma-workspace-wallpapers desktop-base \
            gnome-backgrounds oxygen-icon-theme adwaita-icon-theme
ood-sets: deps
	$(call apt_ensure,$(DEPS_OOD))
	$(PYTHON) scripts/make_ood_sets.py --out data/ood

# ---------------------------------------------------------------------------
run: deps all
	./build/jemd $(ARGS)

unit: $(TESTS)
	@set -e; for t in $(TESTS); do echo "== $$t"; $$t; done

integration: all
	@set -e; for t in tests/integration/test_*.py; do \
	  [ -e "$$t" ] || continue; echo "== $$t"; \
	  $(PYTHON) $$t --build $(B); done

check: unit integration

test: deps node-deps
	$(MAKE) all
	$(MAKE) check

asan: deps node-deps
	$(MAKE) MODE=asan all
	$(MAKE) MODE=asan check

# A few minutes of mixed good and hostile traffic against a loopback daemon
# (tests/soak.py): errors, p99, resident size at start, peak and end.
soak: all
	$(PYTHON) tests/soak.py --build $(B) $(if $(SOAK_SECONDS),--seconds $(SOAK_SECONDS))

# Each bench/bench_*.py runs its C benchmark binaries and the PyTorch
# reference in the same run and prints both with their ratio.
bench: deps-bench all $(BENCHES)
	@set -e; for p in bench/bench_*.py; do $(PYTHON) $$p --build $(B); done

bench-server: deps-bench all $(BENCHES)
	$(PYTHON) bench/server_bench.py --build $(B)
	$(PYTHON) bench/jobs_bench.py --build $(B)

fuzz: deps
	$(MAKE) MODE=fuzz fuzzers
	$(PYTHON) fuzz/run.py --dir build/fuzz/fuzz --seconds $${FUZZ_SECONDS:-60}

fuzzers: $(FUZZERS)

# Install: binaries to $(PREFIX)/bin, the default model to $(PREFIX)/share/jemd/models,
# the systemd unit (paths filled in) to $(UNITDIR), the environment file example to
# the doc directory and, unless one is already there, to $(SYSCONFDIR)/default/jemd.
# Then: systemctl daemon-reload && systemctl enable --now jemd
SYSCONFDIR ?= /etc
UNITDIR    ?= $(PREFIX)/lib/systemd/system
DOCDIR     ?= $(PREFIX)/share/doc/jemd

install: all
	@test -f models/fmnist-jem.safetensors || { echo "install: models/fmnist-jem.safetensors is missing" >&2; exit 1; }
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/jemd/models \
	  $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(SYSCONFDIR)/default
	install -m 0755 $(B)/jem $(B)/jemd $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 models/fmnist-jem.safetensors $(DESTDIR)$(PREFIX)/share/jemd/models/
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
	  deploy/systemd/jemd.service > $(DESTDIR)$(UNITDIR)/jemd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/jemd.service
	install -m 0644 deploy/systemd/jemd.env.example $(DESTDIR)$(DOCDIR)/
	test -e $(DESTDIR)$(SYSCONFDIR)/default/jemd || \
	  install -m 0644 deploy/systemd/jemd.env.example $(DESTDIR)$(SYSCONFDIR)/default/jemd
	install -m 0644 deploy/README.md $(DESTDIR)$(DOCDIR)/DEPLOY.md
	for f in README.md LICENSE NOTICE; do \
	  if [ -f $$f ]; then install -m 0644 $$f $(DESTDIR)$(DOCDIR)/; fi; done

# Container image (podman; slow: debootstrap + apt).  Not part of `make test`.
container:
	deploy/container/build.sh $(CONTAINER_ARGS)

clean:
	rm -rf build

-include $(shell find build -name '*.d' 2>/dev/null)

.PHONY: FORCE all deps node-deps deps-npm deps-bench ood-sets run unit integration check test asan soak bench \
        bench-server fuzz fuzzers install container clean
