#!/usr/bin/env bash
# Render RUN/report.html in headless Chromium (Debian's package: apt-get install chromium) and save a
# full-page PNG screenshot beside it. Usage: benchmarks/screenshot_report.sh RUN_DIR [OUT.png]
set -euo pipefail
run="$1"
out="${2:-$run/report.png}"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
  --window-size=1200,1900 --screenshot="$out" "file://$(realpath "$run/report.html")" 2>/dev/null
test -s "$out" && echo "screenshot: $out"
