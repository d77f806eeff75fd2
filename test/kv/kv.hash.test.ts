import { describe, expect, it } from 'vitest';
import { hashLanesOf, kvBlockHash, kvBlockHashes, kvBlockHashLanes } from '../../lib/kv/index.js';

const HASH_1234 = 0x2b39735d4794a6cbn;
const HASH_1234_5678 = 0x9e1dc0f0d06746c6n;
const tokens = (n: number, seed = 1) => Array.from({ length: n }, (_, i) => (i * 7 + seed * 13) % 50);

describe('kvBlockHash', () => {
  it('chains: equal hashes only for equal prefixes', () => {
    const a = tokens(12);
    const b = [...a];
    b[1] = 49; // differs in block 0: every later hash differs too
    const ha = kvBlockHashes(a, 4);
    const hb = kvBlockHashes(b, 4);
    expect(ha).toHaveLength(3);
    for (let i = 0; i < 3; i++) expect(ha[i]).not.toBe(hb[i]);
    const c = [...a];
    c[9] = 49; // differs in block 2 only
    const hc = kvBlockHashes(c, 4);
    expect(hc.slice(0, 2)).toEqual(ha.slice(0, 2));
    expect(hc[2]).not.toBe(ha[2]);
    expect(ha[1]).toBe(kvBlockHash(ha[0]!, a, 4, 4));
    expect(kvBlockHash(null, [1, 2], 0, 2)).not.toBe(kvBlockHash(null, [2, 1], 0, 2));
    expect(ha[0]! >= 0n && ha[0]! < 1n << 64n).toBe(true);
  });

  it("depends on every bit of the parent and on the block's tokens only", () => {
    const t = [5, 6, 7];
    expect(kvBlockHash(1n, t, 0, 2)).not.toBe(kvBlockHash(2n, t, 0, 2)); // low 32 bits
    expect(kvBlockHash(1n << 32n, t, 0, 2)).not.toBe(kvBlockHash(2n << 32n, t, 0, 2)); // high 32 bits
    expect(kvBlockHash(0n, t, 0, 2)).not.toBe(kvBlockHash(null, t, 0, 2));
    expect(kvBlockHash(null, t, 0, 2)).toBe(kvBlockHash(null, [5, 6, 99], 0, 2)); // the token after the block
    expect(kvBlockHash(null, t, 1, 2)).toBe(kvBlockHash(null, [6, 7], 0, 2));
  });

  it('keeps its values: they travel in KV events to routers, which compute them from token ids', () => {
    // Test vectors: changing them breaks prefix routing between processes of different versions.
    const h = kvBlockHashes([1, 2, 3, 4, 5, 6, 7, 8], 4);
    expect(h).toEqual([HASH_1234, HASH_1234_5678]);
    expect(kvBlockHash(HASH_1234, [5, 6, 7, 8], 0, 4)).toBe(HASH_1234_5678);
  });
});

describe('kvBlockHashLanes', () => {
  it('gives the same hashes as kvBlockHashes, as the lanes of a BigUint64Array', () => {
    for (const [n, bs] of [
      [0, 4],
      [3, 4],
      [4, 4],
      [37, 4],
      [64, 16],
      [2048, 16],
    ] as const) {
      const t = tokens(n, n);
      const expected = BigUint64Array.from(kvBlockHashes(t, bs));
      expect(kvBlockHashLanes(t, bs), `${n} tokens, blocks of ${bs}`).toEqual(hashLanesOf(expected));
    }
    expect(Array.from(kvBlockHashLanes([1, 2, 3, 4, 5, 6, 7, 8], 4))).toEqual([
      Number(HASH_1234 & 0xffffffffn),
      Number(HASH_1234 >> 32n),
      Number(HASH_1234_5678 & 0xffffffffn),
      Number(HASH_1234_5678 >> 32n),
    ]);
  });

  it('hashes the first numBlocks blocks only, into a buffer it is given when that is large enough', () => {
    const t = tokens(40);
    const all = kvBlockHashLanes(t, 4);
    expect(all).toHaveLength(20);
    const buffer = new Uint32Array(64);
    const some = kvBlockHashLanes(t, 4, 3, buffer);
    expect(some.buffer).toBe(buffer.buffer);
    expect(some).toEqual(all.subarray(0, 6));
    const small = new Uint32Array(2);
    expect(kvBlockHashLanes(t, 4, 3, small).buffer).not.toBe(small.buffer);
  });
});
