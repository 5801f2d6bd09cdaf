# fleetml — two commands: `make run` and `make test`.
# Everything else is a convenience wrapper around CMake, ctest and pytest.

BUILD      ?= build
TEST_BUILD ?= build-test
DATA       ?= var
PY         := /usr/bin/python3
JOBS       ?= $(shell nproc)
# libFuzzer (clang): `make fuzz` runs every target for FUZZ_SECONDS, FUZZ_JOBS
# at a time; `make test` runs each for FUZZ_SMOKE_SECONDS (tests/fuzz/README.md).
FUZZ_BUILD         ?= build-fuzz
FUZZ_SECONDS       ?= 600
FUZZ_SMOKE_SECONDS ?= 20
FUZZ_JOBS          ?= $(JOBS)

.PHONY: all deps build build-test install run test unit integration integration-pg bench soak fuzz fuzz-build fuzz-smoke clean distclean model screenshots

all: build

deps:
	@scripts/install-deps

$(BUILD)/Makefile: CMakeLists.txt
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFM_TESTS=OFF >/dev/null

build: deps $(BUILD)/Makefile
	@cmake --build $(BUILD) -j$(JOBS)

build-test: deps
	@cmake -S . -B $(TEST_BUILD) -DCMAKE_BUILD_TYPE=Debug -DFM_SANITIZE=ON -DFM_TESTS=ON >/dev/null
	@cmake --build $(TEST_BUILD) -j$(JOBS)

# The binary, its man page and bash completion under PREFIX.
PREFIX ?= /usr/local
install: build
	cmake --install $(BUILD) --prefix $(PREFIX)

run: build
	@scripts/run-demo $(BUILD) $(DATA)

unit: build-test
	cd $(TEST_BUILD) && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j$(JOBS)

integration: build-test
	FM_BIN=$(CURDIR)/$(TEST_BUILD)/fleetml FM_BUILD=$(CURDIR)/$(TEST_BUILD) \
	  $(PY) -m pytest -q -p no:cacheprovider tests/integration

# The same integration suite on PostgreSQL (a throwaway server, one database
# per platform; tests of SQLite's own files are skipped).
integration-pg: build-test
	FM_IT_STORE=postgres FM_IT_LAKE=s3 FM_BIN=$(CURDIR)/$(TEST_BUILD)/fleetml FM_BUILD=$(CURDIR)/$(TEST_BUILD) \
	  $(PY) -m pytest -q -p no:cacheprovider tests/integration \
	  --deselect tests/integration/test_53_store_postgres.py

# Fuzz targets: only fleetml_core + tests/fuzz/fuzz_*.c, clang, ASan+UBSan.
fuzz-build: deps
	@cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_COMPILER=clang \
	  -DCMAKE_CXX_COMPILER=clang++ -DFM_FUZZ=ON -DFM_TESTS=OFF -DFM_WERROR=OFF >/dev/null
	@cmake --build $(FUZZ_BUILD) -j$(JOBS)

fuzz: fuzz-build
	tests/fuzz/run $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_JOBS)

# Replays tests/fuzz/regressions/ and fuzzes each target briefly.
fuzz-smoke: fuzz-build
	tests/fuzz/run $(FUZZ_BUILD) $(FUZZ_SMOKE_SECONDS) $(FUZZ_JOBS)

test: unit integration integration-pg fuzz-smoke

# The dashboard's screenshots in docs/dashboard (the browser test, saving them).
screenshots: build-test
	FM_SCREENSHOTS=$(CURDIR)/docs/dashboard FM_BIN=$(CURDIR)/$(TEST_BUILD)/fleetml \
	  FM_BUILD=$(CURDIR)/$(TEST_BUILD) $(PY) -m pytest -q -p no:cacheprovider \
	  tests/integration/test_57_dashboard.py tests/integration/test_58_dashboard_admin.py -k chromium

bench: build
	@scripts/bench $(BUILD)

# Fault runs, minutes long, outside `make test` (needs root: tmpfs mounts).
# One run: scripts/soak kill-serve --cycles 20 (see scripts/soak --help).
soak: build
	@scripts/soak --bin $(CURDIR)/$(BUILD)/fleetml

model: build
	$(BUILD)/fleetml model train --synthetic --out models/viscosity

clean:
	rm -rf $(BUILD) $(TEST_BUILD) $(FUZZ_BUILD)

distclean: clean
	rm -rf $(DATA)
