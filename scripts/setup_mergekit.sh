#!/usr/bin/env bash
# Idempotently create an isolated venv holding mergekit (the reference
# implementation evomerge is checked and benchmarked against).
#
#   scripts/setup_mergekit.sh            # install (first run) / verify (later runs)
#   MK=$(scripts/setup_mergekit.sh | tail -n1)   # path of mergekit-yaml
#
# Environment:
#   MERGEKIT_VENV     venv location (default: $HOME/.cache/evomerge/mergekit-venv;
#                     kept out of the repo on purpose)
#   MERGEKIT_VERSION  pin a mergekit release (default: latest on PyPI)
#   TORCH_VERSION     torch pin (default 2.13.0: the CPU wheel on local disk;
#                     an unpinned `pip install torch` would pull CUDA builds)
#   PYTHON            interpreter used to create the venv (default python3)
#   FORCE=1           ignore the stamp and reinstall into the existing venv
#
# Progress goes to stderr; stdout carries only the mergekit-yaml path, on the
# last line. A stamp file inside the venv makes the second run take ~1 s.
set -euo pipefail

VENV="${MERGEKIT_VENV:-$HOME/.cache/evomerge/mergekit-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MERGEKIT_VERSION="${MERGEKIT_VERSION:-}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.evomerge-mergekit.stamp"
MK="$VENV/bin/mergekit-yaml"
# What the stamp records: a change in the requested pins forces a reinstall.
WANT="torch=${TORCH_VERSION} mergekit=${MERGEKIT_VERSION:-latest}"

log() { echo "[setup_mergekit] $*" >&2; }

if [[ "${FORCE:-0}" != "1" && -f "$STAMP" && -x "$MK" && -x "$VENV/bin/python" ]] \
   && [[ "$(head -n1 "$STAMP")" == "$WANT" ]]; then
    log "already installed ($(sed -n 2p "$STAMP")); stamp: $STAMP"
    echo "$MK"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv at $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -qq --upgrade pip >&2

# torch first, pinned, so that mergekit's `torch>=2.0.0` is already satisfied
# and pip never resolves a (CUDA) torch from the index.
log "installing torch==${TORCH_VERSION}"
"${PIP[@]}" install -qq "torch==${TORCH_VERSION}" >&2

# mergekit brings the transformers it accepts (0.1.5: transformers>=5,<6).
# The torch pin is repeated so the resolver cannot swap it out.
if [[ -n "$MERGEKIT_VERSION" ]]; then
    MK_SPEC="mergekit==${MERGEKIT_VERSION}"
else
    MK_SPEC="mergekit"
fi
log "installing ${MK_SPEC} (+ its transformers)"
"${PIP[@]}" install -qq --upgrade "$MK_SPEC" "torch==${TORCH_VERSION}" >&2

[[ -x "$MK" ]] || { log "ERROR: $MK missing after install"; exit 1; }

versions=$("$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}={version(p)}" for p in ("mergekit", "transformers", "torch", "safetensors")))
EOF
)
# Smoke test: the CLI imports (catches torch/transformers incompatibilities).
HF_HUB_OFFLINE=1 "$MK" --help >/dev/null

printf '%s\n%s\n' "$WANT" "$versions" > "$STAMP"
log "installed in $(( $(date +%s) - start )) s: $versions"
echo "$MK"
