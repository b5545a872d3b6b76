#!/bin/sh
# Installs mdbook (the book under docs/ is built with it) with `cargo install --locked
# mdbook` when it is on neither PATH nor ~/.cargo/bin; quiet when it is there. Prints
# nothing on success when already installed; cargo's progress goes to stderr otherwise.
set -eu

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
if command -v mdbook >/dev/null 2>&1 || [ -x "$CARGO_BIN/mdbook" ]; then
    exit 0
fi

echo "install-mdbook: installing mdbook with cargo install --locked mdbook" >&2
${CARGO:-cargo} install --locked mdbook >&2
