#!/usr/bin/env bash
# Builds and runs the two-process UCX backend self-test (native/tests/ucx_selftest.cpp).
# Needs g++ and the UCX development headers (Debian: libucx-dev) to build, libucp.so.0 to run.
# UCX itself is not linked: the backend loads it with dlopen, exactly as the addon does.
#
#   native/tests/run_ucx_selftest.sh                             # all transport configurations below
#   UCX_SELFTEST_CONFIGS="tcp" native/tests/run_ucx_selftest.sh  # a subset
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/../src"
out="${UCX_SELFTEST_OUT:-${TMPDIR:-/tmp}/tandem-ucx-selftest}"
mkdir -p "$out"

g++ -std=c++17 -O2 -g -Wall -Wextra -Werror -pthread \
  "$here/ucx_selftest.cpp" "$src/transfer/backends/ucx_worker.cpp" "$src/dynlib.cpp" \
  -o "$out/ucx_selftest" -ldl -lpthread

status=0
# Transport settings to run under (UCX_SELFTEST_CONFIGS picks a subset):
#   default - UCX's own choice. With UCP_ERR_HANDLING_MODE_PEER, UCX 1.13 leaves out shared memory (no
#             peer-failure support unless asked for), so here RMA runs as software RMA over tcp/lo.
#   tcp     - UCX_TLS=tcp: the same, stated explicitly.
#   shm     - shared memory with its error handling turned on: RMA through sysv/posix, and a dead peer is
#             noticed only by UCX keepalive (the backend shortens it to 2 s).
for config in ${UCX_SELFTEST_CONFIGS:-default tcp shm}; do
  echo "== $config"
  case "$config" in
    default) env_args=() ;;
    tcp) env_args=(UCX_TLS=tcp) ;;
    shm) env_args=(UCX_TLS=sm,self UCX_POSIX_ERROR_HANDLING=y UCX_SYSV_ERROR_HANDLING=y) ;;
    *) echo "unknown configuration '$config'" >&2; exit 2 ;;
  esac
  env "${env_args[@]}" timeout 55 "$out/ucx_selftest" || status=1
done
exit $status
