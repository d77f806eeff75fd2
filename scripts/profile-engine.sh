#!/usr/bin/env bash
# scripts/profile-engine.sh OUT [CASE ...]        (in the GPU-host bundle: ./run profile:engine OUT [CASE ...])
#
# Nsight Compute profiles of exactly one forward of each case of the GPU engine (issue 22): bench:engine
# --profile-case CASE loads the model, warms the case up, and brackets one forward with cuProfilerStart /
# cuProfilerStop; ncu runs with --profile-from-start off, so it records that forward and nothing else (not the dummy
# weights' generation, not the warm-up). One process per case and variant, so each report holds one forward:
#   prefill:<tokens>                  one prompt in one forward (variant "prefill")
#   decode:b<batch>:ctx<context>      one decode step, twice: replayed as the CUDA graph the engine uses
#                                     (--graph-profiling node: ncu profiles each kernel node), and issued eagerly
#                                     (bench:engine --graphs off)
# Default cases: the rows of docs/measurements.md that miss issue 22's targets.
#
# For each case and variant, under OUT: <name>.ncu-rep (open it with ncu-ui or `ncu --import`), <name>.csv (the raw
# page of the metrics below), <name>.md and <name>.json (scripts/ncu-summary.ts: time per kernel class and per
# kernel, DRAM GB/s), <name>.log (ncu's and the benchmark's output); and OUT/summary.md, all the summaries in one.
# Clocks stay as the driver sets them (--clock-control none), as in bench:engine's timings.
#
# Environment: MODEL (default dummy:llama-3.1-8b), NCU (default: ncu on PATH, else /usr/local/cuda/bin/ncu),
# VARIANTS (decode variants, default "graph eager"), NODE (default: ./node of the bundle, else node on PATH),
# REPLAY (ncu's --replay-mode: unset, ncu's default, kernel replay, which saves and restores the memory a kernel
# writes between its passes; REPLAY=application reruns the whole benchmark per pass instead, for cases whose KV
# pool is tens of GB: decode:b128:ctx3072 writes into a 51 GB pool, and under kernel replay it did not finish in
# 290 s). Under application replay every pass must launch the same kernels, so TANDEM_GEMM_TUNE defaults to 0 there
# (the heuristic's first algorithm per GEMM shape: autotuning picks by timing, and one run's pick can differ from the
# next's).
set -euo pipefail

usage() {
  echo "usage: scripts/profile-engine.sh OUT [prefill:<tokens> | decode:b<batch>:ctx<context> ...]" >&2
  exit 2
}
[ $# -ge 1 ] || usage
out="$1"
shift
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(prefill:3000 prefill:8192 decode:b1:ctx3072 decode:b16:ctx8192 decode:b64:ctx512 decode:b128:ctx3072)
for c in "${cases[@]}"; do
  [[ "$c" =~ ^prefill:[1-9][0-9]*$ || "$c" =~ ^decode:b[1-9][0-9]*:ctx[1-9][0-9]*$ ]] ||
    { echo "profile-engine: bad case '$c'" >&2; usage; }
done

mkdir -p "$out"
out="$(cd "$out" && pwd)" # absolute: the script runs from the package root
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="${MODEL:-dummy:llama-3.1-8b}"
node="${NODE:-}"
if [ -z "$node" ]; then
  if [ -x "$root/node" ]; then node="$root/node"; else node="$(command -v node || true)"; fi
fi
[ -n "$node" ] || { echo "profile-engine: no node: run it from the GPU-host bundle, or set NODE" >&2; exit 2; }
ncu="${NCU:-}"
if [ -z "$ncu" ]; then
  ncu="$(command -v ncu || true)"
  if [ -z "$ncu" ] && [ -x /usr/local/cuda/bin/ncu ]; then ncu=/usr/local/cuda/bin/ncu; fi
fi
[ -n "$ncu" ] || { echo "profile-engine: no ncu (Nsight Compute) on PATH or in /usr/local/cuda/bin; set NCU" >&2; exit 2; }
metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed
# The tensor pipe's share (mma.sync kernels' compute bound), where this ncu knows the metric on this GPU.
tensor=sm__pipe_tensor_op_hmma_cycles_active
if "$ncu" --query-metrics 2>/dev/null | grep "^$tensor " >/dev/null; then metrics="$metrics,$tensor.avg.pct_of_peak_sustained_active"; fi
summary="$out/summary.md"
{
  echo "# ncu: one forward per case, $model"
  echo
  echo "$("$ncu" --version | tail -1); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)"
  echo
} >"$summary"

failed=0
for c in "${cases[@]}"; do
  if [[ "$c" == prefill:* ]]; then variants=(prefill); else read -r -a variants <<<"${VARIANTS:-graph eager}"; fi
  for v in "${variants[@]}"; do
    name="$(echo "$c" | tr ':' '-')"
    [ "$v" = prefill ] || name="$name-$v"
    graphs=on
    [ "$v" = eager ] && graphs=off
    echo "profile-engine: $c ($v) -> $out/$name.*" >&2
    start=$(date +%s)
    replay=()
    if [ -n "${REPLAY:-}" ]; then
      replay=(--replay-mode "$REPLAY")
      [ "$REPLAY" != application ] || export TANDEM_GEMM_TUNE="${TANDEM_GEMM_TUNE:-0}"
    fi
    if ! "$ncu" --profile-from-start off --clock-control none --graph-profiling node --target-processes all \
      ${replay[@]+"${replay[@]}"} --metrics "$metrics" -f -o "$out/$name" \
      "$node" --import tsx bench/engine.ts --device cuda --model "$model" --profile-case "$c" --graphs "$graphs" \
      >"$out/$name.log" 2>&1; then
      echo "profile-engine: $c ($v) failed; the end of $out/$name.log:" >&2
      tail -20 "$out/$name.log" >&2
      failed=1
      continue
    fi
    if ! "$ncu" --import "$out/$name.ncu-rep" --csv --page raw --print-units base --metrics "$metrics" \
      >"$out/$name.csv" ||
      ! "$node" --import tsx scripts/ncu-summary.ts "$out/$name.csv" --json "$out/$name.json" >"$out/$name.md"; then
      echo "profile-engine: $c ($v): no summary of $out/$name.csv" >&2
      failed=1
      continue
    fi
    {
      echo "## $c ($v)"
      echo
      grep '^profiled ' "$out/$name.log" || true
      echo
      cat "$out/$name.md"
      echo
    } >>"$summary"
    echo "profile-engine: $c ($v) done in $(($(date +%s) - start)) s" >&2
  done
done
echo "profile-engine: wrote $summary" >&2
exit $failed
