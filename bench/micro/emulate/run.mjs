#!/usr/bin/env node
// Runs the flash prefill kernels of native/kernels/attention.cu on the CPU (prefill.cpp, warp.h): copies the
// kernels' source out of attention.cu (the helpers they call and flashPrefill2 / flashPrefill3, with their
// __shared__ declarations pointed at the emulated CTA's shared memory), builds with g++ and runs.
//   node bench/micro/emulate/run.mjs [prefill2|prefill3] [--quick]
// Exit status: the harness's (1: an error above tolerance), 2 when it cannot build.
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const source = readFileSync(join(here, '../../../native/kernels/attention.cu'), 'utf8');

/** The text of attention.cu from `start` up to (not including) `end`. */
function between(start, end) {
  const s = source.indexOf(start);
  const e = source.indexOf(end, s);
  if (s < 0 || e < 0) throw new Error(`attention.cu: cannot find the section from '${start}' to '${end}'`);
  return source.slice(s, e);
}

const prefill2 = between('template <int D, int W>\n__device__ void flashPrefill2', '// prefill3: the tile of prefill2')
  .replace('extern __shared__ __align__(128) unsigned char smem[];', 'unsigned char* smem = emuCta().smem;')
  .replace('__shared__ int rowPos[kRows];', 'int* rowPos = emuCta().rowPos;');
const prefill3 = between('// prefill3: the tile of prefill2', '// 8 bf16 (16 bytes) to floats.')
  .replace('extern __shared__ __align__(128) unsigned char smem[];', 'unsigned char* smem = emuCta().smem;')
  .replace('__shared__ int rowPos[kRows3];', 'int* rowPos = emuCta().rowPos;');
for (const [name, text] of [
  ['flashPrefill2', prefill2],
  ['flashPrefill3', prefill3],
])
  if (text.includes('__shared__')) throw new Error(`${name}: a __shared__ declaration the emulation does not map`);
const kernels = [
  'typedef __nv_bfloat16 bf16;',
  between('constexpr int kKeys', '\n'),
  between('constexpr float kLog2e', '\n'),
  between('__device__ __forceinline__ size_t kvTile', '__device__ __forceinline__ uint32_t smemAddr'),
  between('__device__ __forceinline__ uint32_t packBf16', '// A tile of kKeys rows'),
  between('template <int D>\n__device__ __forceinline__ bf16* swizzled', '// Loads keys j0'),
  between(
    'constexpr int kWarps2 = 8;',
    '// Keys j0 .. j0 + kKeys - 1 of K and V (kv head kvh) into one swizzled stage',
  ),
  between(
    '// Keys j0 .. j0 + kKeys - 1 of K and V (kv head kvh) into one swizzled stage',
    'template <int D, int W>\n__device__ void flashPrefill2',
  ),
  prefill2,
  prefill3,
].join('\n');

const dir = mkdtempSync(join(tmpdir(), 'tandem-emulate-'));
try {
  writeFileSync(join(dir, 'kernels.inc'), kernels);
  for (const f of ['warp.h', 'prefill.cpp']) copyFileSync(join(here, f), join(dir, f));
  const build = spawnSync(
    'g++',
    ['-std=c++20', '-O2', '-pthread', '-o', join(dir, 'prefill'), join(dir, 'prefill.cpp')],
    {
      stdio: 'inherit',
    },
  );
  if (build.status !== 0) {
    console.error(`emulate: g++ failed (${build.error?.message ?? `exit ${build.status}`})`);
    process.exitCode = 2;
  } else {
    const r = spawnSync(join(dir, 'prefill'), process.argv.slice(2), { stdio: 'inherit' });
    process.exitCode = r.status ?? 1;
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
