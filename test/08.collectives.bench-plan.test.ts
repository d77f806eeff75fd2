import { describe, expect, it } from 'vitest';
import { makePlan, parseSize } from '../bench/collectives-plan.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

describe('bench:collectives plan', () => {
  it('runs about 4 GiB per bandwidth run (1 GiB with --quick), 5 to 1000 operations back to back', () => {
    const full = makePlan(false, 2, 'float32', ['reduce']);
    const iters = (p: typeof full, bytes: number) => p.entries.find((e) => e.bytes === bytes)!.iters;
    expect(iters(full, 16 * MiB)).toBe(256);
    expect(iters(full, 64 * MiB)).toBe(64);
    expect(iters(full, MiB)).toBe(1000);
    expect(iters(full, GiB)).toBe(5);
    for (const e of full.entries)
      expect(e.iters * e.bytes).toBeGreaterThanOrEqual(Math.min(4 * GiB, 1000 * e.bytes, 5 * e.bytes));
    const quick = makePlan(true, 2, 'float32', ['reduce']);
    expect(iters(quick, 16 * MiB)).toBe(64);
    expect(iters(quick, 128 * MiB)).toBe(8);
  });

  it('takes the sizes it is given, rounded down to whole elements per rank', () => {
    const p = makePlan(false, 2, 'bfloat16', ['allGather', 'reduce'], [16 * MiB, 7]);
    expect(p.entries.map((e) => [e.op, e.bytes])).toEqual([
      ['allGather', 16 * MiB],
      ['allGather', 4],
      ['reduce', 16 * MiB],
      ['reduce', 4],
    ]);
  });

  it('reads sizes as bytes or with a binary unit', () => {
    expect([parseSize('4096'), parseSize('64KiB'), parseSize('16MiB'), parseSize(' 1GiB'), parseSize('8B')]).toEqual([
      4096,
      64 * 1024,
      16 * MiB,
      GiB,
      8,
    ]);
    expect(() => parseSize('16MB')).toThrow(/--sizes: cannot read '16MB'/);
    expect(() => parseSize('')).toThrow(/--sizes/);
  });
});
