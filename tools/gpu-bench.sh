#!/usr/bin/env bash
# wattn's figures on a machine with a real GPU, built here and run there:
#
#   bash tools/gpu-bench.sh build        here: a release binary and this machine's Vulkan loader
#                                        (libvulkan.so.1) in target/gpu-bench/
#   bash tools/gpu-bench.sh run          there, in a copy of this tree that carries target/gpu-bench:
#                                        info, peak, tune (d64, d128), bench (prefill d128 f16 and
#                                        f32, N 1K-16K, causal both) and bench --decode (splits 1 to
#                                        16 and auto), into $OUT (default target/gpu-bench/out), and
#                                        $OUT/bench-<adapter>.md where python3 exists
#   bash tools/gpu-bench.sh report DIR [FILE]
#                                        here: the markdown of a run's DIR into FILE (default
#                                        docs/bench-<adapter>.md)
#
# The run needs neither Rust nor a network, only a Vulkan driver (NVIDIA's ICD on a GPU machine).
# Its steps together stay within 8 minutes on an H100/H200: each has its own timeout (and the
# benchmarks a time budget below it), so a step that hangs loses only its own output, and
# $OUT/steps.txt says how each ended. QUICK=1 shrinks every step to seconds, to try the whole
# script on any adapter (llvmpipe included).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/gpu-bench

build() {
    cargo build --release --bin wattn
    local loader
    loader=$(ldconfig -p | awk '$1 == "libvulkan.so.1" { print $NF; exit }')
    if [ -z "$loader" ]; then
        echo "gpu-bench: no libvulkan.so.1 in ldconfig -p; install libvulkan1" >&2
        exit 1
    fi
    mkdir -p "$dir"
    cp target/release/wattn "$dir/wattn"
    cp -L "$loader" "$dir/libvulkan.so.1"
    echo "gpu-bench: $dir holds wattn and the Vulkan loader ($loader), $(du -sh "$dir" | cut -f1)"
    echo "gpu-bench: run there with: bash tools/gpu-bench.sh run   (carrying $dir)"
}

# step NAME SECONDS COMMAND...: runs COMMAND with stdout to $out/NAME.txt and stderr to
# $out/NAME.err, stopped after SECONDS; records how it ended in $out/steps.txt and goes on.
step() {
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS status=0
    echo "gpu-bench: $name (at most $seconds s)"
    timeout -k 2 "$seconds" "$@" >"$out/$name.txt" 2>"$out/$name.err" || status=$?
    local took=$((SECONDS - start))
    case $status in
        0) echo "$name ok $took s" >>"$out/steps.txt" ;;
        124 | 137) echo "$name timed out after $seconds s" >>"$out/steps.txt" ;;
        *) echo "$name failed (exit $status) after $took s: $(grep -m1 'wattn: error' "$out/$name.err" || tail -n1 "$out/$name.err")" >>"$out/steps.txt" ;;
    esac
    tail -n1 "$out/steps.txt"
}

run() {
    out=${OUT:-$dir/out}
    mkdir -p "$out"
    : >"$out/steps.txt"
    local wattn=$dir/wattn
    if [ ! -x "$wattn" ]; then
        echo "gpu-bench: $wattn is missing: run 'bash tools/gpu-bench.sh build' first and carry $dir" >&2
        exit 1
    fi
    export LD_LIBRARY_PATH=$PWD/$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    # The winners of this run, and only they, are what its benchmarks run.
    export WATTN_TUNE_CACHE=$out/tuning
    rm -f "$WATTN_TUNE_CACHE"

    local peak_runs=10 tune=(--seq 4k --heads 16 --runs 5) prefill=(--seq 1k,2k,4k,8k,16k --runs 5 --budget 70)
    local decode=(--runs 10 --budget 60)
    if [ "${QUICK:-0}" = 1 ]; then
        peak_runs=2
        tune=(--seq 64 --heads 1 --runs 1)
        prefill=(--seq 128,256 --batch 1 --heads 2 --runs 1 --budget 20)
        decode=(--seq 1k,2k --head-dim 64 --heads 4 --kv-heads 2 --runs 1 --budget 20)
    fi
    # Timeouts: 15 + 30 + 55 + 70 + 15 + 90 + 90 + 80 + 10 = 455 s, 473 s with the 2 s each
    # step may take to stop: within 8 minutes however the steps end.
    step info 15 "$wattn" info
    step peak 30 "$wattn" peak --runs "$peak_runs" --json "$out/peak.json"
    step tune-d64 55 "$wattn" tune --head-dim 64 --dtype both --causal both "${tune[@]}" --json "$out/tune-d64.json"
    step tune-d128 70 "$wattn" tune --head-dim 128 --dtype both --causal both "${tune[@]}" --json "$out/tune-d128.json"
    step info-tuned 15 "$wattn" info
    for dtype in f16 f32; do
        step "prefill-$dtype" 90 "$wattn" bench --head-dim 128 --dtype "$dtype" --causal both "${prefill[@]}" \
            --no-peak --json "$out/prefill-$dtype.json"
    done
    step decode 80 "$wattn" bench --decode --splits 1,2,4,8,16,auto "${decode[@]}" --no-peak --json "$out/decode.json"
    if command -v python3 >/dev/null; then
        step report 10 python3 tools/gpu_bench_md.py "$out"
    else
        echo "report skipped: no python3 (run 'bash tools/gpu-bench.sh report DIR' where it is)" >>"$out/steps.txt"
    fi
    echo "gpu-bench: everything is in $out"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    report)
        [ $# -ge 2 ] || { echo "usage: bash tools/gpu-bench.sh report DIR [FILE]" >&2; exit 2; }
        python3 tools/gpu_bench_md.py "$2" "${3:-docs}"
        ;;
    *)
        echo "usage: bash tools/gpu-bench.sh build|run|report DIR [FILE]" >&2
        exit 2
        ;;
esac
