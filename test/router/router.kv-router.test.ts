import { describe, expect, it } from 'vitest';
import { KvEventPublisher, kvBlockHashLanes, kvBlockHashes, type KvEventBatch } from '../../lib/kv/index.js';
import { KV_EVENTS_MISSING_AFTER, KvRouter, type RouteCandidate } from '../../lib/router/index.js';

const BS = 4;
const prompt = (n: number, seed = 1) => Array.from({ length: n }, (_, i) => (i * 31 + seed * 7919) % 50_000);
const stored = (incarnation: number, seq: number, tokens: number[], from = 0): KvEventBatch => {
  const lanes = kvBlockHashLanes(tokens, BS).slice(2 * from);
  return { incarnation, seq, kinds: Uint8Array.of(1), counts: Uint32Array.of(lanes.length / 2), lanes };
};
const removed = (incarnation: number, seq: number, tokens: number[]): KvEventBatch => {
  const lanes = kvBlockHashLanes(tokens, BS);
  return { incarnation, seq, kinds: Uint8Array.of(0), counts: Uint32Array.of(lanes.length / 2), lanes };
};
const cand = (name: string, inflight = 0, reportedLoad = 0): RouteCandidate => ({
  name,
  inflight,
  reportedLoad,
  blockSize: BS,
});

describe('KV events: numbering, gaps, snapshots, incarnations', () => {
  it('batches in order apply; a repeated one is stale; a gap asks for a snapshot once and stops applying until it comes', () => {
    const asked: string[] = [];
    const r = new KvRouter({ requestSnapshot: (w) => asked.push(w) });
    const p = prompt(16);
    r.onKvSnapshot('d0', { incarnation: 7, seq: 0, lanes: new Uint32Array(0) });
    expect(r.onKvEvents('d0', stored(7, 1, p.slice(0, 8)))).toBe('applied');
    expect(r.blocksOf('d0')).toBe(2);
    expect(r.onKvEvents('d0', stored(7, 1, p.slice(0, 8)))).toBe('stale');
    expect(r.onKvEvents('d0', stored(7, 3, p))).toBe('gap'); // 2 is missing
    expect(asked).toEqual(['d0']);
    expect(r.onKvEvents('d0', stored(7, 4, p))).toBe('stale');
    expect(asked).toEqual(['d0']);
    expect(r.blocksOf('d0')).toBe(2);
    // The snapshot replaces what the index had; numbering goes on from its seq.
    r.onKvSnapshot('d0', { incarnation: 7, seq: 4, lanes: kvBlockHashLanes(p, BS) });
    expect(r.blocksOf('d0')).toBe(4);
    expect(r.onKvEvents('d0', removed(7, 5, p.slice(0, 4)))).toBe('applied');
    expect(r.blocksOf('d0')).toBe(3);
  });

  it('a new incarnation (the worker restarted): its old blocks leave the index at once, and a snapshot is asked for', () => {
    const asked: string[] = [];
    const r = new KvRouter({ requestSnapshot: (w) => asked.push(w) });
    const p = prompt(32);
    r.onKvSnapshot('d0', { incarnation: 1, seq: 3, lanes: kvBlockHashLanes(p, BS) });
    r.onKvSnapshot('d1', { incarnation: 2, seq: 0, lanes: kvBlockHashLanes(p, BS) });
    expect(r.blocksOf('d0')).toBe(8);
    expect(r.onKvEvents('d0', stored(9, 1, prompt(8, 2)))).toBe('gap');
    expect(asked).toEqual(['d0']);
    expect(r.blocksOf('d0')).toBe(0);
    expect(r.blocksOf('d1')).toBe(8); // the other worker keeps its blocks
    const choice = r.choose([cand('d0'), cand('d1')], p, 'decode')!;
    expect(choice).toMatchObject({ worker: 'd1', cachedBlocks: 8, uncachedTokens: 0 });
    // Its registration snapshot (new incarnation) is taken as is.
    r.onKvSnapshot('d0', { incarnation: 9, seq: 1, lanes: kvBlockHashLanes(prompt(8, 2), BS) });
    expect(r.blocksOf('d0')).toBe(2);
    expect(r.onKvEvents('d0', stored(9, 2, prompt(12, 3)))).toBe('applied');
    expect(r.blocksOf('d0')).toBe(5);
  });

  it('a removed worker leaves the index; its id is reused without its blocks', () => {
    const r = new KvRouter();
    const p = prompt(16);
    r.onKvSnapshot('d0', { incarnation: 1, seq: 0, lanes: kvBlockHashLanes(p, BS) });
    r.removeWorker('d0');
    expect(r.index.blocks).toBe(0);
    r.onKvSnapshot('d9', { incarnation: 4, seq: 0, lanes: new Uint32Array(0) });
    expect(r.choose([cand('d9')], p, 'decode')!.cachedBlocks).toBe(0);
  });

  it("a worker's publisher: one numbered batch per turn of the event loop, in order; its snapshot lists what it holds", async () => {
    const batches: KvEventBatch[] = [];
    const pub = new KvEventPublisher((b) => batches.push(b), 42);
    const p = prompt(16);
    const h = BigUint64Array.from(kvBlockHashes(p, BS));
    pub.add({ type: 'stored', hashes: h.subarray(0, 2) });
    pub.add({ type: 'stored', hashes: h.subarray(2, 4) });
    pub.add({ type: 'removed', hashes: h.subarray(0, 1) });
    expect(batches).toHaveLength(0);
    await new Promise((r) => setImmediate(r));
    expect(batches).toHaveLength(1);
    expect(batches[0]).toMatchObject({ incarnation: 42, seq: 1 });
    expect(Array.from(batches[0]!.kinds)).toEqual([1, 1, 0]);
    expect(Array.from(batches[0]!.counts)).toEqual([2, 2, 1]);
    const all = kvBlockHashLanes(p, BS);
    expect(Array.from(batches[0]!.lanes)).toEqual([...all.slice(0, 8), ...all.slice(0, 2)]);
    pub.add({ type: 'removed', hashes: h.subarray(3, 4) });
    const snap = pub.snapshot(); // publishes the pending batch first
    expect(batches).toHaveLength(2);
    expect(snap).toMatchObject({ incarnation: 42, seq: 2 });
    expect(pub.blocks).toBe(2);
    const r = new KvRouter();
    r.onKvSnapshot('w', snap);
    const c = r.choose([cand('w')], p, 'decode')!;
    expect(c.cachedBlocks).toBe(0); // block 0 was removed: no leading block
    expect(r.blocksOf('w')).toBe(2);
    // Applying the batches instead gives the same index.
    const r2 = new KvRouter();
    r2.onKvSnapshot('w', { incarnation: 42, seq: 0, lanes: new Uint32Array(0) });
    for (const b of batches) expect(r2.onKvEvents('w', b)).toBe('applied');
    expect(r2.blocksOf('w')).toBe(2);
  });
});

