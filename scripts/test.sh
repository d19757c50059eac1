#!/usr/bin/env bash
# The whole test suite: installs what is missing (first run: a few minutes), builds, tests.
# The property tests of core/tests/fuzz_inputs.rs print one `fuzz <target>: N cases in S s`
# line each (fixed seeds; PROPTEST_CASES=N scales them from their default of about 256).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cargo test --workspace "$@"
