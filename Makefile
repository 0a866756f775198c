# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO  := protos/kontext/pdp/v1/pdp.proto
GENDIR := policy_engine/api
GEN    := $(GENDIR)/kontext/pdp/v1/pdp_pb2.py $(GENDIR)/kontext/pdp/v1/pdp_pb2_grpc.py

PDP_ADDRESS  ?= 127.0.0.1:50051
PDP_POLICIES ?= policies
REDIS_URL    ?=
# The Redis level needs a signing key (see README, Decision cache). Unless one is given in the
# environment, `make run REDIS_URL=...` makes a random one once and keeps it in this file, so
# every `make run` on this checkout (and so every local replica) signs with the same key.
CACHE_KEY_FILE ?= .pdp/cache-signing.key
FUZZ_SECONDS ?= 300
# Flags for `make bench-scale`, e.g. SCALE_ARGS='--sizes 100,1000 --orgs off --duration-scale 0.3'.
SCALE_ARGS ?=
# `make bench` runs every row on this checkout and, round by round, on the server of BASELINE
# (a git ref, checked out in a temporary worktree): by default the threaded server before
# grpc.aio (issue 11). BASELINE= runs this checkout alone. BENCH_ARGS: more flags, e.g.
# BENCH_ARGS='--rows "Check uncached (cache off)" --duration-scale 0.3'.
BASELINE ?= 87f68df^
BENCH_ARGS ?=

.PHONY: install generate run test lint bench bench-scale fuzz clean

install: $(STAMP) generate

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

generate: $(GEN)

# Stubs are generated from the .proto on every build, so they cannot drift from it.
$(GEN) &: $(PROTO) $(STAMP)
	mkdir -p $(GENDIR)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$(GENDIR) \
		--grpc_python_out=$(GENDIR) --pyi_out=$(GENDIR) $(PROTO)
	sed -i 's/^from kontext\.pdp\.v1 import/from policy_engine.api.kontext.pdp.v1 import/' \
		$(GENDIR)/kontext/pdp/v1/pdp_pb2_grpc.py
	touch $(GEN)

run: install $(if $(REDIS_URL),$(if $(PDP_CACHE__REDIS_SIGNING_KEY)$(PDP_CACHE__REDIS_SIGNING_KEY_FILE),,$(CACHE_KEY_FILE)))
	$(if $(REDIS_URL),$(if $(PDP_CACHE__REDIS_SIGNING_KEY)$(PDP_CACHE__REDIS_SIGNING_KEY_FILE),,PDP_CACHE__REDIS_SIGNING_KEY_FILE=$(CACHE_KEY_FILE))) \
	$(BIN)/pdp serve --address $(PDP_ADDRESS) --policies $(PDP_POLICIES) \
		$(if $(REDIS_URL),--redis-url $(REDIS_URL))

$(CACHE_KEY_FILE): | $(BIN)/python
	mkdir -p $(dir $@)
	umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_hex(32))' > $@

# The example policies' own suites (README, Policy tests) must pass and match every rule.
# The bench harness tests drive a real server with h2load: installed here, not skipped.
test: install
	$(BIN)/pdp test --coverage-min 100 policies/
	command -v h2load >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	command -v h2load >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(BIN)/python -m policy_engine.bench $(if $(BASELINE),--baseline '$(BASELINE)') $(BENCH_ARGS)

# Generated sets of 100 to 50,000 user policies and 1,000 organizations (README, Performance
# at scale); the big rows take minutes. Results in bench-results/scale.md.
bench-scale: install
	command -v h2load >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(BIN)/python -m policy_engine.bench.scale $(SCALE_ARGS)

# Kept out of `make test` (which runs a short pass): fresh seeds until FUZZ_SECONDS run out.
fuzz: install
	@end=$$(( $$(date +%s) + $(FUZZ_SECONDS) )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do round=$$((round + 1)); \
		PDP_FUZZ_EXAMPLES=2000 $(BIN)/pytest -q -p no:cacheprovider tests/fuzz \
			--hypothesis-seed=$$round$$RANDOM || exit 1; \
	done; echo "fuzz: $$round rounds over $(FUZZ_SECONDS)s: no crash, hang or wrongful allow"

clean:
	rm -rf $(VENV) $(GENDIR)/kontext .pytest_cache .ruff_cache