describe('routing', () => {
  it('kv: the worker holding the longest prefix, unless its load outweighs it', () => {
    const r = new KvRouter();
    const p = prompt(64); // 16 blocks
    r.onKvSnapshot('d1', { incarnation: 1, seq: 0, lanes: kvBlockHashLanes(p.slice(0, 40), BS) }); // 10 blocks
    const pick = () => r.choose([cand('d0'), cand('d1'), cand('d2')], p, 'decode')!;
    expect(pick()).toMatchObject({ worker: 'd1', cachedBlocks: 10, uncachedTokens: 24 });
    // A routed request loads d1 with its 6 uncached blocks, queued for prefill until its first token and held
    // until its end (its 10 cached blocks are shared, not counted again).
    r.route({ requestId: 'a', promptIds: p, decode: [cand('d1')] });
    expect(r.loadOf('d1')).toEqual({ queuedPrefillBlocks: 6, decodeBlocks: 6 });
    // d1: 6 + 6 + 6 = 18 > d0: 16 + 0 + 0
    expect(pick().worker).toBe('d0');
    r.firstToken('a');
    expect(r.loadOf('d1')).toEqual({ queuedPrefillBlocks: 0, decodeBlocks: 6 });
    // d1: 6 + 0 + 6 = 12 < 16
    expect(pick().worker).toBe('d1');
    r.complete('a');
    expect(r.loadOf('d1')).toEqual({ queuedPrefillBlocks: 0, decodeBlocks: 0 });
    expect(pick().worker).toBe('d1');
  });

  it('prefillWeight trades cache hits against decode load', () => {
    const p = prompt(64);
    for (const [prefillWeight, expected] of [
      [0.5, 'd0'], // d1: 0.5 * 6 + 20 = 23 > d0: 0.5 * 16 = 8
      [4, 'd1'], // d1: 4 * 6 + 20 = 44 < d0: 4 * 16 = 64
    ] as const) {
      const r = new KvRouter({ prefillWeight });
      r.onKvSnapshot('d1', { incarnation: 1, seq: 0, lanes: kvBlockHashLanes(p.slice(0, 40), BS) });
      r.route({ requestId: 'x', promptIds: prompt(80, 5), decode: [cand('d1')] });
      r.firstToken('x'); // d1 holds 20 decode blocks
      expect(r.choose([cand('d0'), cand('d1')], p, 'decode')!.worker, `prefillWeight ${prefillWeight}`).toBe(expected);
    }
  });

  it('least-load, round-robin and random ignore the cache', () => {
    const p = prompt(64);
    const lanes = kvBlockHashLanes(p, BS);
    const make = (policy: 'least-load' | 'round-robin' | 'random', random?: () => number) => {
      const r = new KvRouter({ policy, ...(random ? { random } : {}) });
      r.onKvSnapshot('d0', { incarnation: 1, seq: 0, lanes });
      return r;
    };
    const ll = make('least-load');
    expect(ll.choose([cand('d0', 2), cand('d1', 1, 9), cand('d2', 1, 3)], p, 'decode')!.worker).toBe('d2');
    const rr = make('round-robin');
    const cands = [cand('d0'), cand('d1'), cand('d2')];
    expect([1, 2, 3, 4].map(() => rr.choose(cands, p, 'decode')!.worker)).toEqual(['d0', 'd1', 'd2', 'd0']);
    expect(rr.choose(cands, p, 'prefill')!.worker).toBe('d0'); // a turn per pool
    const draws = [0.9, 0.1, 0.5];
    const rnd = make('random', () => draws.shift()!);
    expect([1, 2, 3].map(() => rnd.choose(cands, p, 'decode')!.worker)).toEqual(['d2', 'd0', 'd1']);
    // Whatever the policy, the choice says what the chosen worker holds.
    expect(make('round-robin').choose(cands, p, 'decode')).toMatchObject({ worker: 'd0', cachedBlocks: 16 });
  });

  it('remote prefill: decided on the chosen decode worker’s uncached tokens and the prefill queue; the prefill worker by its cache', () => {
    const p = prompt(64); // 64 tokens
    const thresholds = { minRemotePrefillTokens: 24, maxPrefillQueue: 2 };
    const r = new KvRouter();
    r.onKvSnapshot('p1', { incarnation: 1, seq: 0, lanes: kvBlockHashLanes(p.slice(0, 32), BS) });
    const route = (id: string, decodeHolds: number, queue: number) => {
      const router = new KvRouter();
      router.onKvSnapshot('p1', { incarnation: 1, seq: 0, lanes: kvBlockHashLanes(p.slice(0, 32), BS) });
      router.onKvSnapshot('d0', { incarnation: 2, seq: 0, lanes: kvBlockHashLanes(p.slice(0, decodeHolds), BS) });
      return router.route({
        requestId: id,
        promptIds: p,
        decode: [cand('d0')],
        prefill: [cand('p0'), cand('p1')],
        prefillQueueDepth: queue,
        thresholds,
      })!;
    };
    // 64 - 40 = 24 uncached: remote (boundary), to p1 which holds 8 blocks.
    expect(route('a', 40, 0).prefill).toMatchObject({ worker: 'p1', cachedBlocks: 8, uncachedTokens: 32 });
    // 64 - 44 = 20 < 24: local.
    expect(route('b', 44, 0).prefill).toBeNull();
    // Queue 3 < 2 * 2: remote; 4: saturated, local.
    expect(route('c', 0, 3).prefill).not.toBeNull();
    expect(route('d', 0, 4).prefill).toBeNull();
    // No prefill pool: local.
    expect(r.route({ requestId: 'e', promptIds: p, decode: [cand('d0')], thresholds })!.prefill).toBeNull();
    expect(r.route({ requestId: 'f', promptIds: p, decode: [], thresholds })).toBeUndefined();
  });

  it('a prompt is hashed once per decision: an array reused and rewritten between decisions is hashed afresh', () => {
    const a = prompt(32, 1);
    const b = prompt(32, 2);
    const r = new KvRouter();
    r.onKvSnapshot('d0', { incarnation: 1, seq: 0, lanes: kvBlockHashLanes(a, BS) });
    r.onKvSnapshot('d1', { incarnation: 2, seq: 0, lanes: kvBlockHashLanes(b, BS) });
    r.onKvSnapshot('p1', { incarnation: 3, seq: 0, lanes: kvBlockHashLanes(b.slice(0, 16), BS) });
    const buffer = Int32Array.from(a);
    const decide = (id: string) =>
      r.route({
        requestId: id,
        promptIds: buffer,
        decode: [cand('d0'), cand('d1')],
        prefill: [cand('p0'), cand('p1')],
        thresholds: { minRemotePrefillTokens: 0, maxPrefillQueue: 8 },
      })!;
    expect(decide('x').decode).toMatchObject({ worker: 'd0', cachedBlocks: 8 });
    r.complete('x');
    buffer.set(b);
    const second = decide('y');
    // Both choices of one decision saw the rewritten prompt: decode by all of it, prefill by its first half.
    expect(second.decode).toMatchObject({ worker: 'd1', cachedBlocks: 8 });
    expect(second.prefill).toMatchObject({ worker: 'p1', cachedBlocks: 4 });
    buffer.set(a);
    expect(r.choose([cand('d0'), cand('d1')], buffer, 'decode')).toMatchObject({ worker: 'd0', cachedBlocks: 8 });
    buffer.set(b);
    expect(r.choose([cand('d0'), cand('d1')], buffer, 'decode')).toMatchObject({ worker: 'd1', cachedBlocks: 8 });
  });

  it('a worker that serves requests but publishes no KV events is reported, and cleared when events come', () => {
    const reports: [string, boolean][] = [];
    const r = new KvRouter({ onEventsMissing: (w, missing) => reports.push([w, missing]) });
    r.onKvSnapshot('quiet', { incarnation: 1, seq: 0, lanes: new Uint32Array(0) });
    r.onKvSnapshot('chatty', { incarnation: 2, seq: 0, lanes: new Uint32Array(0) });
    r.onKvEvents('chatty', stored(2, 1, prompt(8)));
    for (let i = 0; i < KV_EVENTS_MISSING_AFTER; i++) {
      expect(reports).toEqual([]);
      for (const w of ['quiet', 'chatty']) {
        r.route({ requestId: `${w}${i}`, promptIds: prompt(8, i), decode: [cand(w)] });
        r.complete(`${w}${i}`);
      }
    }
    // Short prompts (no full block) do not count.
    r.route({ requestId: 'short', promptIds: [1, 2], decode: [cand('other')] });
    expect(reports).toEqual([['quiet', true]]);
    r.onKvEvents('quiet', stored(1, 1, prompt(8)));
    expect(reports).toEqual([
      ['quiet', true],
      ['quiet', false],
    ]);
  });

  it('debug log: the formula with live values for every candidate, then the choice', () => {
    const lines: string[] = [];
    const r = new KvRouter({ debug: (l) => lines.push(l) });
    r.onKvSnapshot('d1', { incarnation: 1, seq: 0, lanes: kvBlockHashLanes(prompt(8), BS) });
    r.route({ requestId: 'req-1', promptIds: prompt(12), decode: [cand('d0'), cand('d1')] });
    expect(lines).toEqual([
      'route req-1 decode: cost(d0) = 1 * (uncached 3 + queued prefill 0) + decode 0 = 3',
      'route req-1 decode: cost(d1) = 1 * (uncached 1 + queued prefill 0) + decode 0 = 1',
      'route req-1 decode: kv chose d1 (2 cached blocks)',
    ]);
  });
});
