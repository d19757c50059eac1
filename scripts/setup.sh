#!/usr/bin/env bash
# Installs everything lmms-ft needs to build and test, and reuses it when present:
#   - Debian -dev packages for FFmpeg (video decoding), clang (bindgen), pkg-config
#   - a Python venv with PyTorch 2.11.0 (the libtorch tch 0.24 links against) and the
#     pinned oracle packages the tests compare against (transformers, peft, bitsandbytes).
# The venv lives outside the clone so that clones and CI runs share it.
# Override with LMMS_FT_VENV=/path; LMMS_FT_HOME changes the cache root.
# Source-able: prints `export` lines with --print-env.
set -euo pipefail

LMMS_FT_HOME="${LMMS_FT_HOME:-$HOME/.cache/lmms-ft}"
VENV="${LMMS_FT_VENV:-$LMMS_FT_HOME/venv}"
# Bump when the pins change so an old venv is upgraded rather than trusted.
PINS=(
  "torch==2.11.0"
  "torchvision==0.26.0"
  "transformers==5.23.0"
  "peft==0.21.2"
  "bitsandbytes==0.50.2"
  "safetensors"
  "pillow"
  "numpy"
  "psutil"
  # The reference ROUGE-L implementation `evaluate --generate` is checked against.
  "rouge-score==0.1.2"
)
STAMP="$VENV/.lmms-ft-pins"
# Phi-3-V's Hub remote code runs only under an older transformers: that oracle is installed
# by itself into a folder put in front of the venv's packages (PYTHONPATH), never into the venv.
PHI3V_ORACLE="${LMMS_FT_PHI3V_PYTHONPATH:-$LMMS_FT_HOME/oracle-tf445}"
PHI3V_PINS=(
  "transformers==4.45.2"
  "tokenizers==0.20.3"
  "huggingface-hub==0.26.5"
  "requests" "urllib3" "idna" "certifi" "charset-normalizer"
)
PHI3V_PIN_TEXT="$(printf '%s\n' "${PHI3V_PINS[@]}")"
PIN_TEXT="$(printf '%s\n' "${PINS[@]}")"

log() { echo "[setup] $*" >&2; }

install_debian_packages() {
  local need=()
  for p in libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev \
           libclang-dev clang pkg-config; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    log "installing Debian packages: ${need[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

install_venv() {
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PIN_TEXT" ] && [ -x "$VENV/bin/python" ]; then
    return 0
  fi
  log "creating Python venv at $VENV (PyTorch 2.11.0 + oracle packages; a few minutes the first time)"
  mkdir -p "$(dirname "$VENV")"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q "${PINS[@]}"
  printf '%s' "$PIN_TEXT" >"$STAMP"
}

install_phi3v_oracle() {
  local stamp="$PHI3V_ORACLE/.lmms-ft-pins"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PHI3V_PIN_TEXT" ]; then
    return 0
  fi
  log "installing the Phi-3-V oracle (transformers 4.45.2) into $PHI3V_ORACLE"
  "$VENV/bin/python" -m pip install -q --no-deps --upgrade --target "$PHI3V_ORACLE" "${PHI3V_PINS[@]}" >/dev/null
  printf '%s' "$PHI3V_PIN_TEXT" >"$stamp"
}

print_env() {
  cat <<ENV
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\$PATH"
export LIBTORCH_USE_PYTORCH=1
export LIBTORCH_BYPASS_VERSION_CHECK=0
export LMMS_FT_PHI3V_PYTHONPATH="$PHI3V_ORACLE"
ENV
}

case "${1:-}" in
  --print-env) print_env; exit 0 ;;
esac

install_debian_packages
install_venv
install_phi3v_oracle
log "ready: venv $VENV"
