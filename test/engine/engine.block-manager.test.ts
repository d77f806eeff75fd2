import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import { KvBlockManager, kvBlockHash, kvBlockHashes, type KvEvent } from '../../lib/engine/block-manager.js';

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
});

describe('KvBlockManager', () => {
  it('allocates and frees with reference counts; all or nothing', () => {
    const m = new KvBlockManager({ numBlocks: 4, blockSize: 4 });
    const a = m.allocate(3)!;
    expect(Array.from(a)).toEqual([0, 1, 2]);
    expect(m.numUsed).toBe(3);
    expect(m.allocate(2)).toBeNull();
    expect(m.numAllocatable).toBe(1);
    m.ref([0]);
    m.free(a);
    expect(m.refCount(0)).toBe(1);
    expect(m.numUsed).toBe(1);
    m.free([0]);
    expect(m.numUsed).toBe(0);
    expect(() => m.free([0])).toThrow(BadArgumentError);
    expect(() => m.free([9])).toThrow(BadArgumentError);
  });

  it('reuses committed full blocks for the same prefix, verified against tokens, and emits stored events', () => {
    const events: KvEvent[] = [];
    const m = new KvBlockManager({ numBlocks: 8, blockSize: 4, onEvent: (e) => events.push(e) });
    const t = tokens(10);
    const h = kvBlockHashes(t, 4);
    const ids = Array.from(m.allocate(3)!);
    m.commit(ids, h, t, 0, 2);
    expect(events).toHaveLength(1);
    const stored = events[0]!;
    expect(stored.type).toBe('stored');
    if (stored.type === 'stored') {
      expect(stored.parentHash).toBeNull();
      expect(Array.from(stored.blockIds)).toEqual(ids.slice(0, 2));
      expect(Array.from(stored.hashes)).toEqual(h);
      expect(Array.from(stored.tokenIds)).toEqual(t.slice(0, 8));
    }
    // Shared while the first owner still holds it.
    const hit = m.matchPrefix(h, t);
    expect(hit).toEqual(ids.slice(0, 2));
    expect(m.refCount(ids[0]!)).toBe(2);
    m.free(hit);
    m.free(ids);
    expect(m.numUsed).toBe(0);
    expect(m.numCached).toBe(2);
    // Cached but unreferenced: still a hit.
    expect(m.matchPrefix(h, t, 1)).toEqual([ids[0]]);
    m.free([ids[0]!]);
    // A different second block: only the first matches.
    const u = [...t];
    u[5] = 49;
    expect(m.matchPrefix(kvBlockHashes(u, 4), u)).toEqual([ids[0]]);
    m.free([ids[0]!]);
    expect(m.hitBlocks).toBe(2 + 1 + 1);
  });

  it('a duplicate block of an already cached prefix stays uncached', () => {
    const events: KvEvent[] = [];
    const m = new KvBlockManager({ numBlocks: 8, blockSize: 4, onEvent: (e) => events.push(e) });
    const t = tokens(8);
    const h = kvBlockHashes(t, 4);
    const a = Array.from(m.allocate(2)!);
    const b = Array.from(m.allocate(2)!);
    m.commit(a, h, t, 0, 2);
    m.commit(b, h, t, 0, 2);
    expect(events).toHaveLength(1);
    expect(m.hashOf(b[0]!)).toBeUndefined();
    m.free(b);
    expect(m.numCached).toBe(2);
    expect(m.numAllocatable).toBe(6);
  });

  it('a block written after a duplicate prefix extends the cached chain', () => {
    // Two identical prompts computed side by side: the second one's blocks duplicate the first's, and the block
    // it goes on to fill is cached behind the first one's.
    const m = new KvBlockManager({ numBlocks: 8, blockSize: 2 });
    const t = [1, 2, 3, 4, 5, 6, 7, 8];
    const h = kvBlockHashes(t, 2);
    const a = Array.from(m.allocate(3)!);
    const b = Array.from(m.allocate(4)!);
    m.commit(a, h, t, 0, 3);
    m.commit(b, h, t, 0, 3);
    m.commit(b, h, t, 3, 4);
    expect(m.hashOf(b[3]!)).toBe(h[3]);
    expect(m.matchPrefix(h, t)).toEqual([...a, b[3]]);
  });

  // Hashes come from the caller, so crafted ones stand for a kvBlockHash that collides. Block hashes are chained:
  // once two different prefixes collide at block i, their blocks after i collide too wherever their tokens are equal.
  it("a hash collision never hands one prompt another prompt's blocks", () => {
    const m = new KvBlockManager({ numBlocks: 8, blockSize: 2 });
    const [A, B, H, Z] = [0x11n, 0x22n, 0x33n, 0x44n];
    const p = [1, 2, 3, 4];
    const q = [5, 6, 7, 8, 9, 10];
    const pIds = Array.from(m.allocate(2)!);
    m.commit(pIds, [A, H], p, 0, 2);
    const qIds = Array.from(m.allocate(3)!);
    m.commit(qIds, [B, H, Z], q, 0, 3); // q's block 1 collides with p's: it stays uncached
    expect(m.hashOf(qIds[1]!)).toBeUndefined();
    // r = p's tokens then q's last block: its hashes are [A, H, Z], but q's block 2 holds KV computed after 5 6 7 8.
    const r = [1, 2, 3, 4, 9, 10];
    const hit = m.matchPrefix([A, H, Z], r);
    expect(hit).toEqual(pIds);
    m.free(hit);
    // Same hash, other tokens, at the first block: a miss.
    expect(m.matchPrefix([A], [5, 6])).toEqual([]);
    // q itself still finds its own first block.
    expect(m.matchPrefix([B, H, Z], q)).toEqual([qIds[0]]);
  });

  it('a block whose parent was evicted, and the id reused for another prefix, is not matched through it', () => {
    const m = new KvBlockManager({ numBlocks: 4, blockSize: 2 });
    const [A, H, Z, W] = [0x11n, 0x33n, 0x44n, 0x55n];
    const a = Array.from(m.allocate(3)!);
    m.commit(a, [A, H, Z], [1, 2, 3, 4, 9, 10], 0, 3);
    for (const id of [a[1]!, a[0]!, a[2]!]) m.free([id]); // LRU order: a[1], a[0], a[2]
    m.allocate(1); // the never-used block
    const [reused] = m.allocate(1)!; // evicts a[1]
    expect(reused).toBe(a[1]);
    // A sequence 1 2 7 7 takes a[0] from the cache and writes its second block into the reused id.
    const s = [1, 2, 7, 7];
    const ids = [...m.matchPrefix([A], s), reused!];
    expect(ids).toEqual([a[0], a[1]]);
    m.commit(ids, [A, W], s, 1, 2);
    // Hashes [A, W, Z] (Z colliding): a[2] still names a[1] as its parent, but a[1] now holds 7 7, not 3 4.
    const hit = m.matchPrefix([A, W, Z], [1, 2, 7, 7, 9, 10]);
    expect(hit).toEqual([a[0], a[1]]);
  });

  it('evicts unreferenced cached blocks LRU (tail blocks of a sequence first) only when free blocks run out', () => {
    const events: KvEvent[] = [];
    const m = new KvBlockManager({ numBlocks: 4, blockSize: 2, onEvent: (e) => events.push(e) });
    const t = [1, 2, 3, 4, 5, 6];
    const h = kvBlockHashes(t, 2);
    const a = Array.from(m.allocate(3)!);
    m.commit(a, h, t, 0, 3);
    m.free(a);
    expect(m.numCached).toBe(3);
    // One never-cached block is free: taken first, nothing evicted.
    const x = m.allocate(1)!;
    expect(events.filter((e) => e.type === 'removed')).toHaveLength(0);
    // Next: the sequence's last block goes first.
    const y = m.allocate(1)!;
    expect(y[0]).toBe(a[2]);
    const removed = events.filter((e) => e.type === 'removed');
    expect(removed).toHaveLength(1);
    expect(Array.from(removed[0]!.hashes)).toEqual([h[2]]);
    expect(m.matchPrefix(h, t)).toEqual(a.slice(0, 2));
    m.free(a.slice(0, 2));
    m.free(x);
    m.free(y);
    m.clearCache();
    expect(m.numCached).toBe(0);
    expect(m.numAllocatable).toBe(4);
  });

  it('allocateSpecific takes free or cached blocks, never one in use', () => {
    const m = new KvBlockManager({ numBlocks: 4, blockSize: 2 });
    const a = Array.from(m.allocate(2)!);
    expect(() => m.allocateSpecific([a[0]!])).toThrow(/in use/);
    expect(() => m.allocateSpecific([2, 2])).toThrow(/twice/);
    m.allocateSpecific([3, 2]);
    expect(m.numAllocatable).toBe(0);
    m.free([2, 3]);
    m.free(a);
    expect(m.numAllocatable).toBe(4);
  });

  it('never hands out a block in use (random workload)', () => {
    let s = 12345;
    const rnd = (n: number) => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) >>> 8) % n;
    const m = new KvBlockManager({ numBlocks: 32, blockSize: 2 });
    const owners: number[][] = [];
    const held = new Map<number, number>();
    for (let iter = 0; iter < 1500; iter++) {
      const op = rnd(3);
      if (op === 0 || owners.length === 0) {
        const t = Array.from({ length: 2 * (1 + rnd(4)) }, () => rnd(3));
        const h = kvBlockHashes(t, 2);
        const hit = m.matchPrefix(h, t);
        const fresh = m.allocate(h.length - hit.length);
        if (!fresh) {
          m.free(hit);
          continue;
        }
        for (const id of fresh) expect(held.get(id) ?? 0).toBe(0);
        const ids = [...hit, ...fresh];
        m.commit(ids, h, t, hit.length, h.length);
        for (const id of ids) held.set(id, (held.get(id) ?? 0) + 1);
        owners.push(ids);
      } else {
        const ids = owners.splice(rnd(owners.length), 1)[0]!;
        m.free(ids);
        for (const id of ids) held.set(id, held.get(id)! - 1);
      }
      for (const [id, n] of held) expect(m.refCount(id)).toBe(n);
    }
    expect(m.hitBlocks).toBeGreaterThan(0);
  });
});
