#!/usr/bin/env bash
# One device call that checks and measures what a change touched (docs: README "Measured results").
#
#   OUT=/tmp/out bash scripts/gpu_session.sh tests offload attention engine
#
# Steps run in the order given, each under its own time limit so one slow step cannot take the
# call's whole 10 minutes (the limits add up to more: give one call at most ~560 s of steps, e.g.
# "tests" then "offload attention" then "engine"); JSON and plots go to $OUT (what the device
# tool brings back), the logs to $OUT/logs.tgz, and the last lines printed are a short summary. Steps:
#   tests      the GPU tests: Triton kernels, fused decode, offload kernels and caches, engine (or $TEST_FILES);
#              on a fresh machine compiling them takes 4-6 minutes: give the whole set a call of its own
#   offload    bench offload at 256K: all-on-GPU vs in place (bf16, FP8) vs the GPU page cache; 1M: the default
#   offload_s0 bench offload at 1M (the default path) with HiPConfig.stage0_levels=3: 3/8 of stage 0's probe bytes
#   offload_probe  bench offload: 256K on the GPU and offloaded, 1M with the GPU probe copy (the default), with it +
#              stage0_levels=3, without it
#   lag        the GPU tests of HiPConfig.refresh_lag (pruning on a side stream), then bench offload at 1M
#              offloaded with lags 8, 16 and 24, and at 256K on the GPU and offloaded with lag 24
#   engine_lag  bench engine at 256K, hip only, refresh_lag=8
#   attention  bench attention: decode 128K and 1M, prefill 128K (dense in the same run)
#   attention_pdl  bench attention, decode 128K and 1M, with programmatic dependent launch (its A/B; off by default)
#   stage0     bench attention with HiPConfig.stage0_levels=3 (stage 0 stopped at 32-key pieces): decode 1M, prefill 128K
#   engine     bench engine at 256K: hip vs dense
#   engine_all bench engine at 32K, 128K and 256K: hip vs dense, with its plot (~3.5 min on a fresh machine)
#   timeline   scripts/attention_timeline.py and scripts/gemv_timeline.py: in-kernel timestamps of decode's launches
#   engine_pdl  bench engine at 256K, hip only, with programmatic dependent launch (its A/B; off by default)
#   sweep      scripts/sweep_prune.py: pruning launch settings (dense small-chunk scoring too), decode and prefill 128K
#              (SWEEP_DECODE="" skips decode)
#   reuse      scripts/sweep_prune.py --reuse 128K: the mask-reuse decode step's launch settings, the selection kernel's warps
#   gemv       scripts/sweep_gemv.py: decode's fused linear layers vs cuBLAS, per layer and launch, then a token's worth
#   runner     scripts/bench_runner.py: the server's BatchRunner at 70K tokens x 4 staggered rows, eager vs CUDA graphs
#   server     scripts/bench_server.py: the server over HTTP, 4 x 70K documents then a second question each, the
#              context cache in slots vs host copies (the fastapi/uvicorn/httpx wheels installed first)
#   server_offload  the same over offloaded slots, 2 x 70K (~100 s on a warm machine)
#   server_256k  the same, 2 x 256K documents, FP8 host store (a short warm-up document)
#   server_1m  the same, one 1M-token document, FP8 host store, prefilled layer by layer (~3 minutes)
#   prefill_threshold  scripts/prefill_threshold.py: a 70K prompt's chunked prefill, dense/sparse per prompt vs per chunk
#   prefill_offload  the same offloaded, 70K and 256K: layer by layer (the default) vs chunk by chunk
#   prefill_1m  an offloaded 1M-token prompt's prefill, FP8 host store, layer by layer (one repeat: ~minutes)
#   dropin     scripts/bench_dropin.py: the transformers drop-in (sdpa / infinitehip / + HiPCache) at 32K and 128K,
#              4 layers of the 8B shape, and the profiler table of HiPCache decode steps (dropin.profile.txt)
#   cache      bring Triton's compiled kernels back as $OUT/triton_cache.tgz (see below)
#   ncu        Nsight Compute on that step's kernel (default settings, 2 launches), where the machine allows it
#   ncu_prune  Nsight Compute on the pruning kernel, its three stages for a 16K-query prefill chunk at 128K
#
# A fresh machine spends minutes compiling the Triton kernels. The step "cache" (last) brings
# Triton's cache back as $OUT/triton_cache.tgz (when under 15 MB; one of the 8 files a call
# returns); carried in as ./triton_cache.tgz (an ignored path), it is unpacked first, so only
# kernels whose source or constants changed compile again.
set -uo pipefail
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD/src}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if [ -f triton_cache.tgz ]; then
    mkdir -p "$TRITON_CACHE_DIR" && tar xzf triton_cache.tgz -C "$TRITON_CACHE_DIR" && echo "triton cache: unpacked"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
