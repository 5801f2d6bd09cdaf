# fleetml — two commands: `make run` and `make test`.
# Everything else is a convenience wrapper around CMake, ctest and pytest.

BUILD      ?= build
TEST_BUILD ?= build-test
DATA       ?= var
PY         := /usr/bin/python3
JOBS       ?= $(shell nproc)

.PHONY: all deps build build-test run test unit integration bench soak fuzz clean distclean model

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

run: build
	@scripts/run-demo $(BUILD) $(DATA)

unit: build-test
	cd $(TEST_BUILD) && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j$(JOBS)

integration: build-test
	FM_BIN=$(CURDIR)/$(TEST_BUILD)/fleetml FM_BUILD=$(CURDIR)/$(TEST_BUILD) \
	  $(PY) -m pytest -q -p no:cacheprovider tests/integration

test: unit integration

bench: build
	@scripts/bench $(BUILD)

model: build
	$(BUILD)/fleetml model train --synthetic --out models/viscosity

clean:
	rm -rf $(BUILD) $(TEST_BUILD)

distclean: clean
	rm -rf $(DATA)
