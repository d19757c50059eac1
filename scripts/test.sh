#!/usr/bin/env bash
# The whole test suite: installs what is missing (first run: a few minutes), builds, tests.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cargo test --workspace "$@"
