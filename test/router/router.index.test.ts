import { describe, expect, it } from 'vitest';
import { kvBlockHashLanes } from '../../lib/kv/index.js';
import { KvPrefixIndex } from '../../lib/router/index.js';

const prompt = (n: number, seed = 1) => Array.from({ length: n }, (_, i) => (i * 31 + seed * 7919) % 50_000);
const chain = (tokens: number[], bs = 4) => kvBlockHashLanes(tokens, bs);

describe('KvPrefixIndex', () => {
  it('counts the leading blocks of a chain each worker holds; a worker lacking block 0 holds none', () => {
    const index = new KvPrefixIndex({ maxWorkers: 4 });
    const lanes = chain(prompt(40)); // 10 blocks
    index.apply(0, true, lanes, 0, 10); // all
    index.apply(1, true, lanes, 0, 3); // the first 3
    index.apply(2, true, lanes, 1, 5); // blocks 1..5, not 0
    const out = new Int32Array(index.maxWorkers);
    expect(index.overlaps(lanes, 10, out)).toBe(10);
    expect(Array.from(out.subarray(0, 4))).toEqual([10, 3, 0, 0]);
    // A shorter request: nobody is credited beyond it.
    expect(index.overlaps(lanes, 2, out)).toBe(2);
    expect(Array.from(out.subarray(0, 4))).toEqual([2, 2, 0, 0]);
    expect(index.overlaps(lanes, 0, out)).toBe(0);
    expect(Array.from(out.subarray(0, 4))).toEqual([0, 0, 0, 0]);
  });

  it('a hole in the middle stops the count there (leading blocks only)', () => {
    const index = new KvPrefixIndex();
    const lanes = chain(prompt(24));
    index.apply(3, true, lanes);
    index.remove(3, lanes[4]!, lanes[5]!); // block 2
    const out = new Int32Array(index.maxWorkers);
    expect(index.overlaps(lanes, 6, out)).toBe(2);
    expect(out[3]).toBe(2);
    expect(index.blocksOfWorker(3)).toBe(5);
  });

  it('removal: a block leaves a worker, and the table when no worker holds it; removing twice is a no-op', () => {
    const index = new KvPrefixIndex({ maxWorkers: 2 });
    const lanes = chain(prompt(8));
    index.apply(0, true, lanes);
    index.apply(1, true, lanes);
    index.apply(1, true, lanes); // stored twice: counted once
    expect(index.blocks).toBe(2);
    expect(index.blocksOfWorker(1)).toBe(2);
    index.apply(0, false, lanes);
    index.apply(0, false, lanes);
    expect(index.blocksOfWorker(0)).toBe(0);
    expect(index.blocks).toBe(2);
    index.apply(1, false, lanes);
    expect(index.blocks).toBe(0);
    const out = new Int32Array(index.maxWorkers);
    expect(index.overlaps(lanes, 2, out)).toBe(0);
  });

  it('dropWorker forgets one worker only', () => {
    const index = new KvPrefixIndex({ maxWorkers: 40 });
    const a = chain(prompt(64, 1));
    const b = chain(prompt(64, 2));
    index.apply(33, true, a);
    index.apply(5, true, a);
    index.apply(33, true, b);
    index.dropWorker(33);
    expect(index.blocksOfWorker(33)).toBe(0);
    expect(index.blocks).toBe(16);
    const out = new Int32Array(index.maxWorkers);
    index.overlaps(a, 16, out);
    expect(out[5]).toBe(16);
    expect(out[33]).toBe(0);
    expect(index.overlaps(b, 16, out)).toBe(0);
  });

  it('grows its table and its worker bitsets, and stays exact through many inserts and deletes (against a Map)', () => {
    const index = new KvPrefixIndex({ maxWorkers: 1, expectedBlocks: 1 });
    const model = new Map<string, Set<number>>();
    let x = 12345;
    const rnd = () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0) / 2 ** 32;
    const keys: [number, number][] = Array.from({ length: 3000 }, () => [
      Math.floor(rnd() * 2 ** 32),
      Math.floor(rnd() * 16), // few high lanes: many collisions in probing
    ]);
    for (let step = 0; step < 20_000; step++) {
      const [lo, hi] = keys[Math.floor(rnd() * keys.length)]!;
      const w = Math.floor(rnd() * 70);
      const k = `${lo}:${hi}`;
      if (rnd() < 0.6) {
        index.add(w, lo, hi);
        if (!model.has(k)) model.set(k, new Set());
        model.get(k)!.add(w);
      } else {
        index.remove(w, lo, hi);
        model.get(k)?.delete(w);
        if (model.get(k)?.size === 0) model.delete(k);
      }
    }
    expect(index.maxWorkers).toBeGreaterThanOrEqual(70);
    expect(index.blocks).toBe(model.size);
    const out = new Int32Array(index.maxWorkers);
    for (const [lo, hi] of keys) {
      index.overlaps(Uint32Array.of(lo, hi), 1, out);
      const holders = model.get(`${lo}:${hi}`) ?? new Set();
      const expected = Array.from({ length: 70 }, (_, w) => (holders.has(w) ? 1 : 0));
      if (Array.from(out.subarray(0, 70)).join() !== expected.join())
        expect(Array.from(out.subarray(0, 70)), `${lo}:${hi}`).toEqual(expected);
    }
    for (let w = 0; w < 70; w++)
      expect(index.blocksOfWorker(w)).toBe([...model.values()].filter((s) => s.has(w)).length);
  });
});
