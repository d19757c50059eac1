#!/usr/bin/env bash
# The main job on built-in defaults: installs what is missing, builds lmms-ft, lists the
# supported models, runs the libtorch self-check, then the demo: a tiny Qwen2-VL trained from
# scratch on generated pictures, answering held-out ones (output in ./lmms-ft-demo).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cargo build --bin lmms-ft
BIN="$CARGO_TARGET_DIR/debug/lmms-ft"
"$BIN" list-models
"$BIN" doctor
"$BIN" demo --out "${LMMS_FT_DEMO_DIR:-lmms-ft-demo}"
