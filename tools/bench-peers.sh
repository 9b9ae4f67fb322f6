#!/usr/bin/env bash
# wattn's flash forward against CubeK's (crate cubek-attention 0.3.1, Strategy::Unit: the kernel
# Burn calls FlashUnit) on the same adapter and shapes, in one run: one table and one JSON.
# Both are timed the same way: wall clock around launch-and-wait (wattn bench --wall-clock;
# CubeK's client.sync()), median of --runs after a checked warm-up run; wattn's naive
# baseline runs in the same bench where its score matrix fits. The plot (peers.svg) shows
# the three over the sequence length.
#
#   bash tools/bench-peers.sh [--seq 512,1k,2k,4k] [--head-dim 64,128] [--dtype f32,f16]
#                             [--causal both] [--runs 5] [--out DIR]
#
# The CubeK side is benches/peers/cubek, a crate of its own outside wattn's build and CI: its
# first build takes about 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

seq=512,1k,2k
head_dim=64,128
dtype=f32,f16
causal=both
runs=5
out=target/peers
while [ $# -gt 0 ]; do
    case "$1" in
        --seq) seq=$2 ;;
        --head-dim) head_dim=$2 ;;
        --dtype) dtype=$2 ;;
        --causal) causal=$2 ;;
        --runs) runs=$2 ;;
        --out) out=$2 ;;
        *) echo "bench-peers: unknown flag $1" >&2; exit 2 ;;
    esac
    shift 2
done
mkdir -p "$out"

bash tools/ensure-adapter.sh
# Mesa complains on every instance without a runtime directory; wattn makes its own, CubeK does not.
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
cargo build --release --bin wattn
(cd benches/peers/cubek && cargo build --release)

shape=(--seq "$seq" --head-dim "$head_dim" --dtype "$dtype" --causal "$causal" --batch 1 --heads 2 --runs "$runs")
./target/release/wattn bench "${shape[@]}" --wall-clock --json "$out/wattn.json"
benches/peers/cubek/target/release/wattn-peer-cubek "${shape[@]}" --json "$out/cubek.json"
python3 tools/peers_table.py "$out/wattn.json" "$out/cubek.json" "$out/peers.json" "$out/peers.svg"
