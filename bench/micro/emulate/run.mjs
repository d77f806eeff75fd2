#!/usr/bin/env node
// Runs the flash prefill kernels of native/kernels/attention.cu on the CPU (prefill.cpp, warp.h): copies the
// kernels' source out of attention.cu (the helpers they call and flashPrefill2 / flashPrefill3, with their
// __shared__ declarations pointed at the emulated CTA's shared memory), builds with g++ and runs. With
// `elementwise`: llama.cu's rope_kv and add_rmsnorm kernels, old and new, through elementwise.cpp.
//   node bench/micro/emulate/run.mjs [prefill2|prefill3|elementwise] [--quick]
// Exit status: the harness's (1: an error above tolerance), 2 when it cannot build.
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const kernelFile = (name) => readFileSync(join(here, '../../../native/kernels', name), 'utf8');

/** The text of `file` (its source `text`) from `start` up to (not including) `end`. */
function section(file, text, start, end) {
  const s = text.indexOf(start);
  const e = text.indexOf(end, s);
  if (s < 0 || e < 0) throw new Error(`${file}: cannot find the section from '${start}' to '${end}'`);
  return text.slice(s, e);
}

const source = kernelFile('attention.cu');
const between = (start, end) => section('attention.cu', source, start, end);

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
const prefillKernels = [
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

// llama.cu's elementwise kernels with the helpers they call; their __shared__ declarations become pieces of the
// emulated CTA's shared memory (elementwise.cpp, emuShared).
function elementwiseKernels() {
  const llama = kernelFile('llama.cu');
  const take = (start, end) => section('llama.cu', llama, start, end);
  const text = [
    'typedef __nv_bfloat16 bf16;',
    take('__device__ __forceinline__ float warpSum', '__device__ __forceinline__ float warpMax'),
    take('// Sum over the block', '}  // namespace tandem_llama'),
    take('// Fused residual add + RMSNorm.', '// Paged attention for prefill chunks and decode alike'),
  ]
    .join('\n')
    .replace(/__shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[(\w+)\];/g, '$1* $2 = emuShared<$1>($3);')
    .replace(/__shared__ (\w+) (\w+);/g, '$1& $2 = *emuShared<$1>(1);');
  if (text.includes('__shared__')) throw new Error('llama.cu: a __shared__ declaration the emulation does not map');
  return text;
}

const elementwise = process.argv[2] === 'elementwise';
const [kernels, harness] = elementwise ? [elementwiseKernels(), 'elementwise.cpp'] : [prefillKernels, 'prefill.cpp'];
const dir = mkdtempSync(join(tmpdir(), 'tandem-emulate-'));
try {
  writeFileSync(join(dir, 'kernels.inc'), kernels);
  for (const f of ['warp.h', harness]) copyFileSync(join(here, f), join(dir, f));
  const build = spawnSync(
    'g++',
    ['-std=c++20', '-O2', '-fno-strict-aliasing', '-pthread', '-o', join(dir, 'emulate'), join(dir, harness)],
    {
      stdio: 'inherit',
    },
  );
  if (build.status !== 0) {
    console.error(`emulate: g++ failed (${build.error?.message ?? `exit ${build.status}`})`);
    process.exitCode = 2;
  } else {
    const r = spawnSync(join(dir, 'emulate'), process.argv.slice(elementwise ? 3 : 2), { stdio: 'inherit' });
    process.exitCode = r.status ?? 1;
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
