#!/usr/bin/env bash
# The library without its default `cli` feature: it builds, and none of the CLI's crates
# (clap, serde, serde_json, npyz) is among its dependencies, nor naga beyond what wgpu needs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --lib --no-default-features
tree=$(cargo tree -e normal --no-default-features --prefix none)
bad=$(grep -E '^(clap|serde|serde_json|npyz|criterion) ' <<<"$tree" || true)
if [ -n "$bad" ]; then
    echo "check-lean-library: the library without the cli feature depends on:" >&2
    echo "$bad" | sort -u >&2
    exit 1
fi
# wgpu compiles the naga writers its backends need; wattn itself adds none.
direct=$(cargo tree -e normal --no-default-features --depth 1 --prefix none | tail -n +2)
if grep -q '^naga ' <<<"$direct"; then
    echo "check-lean-library: the library depends on naga directly (only the CLI and tests should)" >&2
    exit 1
fi
echo "check-lean-library: the library builds alone; no CLI crates, no naga of its own"
