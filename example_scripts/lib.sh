# Shared by the example scripts (sourced, not run): the `--tiny` flag, the lmms-ft binary, a
# fresh directory per run, and the tiny models the oracle scripts write with transformers.
set -euo pipefail

EXAMPLES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$EXAMPLES")"
NAME="$(basename "$0" .sh)"

TINY=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "$NAME: unknown argument $arg (--tiny, --help)" >&2; exit 2 ;;
  esac
done

# The binary: $LMMS_FT, else lmms-ft on PATH.
LMMS_FT="${LMMS_FT:-lmms-ft}"
command -v "$LMMS_FT" > /dev/null || {
  echo "$NAME: $LMMS_FT not found; build it (cargo build --release --bin lmms-ft) and set LMMS_FT=PATH" >&2
  exit 2
}

# Every run writes under a directory of its own, so a rerun never mixes with (or refuses
# to start over) an earlier run's outputs. RUN_DIR overrides it.
RUN="${RUN_DIR:-$PWD/lmms-ft-runs/$NAME-$(date +%Y%m%d-%H%M%S)-$$}"
mkdir -p "$RUN"

say() { echo "==> $*"; }

# --tiny: tiny random models written by transformers (the test oracles' venv, which
# scripts/env.sh sets up), a few generated samples, CPU, a couple of steps per stage.
TINY_SETS=()
if [ "$TINY" = 1 ]; then
  PY="${LMMS_FT_PYTHON:-}"
  [ -x "$PY" ] || { echo "$NAME: --tiny needs the oracle venv: source scripts/env.sh first" >&2; exit 2; }
  HUB_FILES="$REPO/tests/data/hub"
  TINY_SETS=(--set train.device=cpu --set train.precision=fp32 --set train.max_steps=2
             --set train.batch_size=2 --set train.grad_accum=1 --set train.logging_steps=1
             --set train.gradient_checkpointing=false --set train.dataloader_workers=1)
fi
tiny_python() { "$PY" "$@" > "$RUN/oracle.log" 2>&1 || { cat "$RUN/oracle.log" >&2; exit 1; }; }
