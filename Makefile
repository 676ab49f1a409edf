# Developer entry points; the logic lives in scripts/ so it can be read and run alone.
SHELL := bash
.DEFAULT_GOAL := help
VERSION := $(shell awk -F'"' '/^\[/ { pkg = ($$0 == "[package]") } pkg && /^version *=/ { print $$2; exit }' Cargo.toml)

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  %-14s%s\n", $$1, $$2 }'

.PHONY: up-dev
up-dev: ## Start PostgreSQL, the demo exporter and the service (compose if Docker runs), print URLs
	@bash scripts/up-dev.sh

.PHONY: down
down: ## Stop what up-dev started
	@bash scripts/down.sh

.PHONY: test
test: ## Run all Rust tests against a real PostgreSQL (TEST_STORAGE=timescaledb|postgresql|both|auto), then smoke-test up-dev
	@bash scripts/test.sh

.PHONY: fuzz
fuzz: ## Fuzz the HTTP API against its OpenAPI description (schemathesis, with and without the key)
	@bash scripts/fuzz-openapi.sh

.PHONY: bench
bench: ## Run cargo bench against the same PostgreSQL as the tests
	@bash scripts/bench.sh

.PHONY: mutants
mutants: ## Mutation testing (cargo-mutants) of billing charges/money/rules and the parser
	@bash scripts/mutants.sh

.PHONY: lint
lint: ## Check formatting and clippy warnings
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

.PHONY: docker-build
docker-build: ## Build the production image os-credits:<version from Cargo.toml>
	docker build -t os-credits:$(VERSION) .
