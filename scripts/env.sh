# Sourced by the other scripts: installs what is missing, then exports the build environment
# (venv with PyTorch 2.11 for tch, a shared cargo target dir outside the clone).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
eval "$(bash "$ROOT/scripts/setup.sh" --print-env)"
export LMMS_FT_HOME="${LMMS_FT_HOME:-$HOME/.cache/lmms-ft}"
# Shared across clones so a second clone (or CI run) reuses the compiled libtorch bindings.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$LMMS_FT_HOME/target}"
# The Python oracle the tests compare against.
export LMMS_FT_PYTHON="$VIRTUAL_ENV/bin/python"
cd "$ROOT"
