import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import { KvBlockManager, type KvEvent } from '../../lib/engine/block-manager.js';
import { kvBlockHashes } from '../../lib/kv/hash.js';

const tokens = (n: number, seed = 1) => Array.from({ length: n }, (_, i) => (i * 7 + seed * 13) % 50);

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
    // q's block 2 came after an uncached collision: it is not cached either.
    expect(m.hashOf(qIds[2]!)).toBeUndefined();
    expect(m.numCached).toBe(3);
    // Same hash, other tokens, at the first block: a miss.
    expect(m.matchPrefix([A], [5, 6])).toEqual([]);
    // q itself still finds its own first block.
    expect(m.matchPrefix([B, H, Z], q)).toEqual([qIds[0]]);
  });

  it('a cached block is matched only after the very block it was computed after', () => {
    // p = 1 2 | 9 10 and q = 5 6 | 9 10, with q's second hash colliding with p's (Z): q's first block is cached,
    // p's second block was computed after 1 2, so 5 6 9 10 matches q's first block only.
    const m = new KvBlockManager({ numBlocks: 8, blockSize: 2 });
    const [A, B, Z] = [0x11n, 0x22n, 0x44n];
    const pIds = Array.from(m.allocate(2)!);
    m.commit(pIds, [A, Z], [1, 2, 9, 10], 0, 2);
    const qIds = Array.from(m.allocate(2)!);
    m.commit(qIds, [B, Z], [5, 6, 9, 10], 0, 2);
    expect(m.matchPrefix([B, Z], [5, 6, 9, 10])).toEqual([qIds[0]]);
  });

  it('a duplicate holds its cached twin until freed, so eviction keeps the cache prefix-closed', () => {
    // Two identical prompts computed side by side; the second goes one block further (cached behind the first's
    // last block). Freed in either order and evicted block by block, no cached block ever outlives its parent.
    for (const order of ['first-then-second', 'second-then-first']) {
      const cached = new Map<bigint, bigint | null>();
      const check = () => {
        for (const [h, parent] of cached)
          expect(parent === null || cached.has(parent), `${order}: ${h} cached without its parent`).toBe(true);
      };
      const m = new KvBlockManager({
        numBlocks: 8,
        blockSize: 2,
        onEvent: (e) => {
          if (e.type === 'stored') e.hashes.forEach((h, i) => cached.set(h, i === 0 ? e.parentHash : e.hashes[i - 1]!));
          else e.hashes.forEach((h) => cached.delete(h));
          check();
        },
      });
      const t = [1, 2, 3, 4, 5, 6, 7, 8];
      const h = kvBlockHashes(t, 2);
      const a = Array.from(m.allocate(3)!);
      const b = Array.from(m.allocate(4)!);
      m.commit(a, h, t, 0, 3);
      m.commit(b, h, t, 0, 4);
      expect(m.hashOf(b[3]!)).toBe(h[3]);
      expect(m.refCount(a[2]!)).toBe(2); // a's own reference and b[2]'s
      if (order === 'first-then-second') {
        m.free(a);
        expect(m.numCached).toBe(4);
        expect(m.numAllocatable).toBe(1); // a's blocks stay held by b's duplicates
        m.free(b);
      } else {
        m.free(b);
        m.free(a);
      }
      expect(m.numUsed).toBe(0);
      for (let k = 0; k < 8; k++) {
        const got = m.allocate(1);
        expect(got).not.toBeNull();
        check();
      }
      expect(cached.size).toBe(0);
    }
  });

  it('a duplicate after a hash collision chains nothing after it', () => {
    // b = 1 2 | 3 4 | 5 6 duplicates a's two blocks; c = 7 7 | 8 8 collides with a's second block (hash H) and
    // stays uncached. b's next block was computed after 1 2 3 4, not after c: c matches only its own first block.
    const m = new KvBlockManager({ numBlocks: 8, blockSize: 2 });
    const [A, C, H, Z] = [0x11n, 0x33n, 0x55n, 0x77n];
    const a = Array.from(m.allocate(2)!);
    m.commit(a, [A, H], [1, 2, 3, 4], 0, 2);
    const b = Array.from(m.allocate(3)!);
    m.commit(b, [A, H, Z], [1, 2, 3, 4, 5, 6], 0, 2);
    const c = Array.from(m.allocate(2)!);
    m.commit(c, [C, H], [7, 7, 8, 8], 0, 2);
    m.commit(b, [A, H, Z], [1, 2, 3, 4, 5, 6], 2, 3);
    expect(m.hashOf(c[1]!)).toBeUndefined();
    expect(m.matchPrefix([C, H, Z], [7, 7, 8, 8, 5, 6])).toEqual([c[0]]);
    expect(m.matchPrefix([A, H, Z], [1, 2, 3, 4, 5, 6])).toEqual([a[0], a[1], b[2]]);
  });

  it('a first block is never matched after another block, whatever the hashes say', () => {
    // Block 0 is p's first block (hash A); block 1 is q's (hash B). r's hashes [B, A] (A colliding) reach block 0
    // after block 1, but block 0 was computed at the start of a sequence.
    const m = new KvBlockManager({ numBlocks: 4, blockSize: 2 });
    const [A, B, C] = [0x11n, 0x22n, 0x33n];
    const [x, y] = m.allocate(2)!;
    m.commit([x!], [A], [9, 9], 0, 1);
    m.commit([y!], [B], [5, 6], 0, 1);
    expect(m.matchPrefix([B, A], [5, 6, 9, 9])).toEqual([y]);
    // A sequence whose first block is block 2, and its second block after it: both matched.
    const rest = Array.from(m.allocate(2)!);
    expect(rest).toEqual([2, 3]);
    m.commit(rest, [C, 0x44n], [7, 7, 8, 8], 0, 2);
    expect(m.matchPrefix([C, 0x44n], [7, 7, 8, 8])).toEqual([2, 3]);
  });

  it('blocks cached again after an eviction are matched with the blocks after them', () => {
    const m = new KvBlockManager({ numBlocks: 2, blockSize: 2 });
    const t = [1, 2, 3, 4];
    const h = kvBlockHashes(t, 2);
    const first = Array.from(m.allocate(2)!);
    m.commit(first, h, t, 0, 2);
    m.free(first);
    m.clearCache(); // both evicted: their generations move on
    const again = Array.from(m.allocate(2)!);
    m.commit(again, h, t, 0, 2);
    m.free(again);
    expect(m.matchPrefix(h, t)).toEqual(again);
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

  it('rejects bad sizes and bad block ids with BadArgumentError, changing nothing', () => {
    for (const [numBlocks, blockSize] of [
      [0, 4],
      [1.5, 4],
      [4, 0],
      [4, NaN],
    ] as const)
      expect(() => new KvBlockManager({ numBlocks, blockSize }), `${numBlocks} x ${blockSize}`).toThrow(
        /KvBlockManager: (numBlocks|blockSize) must be a positive integer/,
      );
    const one = new KvBlockManager({ numBlocks: 1, blockSize: 1 });
    expect(Array.from(one.allocate(1)!)).toEqual([0]); // exactly what is allocatable
    const m = new KvBlockManager({ numBlocks: 4, blockSize: 2 });
    const a = Array.from(m.allocate(1)!);
    for (const bad of [-1, 4, 1.5]) {
      expect(() => m.free([bad]), `free ${bad}`).toThrow(`block id ${bad} is out of range (0..3)`);
      expect(() => m.allocateSpecific([bad]), `allocateSpecific ${bad}`).toThrow(
        `block id ${bad} is out of range (0..3)`,
      );
    }
    expect(() => m.free([a[0]!, 2])).toThrow('block 2 is not in use');
    expect(() => m.ref([a[0]!, 2])).toThrow('block 2 is not in use');
    expect(() => m.commit([2], [1n], [1, 2], 0, 1)).toThrow('commit: block 2 is not in use');
    expect(m.refCount(a[0]!)).toBe(1); // all or nothing
    expect(m.numAllocatable).toBe(3);
  });

  it('free refuses a block listed more often than it is referenced', () => {
    const m = new KvBlockManager({ numBlocks: 4, blockSize: 2 });
    const [a] = m.allocate(1)!;
    expect(() => m.free([a!, a!])).toThrow(new RegExp(`^block ${a} is listed 2 times but has 1 reference$`));
    expect(m.refCount(a!)).toBe(1);
    m.ref([a!]);
    expect(() => m.free([a!, a!, a!])).toThrow(new RegExp(`^block ${a} is listed 3 times but has 2 references$`));
    m.free([a!, a!]);
    expect(m.refCount(a!)).toBe(0);
    // Free once, on the free list once: four blocks to hand out, each once.
    expect(new Set(m.allocate(4)!).size).toBe(4);
  });

  it('emits a stored event per run of newly cached blocks, chained to the block before the run', () => {
    const events: KvEvent[] = [];
    const m = new KvBlockManager({ numBlocks: 12, blockSize: 2, onEvent: (e) => events.push(e) });
    const t = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    const h = kvBlockHashes(t, 2);
    const ids = Array.from(m.allocate(5)!);
    m.commit(ids, h, t, 0, 1);
    m.commit(ids, h, t, 1, 1); // nothing new
    m.commit(ids, h, t, 1, 3);
    // A second sequence with the same first three blocks and two of its own: only those two are new.
    const u = [1, 2, 3, 4, 5, 6, 70, 80, 90, 100];
    const hu = kvBlockHashes(u, 2);
    const other = Array.from(m.allocate(3)!);
    const uIds = [...m.matchPrefix(hu, u, 3), ...other.slice(0, 2)];
    expect(uIds.slice(0, 3)).toEqual(ids.slice(0, 3));
    m.commit(uIds, hu, u, 3, 5);
    // A third one computed beside the first (nothing matched): its first three blocks duplicate the cached ones.
    const v = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12];
    const hv = kvBlockHashes(v, 2);
    const vIds = [other[2]!, ...Array.from(m.allocate(4)!)];
    m.commit(vIds, hv, v, 0, 5);
    const stored = events.filter((e) => e.type === 'stored');
    expect(
      stored.map((e) => [e.parentHash, Array.from(e.blockIds), Array.from(e.hashes), Array.from(e.tokenIds)]),
    ).toEqual([
      [null, [ids[0]], [h[0]], [1, 2]],
      [h[0], [ids[1], ids[2]], [h[1], h[2]], [3, 4, 5, 6]],
      [hu[2], [other[0], other[1]], [hu[3], hu[4]], [70, 80, 90, 100]],
      [hv[2], [vIds[3], vIds[4]], [hv[3], hv[4]], [7, 8, 11, 12]],
    ]);
    expect(m.numCached).toBe(7);
  });

  it('counts queried, hit and evicted blocks, and emits nothing for an empty clear', () => {
    const events: KvEvent[] = [];
    const m = new KvBlockManager({ numBlocks: 3, blockSize: 2, onEvent: (e) => events.push(e) });
    m.clearCache();
    expect(events).toEqual([]);
    expect(m.numAllocatable).toBe(3);
    const t = [1, 2, 3, 4];
    const h = kvBlockHashes(t, 2);
    const ids = Array.from(m.allocate(2)!);
    m.commit(ids, h, t, 0, 2);
    m.free(ids);
    m.free(m.matchPrefix(h, t));
    m.free(m.matchPrefix([h[0]!, 99n], [1, 2, 9, 9]));
    expect([m.queriedBlocks, m.hitBlocks, m.evictedBlocks]).toEqual([4, 3, 0]);
    m.allocate(3); // one free, two evicted
    expect(m.evictedBlocks).toBe(2);
    expect(events.filter((e) => e.type === 'removed').map((e) => Array.from(e.hashes))).toEqual([[h[1], h[0]]]);
  });

  it('with prefix caching off, caches nothing and matches nothing', () => {
    const events: KvEvent[] = [];
    const m = new KvBlockManager({
      numBlocks: 4,
      blockSize: 2,
      enablePrefixCaching: false,
      onEvent: (e) => events.push(e),
    });
    const t = [1, 2, 3, 4];
    const h = kvBlockHashes(t, 2);
    const ids = Array.from(m.allocate(2)!);
    m.commit(ids, h, t, 0, 2);
    expect(m.numCached).toBe(0);
    expect(m.hashOf(ids[0]!)).toBeUndefined();
    m.free(ids);
    expect(m.matchPrefix(h, t)).toEqual([]);
    expect(m.queriedBlocks).toBe(0);
    expect(events).toEqual([]);
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
    // One block taken out of the middle of the free list: the others still come out, it does not.
    const f = new KvBlockManager({ numBlocks: 4, blockSize: 2 });
    f.allocateSpecific([2]);
    expect(Array.from(f.allocate(3)!).sort()).toEqual([0, 1, 3]);
    expect(f.allocate(1)).toBeNull();
    // Freed in another order than taken: 0 is taken from below the top of the free list.
    const g = new KvBlockManager({ numBlocks: 4, blockSize: 2 });
    g.allocate(3);
    g.free([0]);
    g.free([2]);
    g.allocateSpecific([0]);
    expect(Array.from(g.allocate(2)!).sort()).toEqual([2, 3]);
  });

  it('allocateSpecific evicts a cached block it takes (removed event), and a free one silently', () => {
    const events: KvEvent[] = [];
    const m = new KvBlockManager({ numBlocks: 4, blockSize: 2, onEvent: (e) => events.push(e) });
    const t = [1, 2];
    const h = kvBlockHashes(t, 2);
    const [c] = m.allocate(1)!;
    m.commit([c!], h, t, 0, 1);
    m.free([c!]);
    m.allocateSpecific([3]);
    expect(events.filter((e) => e.type === 'removed')).toHaveLength(0);
    m.allocateSpecific([c!]);
    expect(events.filter((e) => e.type === 'removed').map((e) => Array.from(e.blockIds))).toEqual([[c]]);
    expect(m.numCached).toBe(0);
    expect(m.matchPrefix(h, t)).toEqual([]);
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
