/**
 * native/kernels/llama.cu's elementwise kernels for TANDEM_ELEMENTWISE=2 run on the CPU (bench/micro/emulate: one
 * thread per CUDA thread) against the kernels they replace, on the same random inputs: tandem_llama_rope_kv2 gives
 * tandem_llama_rope_kv's rotated qkv rows and KV pool bit for bit (float4 and scalar paths, GQA 32 / 8, 8 / 1,
 * 4 / 4, shuffled slots of both pool layouts; with a q / k / v bias added as it reads the row, against
 * tandem_llama_add_bias then rope_kv), tandem_llama_add_rmsnorm2 the residual bit for bit and the bf16
 * output within one place (hidden 4096, 1030, 20480, 64; with and without delta and output rows). The GPU tests
 * (test/gpu/05.engine) check the engine with them on the hardware. Skipped where g++ is missing.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { packageRoot } from '../../lib/native/paths.js';

const gxx = spawnSync('g++', ['--version']).status === 0;

describe.skipIf(!gxx)('elementwise kernels on the CPU emulation', () => {
  it('rope_kv2 equals rope_kv (after add_bias) bit for bit; add_rmsnorm2 equals add_rmsnorm in x and within a bf16 place in out', () => {
    const r = spawnSync(
      process.execPath,
      [join(packageRoot, 'bench/micro/emulate/run.mjs'), 'elementwise', '--quick'],
      { encoding: 'utf8', timeout: 240_000 },
    );
    const lines = r.stdout.trim().split('\n');
    expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
    const rope = lines.filter((l) => l.startsWith('rope_kv2 head dim'));
    const norm = lines.filter((l) => l.startsWith('add_rmsnorm2 hidden'));
    expect(rope).toHaveLength(6);
    expect(rope.filter((l) => l.includes(', bias:'))).toHaveLength(2);
    expect(norm).toHaveLength(4);
    for (const l of rope) expect(l).toMatch(/qkv floats differing 0 of .*pool values differing 0 of .*qkv 0$/);
    for (const l of norm) expect(l).toMatch(/x floats differing 0 of .*most places off [01], NaN 0$/);
    expect(lines.at(-1)).toBe('ok');
  }, 300_000);
});
