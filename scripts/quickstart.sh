#!/usr/bin/env bash
# The main job on built-in defaults: installs what is missing, builds lmms-ft, lists the
# supported models and runs the libtorch self-check.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cargo build --bin lmms-ft
BIN="$CARGO_TARGET_DIR/debug/lmms-ft"
"$BIN" list-models
"$BIN" doctor
