# stoa: the two commands are `make run` and `make test`; both install what is missing.
CARGO ?= cargo

.PHONY: run test deps build lint fmt check-configs docs clean

## Demo upstreams + gateway on config/demo.toml (gateway :8080, HTTPS :8443, admin :9901).
run: deps
	$(CARGO) build --release --workspace --bins
	./scripts/run-demo.sh

## Everything CI checks: unit and end-to-end tests, formatting and lints.
## promtool and prometheus (Debian's prometheus package) check the /metrics exposition, the
## scrape configuration and the dashboard's queries in the tests; mdbook builds the book in
## tests/docs_book.rs.
test: deps
	./scripts/install-promtool.sh >/dev/null
	./scripts/install-mdbook.sh
	STOA_PROMTOOL="$$(./scripts/install-promtool.sh)" $(CARGO) test --workspace --all-targets
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

deps:
	./scripts/install-deps.sh
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

build: deps
	$(CARGO) build --release --workspace --bins

## Validate every shipped configuration, like `nginx -t`.
check-configs: build
	for f in config/*.toml; do ./target/release/stoa check --config $$f || exit 1; done

## The book under docs/: regenerate the configuration reference from config/stoa.schema.json,
## then build the HTML into docs/book/.
docs:
	./scripts/install-mdbook.sh
	python3 scripts/config-reference.py
	PATH="$$PATH:$${CARGO_HOME:-$$HOME/.cargo}/bin" mdbook build docs

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
