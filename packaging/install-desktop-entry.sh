#!/usr/bin/env bash
# Add a built qdesk bundle to the Linux desktop's application menu (for this user; no root needed).
#
#   install-desktop-entry.sh [BUNDLE_FOLDER]   # default: the folder this script is in, else .cache/packaging/dist/qdesk
#   install-desktop-entry.sh --remove
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA="${XDG_DATA_HOME:-$HOME/.local/share}"
ENTRY="$DATA/applications/qdesk.desktop"
SVG_ICON="$DATA/icons/hicolor/scalable/apps/qdesk.svg"
PNG_ICON="$DATA/icons/hicolor/256x256/apps/qdesk.png"

refresh_menu() {
    if command -v update-desktop-database >/dev/null; then
        update-desktop-database -q "$DATA/applications" || true
    fi
}

if [[ "${1:-}" == "--remove" ]]; then
    rm -f "$ENTRY" "$SVG_ICON" "$PNG_ICON"
    refresh_menu
    echo "removed qdesk's desktop entry and icons"
    exit 0
fi

if [[ $# -ge 1 ]]; then
    bundle="$(cd "$1" && pwd)"
elif [[ -x "$HERE/qdesk" ]]; then
    bundle="$HERE"
else
    bundle="$(cd "$HERE/.." && pwd)/.cache/packaging/dist/qdesk"
fi
[[ -x "$bundle/qdesk" && -f "$bundle/qdesk.desktop" ]] || {
    echo "no built bundle at $bundle; run packaging/build.sh first or name the bundle folder" >&2
    exit 1
}

mkdir -p "$(dirname "$ENTRY")" "$(dirname "$SVG_ICON")" "$(dirname "$PNG_ICON")"
cp "$bundle/qdesk.svg" "$SVG_ICON"
cp "$bundle/qdesk.png" "$PNG_ICON"
sed -e "s|^Exec=qdesk |Exec=\"$bundle/qdesk\" |" -e "s|^TryExec=qdesk$|TryExec=$bundle/qdesk|" \
    "$bundle/qdesk.desktop" >"$ENTRY"
refresh_menu
echo "installed $ENTRY (runs $bundle/qdesk)"
