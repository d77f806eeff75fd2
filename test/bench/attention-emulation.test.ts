/**
 * native/kernels/attention.cu's flash prefill kernels run on the CPU (bench/micro/emulate: one thread per CUDA
 * thread, ldmatrix and mma.sync in PTX's fragment layouts) against a float64 reference: prefill3's fragment
 * indexing (two m16 row blocks per warp, XOR-formed ldmatrix addresses, queries in shared memory at head dim 128)
 * is checked here without a GPU; the GPU tests (test/gpu/16.engine.attention) check it on the hardware. Skipped
 * where g++ is missing.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { packageRoot } from '../../lib/native/paths.js';

const gxx = spawnSync('g++', ['--version']).status === 0;

describe.skipIf(!gxx)('flash prefill kernels on the CPU emulation', () => {
  it('prefill3 matches the float64 reference at head dims 128 and 64, with and without a sliding window', () => {
    const r = spawnSync(process.execPath, [join(packageRoot, 'bench/micro/emulate/run.mjs'), 'prefill3', '--quick'], {
      encoding: 'utf8',
      timeout: 240_000,
    });
    const lines = r.stdout.trim().split('\n');
    expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
    expect(lines.filter((l) => l.startsWith('prefill3 head dim'))).toHaveLength(2);
    expect(lines.at(-1)).toBe('ok');
  }, 300_000);
});