summary=()

step() {   # step NAME SECONDS COMMAND...: run, log, remember how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc in $((SECONDS - t0)) s; $(tail -n 1 "$OUT/$name.log")")
}

for s in "$@"; do
    case $s in
        tests) step tests 420 python -m pytest -q --maxfail=4 -rfE ${TEST_FILES:-tests/test_triton.py \
                   tests/test_fused_decode.py tests/test_offload_kernels.py tests/test_offload_gpu_cache.py \
                   tests/test_offload_graph.py tests/test_engine_gpu.py tests/test_engine_decode.py tests/test_fused.py} ;;
        offload) step offload 380 python -m infinitehip.bench offload --contexts 262144,1048576 \
                     --on-gpu-contexts 262144 --profile 32 --out "$OUT" \
                     --paths on_gpu,offload,offload_fp8,offload_page_cache,offload_fp8_page_cache ;;
        offload_s0) step offload_s0 300 python -m infinitehip.bench offload --contexts 1048576 --stage0-levels 3 \
                        --profile 32 --out "$OUT/stage0" ;;
        offload_probe) step offload_probe 420 bash -c 'set -e
                           b="python -m infinitehip.bench offload --profile 32"
                           $b --contexts 262144,1048576 --on-gpu-contexts 262144 --paths on_gpu,offload_page_cache \
                              --out "$OUT/probe16"
                           $b --contexts 1048576 --on-gpu-contexts "" --stage0-levels 3 --out "$OUT/probe16_s0"
                           $b --contexts 1048576 --on-gpu-contexts "" --probe-stride 0 --out "$OUT/probe0"' ;;
        lag) step lag 540 bash -c 'set -e
                 python -m pytest -x -q -rfE tests/test_engine_gpu.py tests/test_offload_graph.py -k lag
                 b="python -m infinitehip.bench offload --profile 32 --paths on_gpu,offload_page_cache"
                 for lag in 8 16 24; do
                     $b --contexts 1048576 --on-gpu-contexts "" --refresh-lag $lag --out "$OUT/lag$lag"
                 done
                 $b --contexts 262144 --on-gpu-contexts 262144 --refresh-lag 24 --out "$OUT/lag24_256k"' ;;
        engine_lag) step engine_lag 300 python -m infinitehip.bench engine --contexts 262144 --eager-steps 0 \
                        --backends hip --refresh-lag 8 --out "$OUT/engine_lag8" ;;
        attention) step attention 300 python -m infinitehip.bench attention --decode 128K,1M --prefill 128K \
                       --chunked "" --out "$OUT/attention.json" ;;
        attention_pdl) step attention_pdl 200 python -m infinitehip.bench attention --decode 128K,1M --prefill "" \
                           --chunked "" --pdl on --out "$OUT/attention_pdl.json" ;;
        stage0) step stage0 300 python -m infinitehip.bench attention --decode 1M --prefill 128K --chunked "" \
                    --stage0-levels 3 --out "$OUT/attention_stage0.json" ;;
        engine) step engine 400 python -m infinitehip.bench engine --contexts 262144 --eager-steps 0 --out "$OUT" ;;
        engine_all) step engine_all 420 python -m infinitehip.bench engine --contexts 32768,131072,262144 \
                        --eager-steps 0 --out "$OUT" ;;
        timeline) step timeline 300 bash -c 'set -e
                      python scripts/attention_timeline.py --out "$OUT/attention_timeline.json"
                      python scripts/gemv_timeline.py --out "$OUT/gemv_timeline.json"' ;;
        engine_pdl) step engine_pdl 200 python -m infinitehip.bench engine --contexts 262144 --eager-steps 0 \
                        --backends hip --pdl on --out "$OUT/pdl" ;;
        sweep) step sweep 400 python scripts/sweep_prune.py --decode "${SWEEP_DECODE-128K}" --prefill 128K \
                 --out "$OUT/sweep_prune.json" ;;
        reuse) step reuse 300 python scripts/sweep_prune.py --reuse 128K --decode "" --prefill "" \
                   --out "$OUT/sweep_reuse.json" ;;
        gemv) step gemv 400 python scripts/sweep_gemv.py --limit 6 --out "$OUT/sweep_gemv.json" ;;
        dropin) step dropin 300 python scripts/bench_dropin.py --contexts 32K,128K --layers 4 --profile \
                    --out "$OUT/dropin.json" ;;
        runner) step runner 300 python scripts/bench_runner.py --out "$OUT/runner.json" ;;
        server) step server 420 python scripts/bench_server.py --modes slots,host --out "$OUT/server_http.json" ;;
        server_offload) step server_offload 420 python scripts/bench_server.py --batch 2 --offload \
                            --out "$OUT/server_http_offload.json" ;;
        server_256k) step server_256k 420 python scripts/bench_server.py --batch 2 --fp8 --context 262144 \
                         --warm-context 70000 --max-tokens 128 --out "$OUT/server_http_offload_256k.json" ;;
        server_1m) step server_1m 580 python scripts/bench_server.py --batch 1 --fp8 --context 1048576 \
                       --warm-context 70000 --max-tokens 64 --out "$OUT/server_http_offload_1m.json" ;;
        prefill_threshold) step prefill_threshold 200 python scripts/prefill_threshold.py --threshold-zero \
                               --out "$OUT/prefill_threshold.json" ;;
        prefill_offload) step prefill_offload 450 bash -c 'set -e
                             for c in 70000 262144; do
                                 b="python scripts/prefill_threshold.py --offload --modes per_prompt --context $c"
                                 $b --out "$OUT/prefill_offload_layer_$c.json"
                                 $b --chunk-major --out "$OUT/prefill_offload_chunk_$c.json"
                             done' ;;
        prefill_1m) step prefill_1m 580 python scripts/prefill_threshold.py --fp8 --modes per_prompt --context 1048576 \
                        --repeats 1 --out "$OUT/prefill_offload_1m.json" ;;
        cache) export_cache=1 ;;
        ncu) step ncu 150 ncu --clock-control none -k regex:_bsa_kernel -c 2 --section SpeedOfLight \
                 --section WarpStateStats --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
                 python scripts/sweep_prune.py --reuse 128K --reuse-limit 1 --decode "" --prefill "" --out /tmp/ncu.json ;;
        ncu_prune) step ncu_prune 200 ncu --clock-control none -k regex:_score_chunks_kernel -c 3 \
                       --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
                       --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
                       python scripts/sweep_prune.py --decode "" --prefill 128K --limit 0 --out /tmp/ncu.json ;;
        *) echo "unknown step $s (tests, offload, offload_s0, offload_probe, lag, engine_lag, attention, attention_pdl, stage0, engine, engine_all, engine_pdl, timeline, sweep, reuse, gemv, runner, server, server_offload, server_256k, server_1m, prefill_threshold, prefill_offload, prefill_1m, dropin, cache, ncu, ncu_prune)"; exit 2 ;;
    esac
done
printf '%s\n' "${summary[@]}"
# The device tool brings back a handful of files: the logs travel as one archive.
(cd "$OUT" && shopt -s nullglob && tar czf logs.tgz device.txt ./*.log && rm -f device.txt ./*.log)
if [ -n "${export_cache:-}" ] && [ -d "$TRITON_CACHE_DIR" ]; then
    tar czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
    [ "$(stat -c %s "$OUT/triton_cache.tgz")" -lt 15000000 ] || rm -f "$OUT/triton_cache.tgz"
fi
