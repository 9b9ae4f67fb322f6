#!/usr/bin/env bash
# WebGPU conformance of every shader variant wattn builds, on Dawn/Tint (the WebGPU
# implementation of Chromium), beside the naga checks of `cargo test`.
#
#   bash tools/webgpu-check.sh          validation of every variant, a sample of pipelines, the runs
#   bash tools/webgpu-check.sh --all    every pipeline the adapter's limits admit (slow: ~1 s each)
#
# 1. `wattn shaders --emit` writes every variant with a manifest (README.md, "WebGPU
#    conformance").
# 2. Dawn for Node (npm package `webgpu`, null backend, which has shader-f16) compiles every
#    f16 variant and builds the pipelines its limits admit (tools/webgpu/node-check.mjs).
# 3. Headless Chromium opens tools/webgpu/index.html from a server on 127.0.0.1
#    (tools/webgpu/serve.py): its SwiftShader adapter compiles every f32 variant, builds
#    pipelines and runs the attention kernels against an f64 reference in JS
#    (check.js, cases.js, reference.js), then posts its results back to the server.
# 4. tools/webgpu/report.py prints pass counts per kernel family; any failure exits 1.
#
# Installs what it needs when missing (Debian/Ubuntu, as root or with password-less sudo):
# chromium, nodejs and npm; the `webgpu` package goes to tools/webgpu/node_modules.
# WEBGPU_CHECK_TIMEOUT (seconds; default 900, 2400 with --all) bounds the browser part: a
# bound on a hung page, well above the 5 minutes SwiftShader takes to build the sample cold.
set -euo pipefail
cd "$(dirname "$0")/.."

all=0
for arg in "$@"; do
  case "$arg" in
    --all) all=1 ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "webgpu-check: unknown argument '$arg' (use --all or --help)" >&2; exit 2 ;;
  esac
done
timeout_s=${WEBGPU_CHECK_TIMEOUT:-$([ "$all" = 1 ] && echo 2400 || echo 900)}

say() { echo "webgpu-check: $*"; }
fail() { echo "webgpu-check: error: $*" >&2; exit 1; }

# Debian's packages, installed when the command is missing.
install_missing() {
  local missing=() cmd pkg
  while [ $# -gt 0 ]; do
    cmd=$1 pkg=$2
    shift 2
    command -v "$cmd" >/dev/null || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null ||
      fail "needs ${missing[*]}: install them (apt-get install -y ${missing[*]})"
    sudo="sudo -n"
  fi
  command -v apt-get >/dev/null || fail "needs ${missing[*]}, and this is not a Debian/Ubuntu machine: install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
install_missing chromium chromium node nodejs npm npm python3 python3

work=$(mktemp -d)
server_pid="" browser_pid=""
cleanup() {
  for pid in $browser_pid $server_pid; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

started=$SECONDS
say "emitting the shader variants"
# The wattn binary `cargo test` builds (for its CLI tests), so that CI compiles nothing twice.
wattn=$(cargo test --no-run --quiet --test shaders_emit --message-format=json-render-diagnostics | python3 -c '
import json, sys
artifacts = [json.loads(line) for line in sys.stdin]
print(next(a["executable"] for a in artifacts if a.get("reason") == "compiler-artifact" and a["target"]["kind"] == ["bin"]))
') || fail "building the wattn binary failed"
"$wattn" shaders --emit "$work/shaders"

say "f16 variants on Dawn for Node (null backend)"
(cd tools/webgpu && npm install --no-audit --no-fund --loglevel=error >/dev/null) ||
  fail "npm install in tools/webgpu failed"
node tools/webgpu/node-check.mjs "$work/shaders" "$work/dawn-node.json"

say "f32 variants in headless Chromium ($(chromium --version 2>/dev/null | head -1))"
python3 tools/webgpu/serve.py --shaders "$work/shaders" --results "$work/chromium.json" \
  --port-file "$work/port" --timeout "$timeout_s" &
server_pid=$!
for _ in $(seq 100); do
  [ -s "$work/port" ] && break
  kill -0 "$server_pid" 2>/dev/null || fail "the page server (tools/webgpu/serve.py) did not start"
  sleep 0.1
done
[ -s "$work/port" ] || fail "the page server (tools/webgpu/serve.py) did not start"
page="http://127.0.0.1:$(cat "$work/port")/index.html"
if [ "$all" = 1 ]; then page+="?all"; fi
# SwiftShader's WebGPU adapter needs no flag beyond --enable-unsafe-webgpu; the rest keep a
# headless browser quiet on the network and off any earlier profile.
chromium --headless=new --no-sandbox --enable-unsafe-webgpu \
  --disable-background-networking --disable-component-update --disable-sync --no-first-run --disable-quic \
  --user-data-dir="$work/profile" "$page" >"$work/chromium.log" 2>&1 &
browser_pid=$!
while kill -0 "$server_pid" 2>/dev/null; do
  if ! kill -0 "$browser_pid" 2>/dev/null; then
    tail -20 "$work/chromium.log" >&2
    fail "chromium exited before the page posted its results (its log is above)"
  fi
  sleep 0.5
done
wait "$server_pid" || fail "no results from the page within ${timeout_s} s (WEBGPU_CHECK_TIMEOUT); chromium was stopped"

python3 tools/webgpu/report.py "$work/shaders/manifest.json" "$work/dawn-node.json" "$work/chromium.json" || {
  say "FAILED after $((SECONDS - started)) s"
  exit 1
}
say "passed in $((SECONDS - started)) s"
