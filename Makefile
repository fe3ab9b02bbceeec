# Elo — the two commands that matter are `make run` and `make test`.
SHELL := /bin/bash
export ELO_TOOLS_DIR ?= $(HOME)/.cache/elo/tools
CARGO ?= cargo
# Test stack ports differ from `make run`'s so both can run on one machine.
TEST_KAFKA_PORT ?= 19092
TEST_REGISTRY_PORT ?= 18081

.PHONY: run test setup build fmt-check lint unit-and-integration bench bench-salesforce clean-data images asyncapi-html

## run: install tools if missing, start broker + registry + all services; Ctrl-C stops all
run: setup build
	scripts/stack.sh --data .data -- scripts/run-local.sh

## test: format check, clippy -D warnings, unit and integration tests against a real broker
test: setup fmt-check lint build unit-and-integration

setup:
	scripts/install-tools.sh --with-python

build:
	$(CARGO) build --workspace --bins

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-and-integration:
	ELO_STACK_KAFKA_PORT=$(TEST_KAFKA_PORT) ELO_STACK_REGISTRY_PORT=$(TEST_REGISTRY_PORT) \
	  scripts/stack.sh -- $(CARGO) nextest run --workspace --profile ci

# The benches keep the broker's data on tmpfs when /dev/shm has room for it: on a disk, Tansu's
# acknowledgements had a longer tail (likely its sqlite WAL checkpoints), which Kafka,
# acknowledging from the page cache, does not have (see the README). A caller's
# ELO_STACK_DATA_PARENT wins; `make bench BENCH_DATA_PARENT=/tmp` measures on disk.
BENCH_SHM_FREE_KB := $(shell df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $$4 }')
BENCH_DATA_PARENT ?= $(or $(ELO_STACK_DATA_PARENT),$(shell test -w /dev/shm && test "0$(BENCH_SHM_FREE_KB)" -gt 8000000 && echo /dev/shm),$${TMPDIR:-/tmp})

## bench: throughput benchmarks, reported as ratios against a baseline of the same run
bench: setup build
	ELO_STACK_DATA_PARENT=$(BENCH_DATA_PARENT) \
	ELO_STACK_KAFKA_PORT=$(TEST_KAFKA_PORT) ELO_STACK_REGISTRY_PORT=$(TEST_REGISTRY_PORT) \
	  scripts/stack.sh -- bash -c '$(CARGO) build --release -p elo-integration-tests --bins -p order-ingest -p salesforce-sink -p rdstation-sink && \
	    $(CARGO) run --release -p elo-integration-tests --bin elo-bench'

## bench-salesforce: salesforce-sink's bench (ELO_BENCH=salesforce), each run on a fresh stack
bench-salesforce: setup build
	$(CARGO) build --release -p elo-integration-tests --bins -p salesforce-sink
	for run in live graph bulk; do \
	  ELO_BENCH=salesforce ELO_BENCH_SF_RUNS=$$run ELO_STACK_DATA_PARENT=$(BENCH_DATA_PARENT) \
	  ELO_STACK_KAFKA_PORT=$(TEST_KAFKA_PORT) ELO_STACK_REGISTRY_PORT=$(TEST_REGISTRY_PORT) \
	    scripts/stack.sh -- $(CARGO) run --release -p elo-integration-tests --bin elo-bench || exit 1; \
	done

## images: one container image per service (Docker, else Podman); needs the base images' registries
IMAGE_TAG ?= dev
IMAGE_SERVICES := order-ingest salesforce-sink rdstation-sink reconciler
images:
	@engine=$$(command -v docker || command -v podman) || { echo "images: install docker or podman" >&2; exit 1; }; \
	for s in $(IMAGE_SERVICES); do \
	  $$engine build --build-arg SERVICE=$$s -t elo/$$s:$(IMAGE_TAG) . || exit 1; \
	done

## asyncapi-html: the event catalog (docs/asyncapi.yaml) as one HTML page, target/asyncapi/index.html
asyncapi-html:
	python3 tests/python/deploy_checks.py asyncapi-html target/asyncapi

clean-data:
	rm -rf .data
