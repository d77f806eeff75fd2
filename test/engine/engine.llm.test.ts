import { afterEach, describe, expect, it } from 'vitest';
import {
  CanceledError,
  DisposedError,
  EngineRequestError,
  KvCacheFullError,
  PromptTooLongError,
} from '../../lib/errors.js';
import type { KvEvent } from '../../lib/engine/block-manager.js';
import { kvBlockHashes } from '../../lib/kv/hash.js';
import type { EngineOutput, RequestResult, SamplingParams } from '../../lib/engine/engine.js';
import { LlmEngine, type LlmEngineOptions } from '../../lib/engine/llm-engine.js';
import { FakeSampledRunner } from '../helpers/device-sampling.js';
import { FakeRunner, referenceGreedy, referenceLogits, type FakeRunnerOptions } from '../helpers/fake-runner.js';

const V = 64;
const engines: LlmEngine[] = [];
afterEach(async () => {
  await Promise.all(engines.splice(0).map((e) => e.dispose()));
});

function make(runnerOptions: FakeRunnerOptions = {}, options: LlmEngineOptions = {}) {
  const runner = new FakeRunner({ vocabSize: V, ...runnerOptions });
  const engine = new LlmEngine(runner, options);
  engines.push(engine);
  return { runner, engine };
}

let lcg = 1;
function prompt(n: number, seed?: number): number[] {
  if (seed !== undefined) lcg = seed;
  return Array.from({ length: n }, () => ((lcg = (Math.imul(lcg, 1103515245) + 12345) >>> 0) >>> 10) % V);
}

const greedy = (maxTokens: number, extra: SamplingParams = {}): SamplingParams => ({
  temperature: 0,
  maxTokens,
  ...extra,
});

const detokenize = (ids: readonly number[]) => ids.map((i) => String.fromCharCode(97 + (i % 26))).join('');

/** Resolves once the engine has nothing running or waiting (polls between steps). */
async function idle(engine: LlmEngine): Promise<void> {
  for (let i = 0; i < 10000; i++) {
    const s = engine.stats();
    if (s.running === 0 && s.waiting === 0) return;
    await new Promise((r) => setTimeout(r, 1));
  }
  throw new Error('engine did not go idle');
}

describe('LlmEngine with a fake runner', () => {
  it('a request added right after blocks are released is served (no lost wake-up of the step loop)', async () => {
    // releaseBlocks starts the loop, which finds nothing and is on its way out when addRequest comes.
    const { engine } = make();
    const p = prompt(9, 11);
    engine.releaseBlocks(engine.allocateBlocks(p).blockIds);
    const result = await engine.addRequest({ promptTokenIds: p, sampling: greedy(6) }).result();
    expect(result.tokenIds).toEqual(referenceGreedy(p, 6, V));
  });

  it('single request, greedy: equals the reference, streams one token per output', async () => {
    const { engine, runner } = make();
    const p = prompt(10, 1);
    const handle = engine.addRequest({ promptTokenIds: p, sampling: greedy(20) });
    const outs: EngineOutput[] = [];
    for await (const out of handle) outs.push(out);
    const ref = referenceGreedy(p, 20, V);
    expect(outs.flatMap((o) => o.tokenIds)).toEqual(ref);
    expect(outs.every((o) => o.tokenIds.length === 1)).toBe(true);
    expect(outs.slice(0, -1).every((o) => o.finishReason === null)).toBe(true);
    expect(outs.at(-1)!.finishReason).toBe('length');
    const result = await handle.result();
    expect(result.tokenIds).toEqual(ref);
    expect(result.promptTokens).toBe(10);
    // One prefill step then one decode per further token.
    expect(runner.log).toHaveLength(20);
    expect(engine.stats().usedBlocks).toBe(0);
  });

  it('many concurrent requests batch continuously and equal running each alone', async () => {
    const { engine, runner } = make({ numBlocks: 512 }, { maxNumBatchedTokens: 64 });
    const reqs = Array.from({ length: 24 }, (_, i) => ({
      p: prompt(3 + ((i * 5) % 30), 100 + i),
      max: 5 + ((i * 7) % 20),
      seed: 1000 + i,
    }));
    // Half greedy, half seeded sampling.
    const sampling = (r: (typeof reqs)[number], i: number): SamplingParams =>
      i % 2 === 0 ? greedy(r.max) : { temperature: 1, topK: 20, topP: 0.9, seed: r.seed, maxTokens: r.max };
    const together = await Promise.all(
      reqs.map((r, i) => engine.addRequest({ promptTokenIds: r.p, sampling: sampling(r, i) }).result()),
    );
    expect(Math.max(...runner.log.map((l) => l.nseq))).toBeGreaterThan(8);
    // Some step mixed prompt chunks with decodes.
    expect(runner.log.some((l) => l.ntokens > l.nseq && l.nseq > 1)).toBe(true);
    for (let i = 0; i < reqs.length; i++) {
      const r = reqs[i]!;
      if (i % 2 === 0) expect(together[i]!.tokenIds).toEqual(referenceGreedy(r.p, r.max, V));
      const alone = make().engine;
      expect((await alone.addRequest({ promptTokenIds: r.p, sampling: sampling(r, i) }).result()).tokenIds).toEqual(
        together[i]!.tokenIds,
      );
    }
    expect(engine.stats().usedBlocks).toBe(0);
  });

  it('requests arriving while others decode join the running batch', async () => {
    const { engine, runner } = make({ delayMs: 1 });
    const a = engine.addRequest({ promptTokenIds: prompt(8, 5), sampling: greedy(30) });
    const it = a[Symbol.asyncIterator]();
    for (let i = 0; i < 5; i++) await it.next();
    const b = engine.addRequest({ promptTokenIds: prompt(20, 6), sampling: greedy(10) });
    const rb = await b.result();
    const ra = await a.result();
    expect(ra.tokenIds).toEqual(referenceGreedy(prompt(8, 5), 30, V));
    expect(rb.tokenIds).toEqual(referenceGreedy(prompt(20, 6), 10, V));
    // b's prompt went through in a step together with a decode of a.
    expect(runner.log.some((l) => l.nseq === 2 && l.ntokens === 21)).toBe(true);
  });

  it('chunked prefill equals unchunked', async () => {
    const p = prompt(100, 7);
    const small = make({}, { maxNumBatchedTokens: 5 });
    const large = make({}, { maxNumBatchedTokens: 4096 });
    const a = await small.engine.addRequest({ promptTokenIds: p, sampling: greedy(12) }).result();
    const b = await large.engine.addRequest({ promptTokenIds: p, sampling: greedy(12) }).result();
    expect(a.tokenIds).toEqual(b.tokenIds);
    expect(a.tokenIds).toEqual(referenceGreedy(p, 12, V));
    expect(small.runner.log.every((l) => l.ntokens <= 5)).toBe(true);
    expect(small.runner.log.length).toBe(20 + 11);
    expect(large.runner.log[0]!.ntokens).toBe(100);
    // Several long prompts chunked together under one budget.
    const many = make({}, { maxNumBatchedTokens: 7 });
    const ps = [prompt(30, 8), prompt(41, 9), prompt(17, 10)];
    const rs = await Promise.all(
      ps.map((q) => many.engine.addRequest({ promptTokenIds: q, sampling: greedy(6) }).result()),
    );
    ps.forEach((q, i) => expect(rs[i]!.tokenIds).toEqual(referenceGreedy(q, 6, V)));
    expect(many.runner.log.every((l) => l.ntokens <= 7)).toBe(true);
  });

  it("the first output says how many prompt tokens came from the prefix cache (the frontend's cached_tokens)", async () => {
    const { engine } = make({ blockSize: 4 });
    const shared = prompt(20, 21);
    const outputs = async (p: number[]) => {
      const all = [];
      for await (const out of engine.addRequest({ promptTokenIds: p, sampling: greedy(3) })) all.push(out);
      return all;
    };
    const first = await outputs([...shared, ...prompt(3, 22)]);
    expect(first[0]!.cachedPromptTokens).toBe(0);
    expect(first.slice(1).every((o) => o.cachedPromptTokens === undefined)).toBe(true);
    const second = await outputs([...shared, ...prompt(5, 23)]);
    expect(second[0]!.cachedPromptTokens).toBe(20);
  });

  it('prefix cache: a second request with the same prefix reuses its blocks; stored events carry the hashes', async () => {
    const { engine, runner } = make({ blockSize: 4 });
    const events: KvEvent[] = [];
    engine.onKvEvent((e) => events.push(e));
    const shared = prompt(32, 11);
    const p1 = [...shared, ...prompt(6, 12)];
    const p2 = [...shared, ...prompt(9, 13)];
    const r1 = await engine.addRequest({ promptTokenIds: p1, sampling: greedy(4) }).result();
    expect(r1.cachedPromptTokens).toBe(0);
    const stored = events.filter((e) => e.type === 'stored');
    expect(stored.length).toBeGreaterThan(0);
    const storedHashes = stored.flatMap((e) => Array.from(e.hashes));
    // Every full block of prompt + generated tokens that was computed: (38 + 3) tokens -> 10 blocks.
    expect(storedHashes).toEqual(kvBlockHashes([...p1, ...r1.tokenIds], 4).slice(0, 10));
    const stepsBefore = runner.log.length;
    const r2 = await engine.addRequest({ promptTokenIds: p2, sampling: greedy(4) }).result();
    expect(r2.cachedPromptTokens).toBe(32);
    expect(r2.tokenIds).toEqual(referenceGreedy(p2, 4, V));
    // The second prompt's first step started at position 32.
    expect(runner.log[stepsBefore]!.batch.positions[0]).toBe(32);
    expect(runner.log[stepsBefore]!.ntokens).toBe(9);
    const s = engine.stats();
    expect(s.prefixCacheHitBlocks).toBe(8);
    expect(s.cachedBlocks).toBeGreaterThanOrEqual(10);
    // The same prompt again: all full blocks but the one holding the last token are hits.
    const r3 = await engine.addRequest({ promptTokenIds: p1, sampling: greedy(4) }).result();
    expect(r3.cachedPromptTokens).toBe(36);
    expect(r3.tokenIds).toEqual(r1.tokenIds);
  });

  it('prefix caching can be turned off', async () => {
    const { engine } = make({}, { enablePrefixCaching: false });
    const events: KvEvent[] = [];
    engine.onKvEvent((e) => events.push(e));
    const p = prompt(20, 14);
    await engine.addRequest({ promptTokenIds: p, sampling: greedy(3) }).result();
    const r = await engine.addRequest({ promptTokenIds: p, sampling: greedy(3) }).result();
    expect(r.cachedPromptTokens).toBe(0);
    expect(events).toHaveLength(0);
  });

  it('preemption under a tiny pool recomputes and still produces identical outputs', async () => {
    // 12 blocks of 4 tokens; each request needs up to 7 blocks.
    const { engine } = make({ numBlocks: 12, blockSize: 4 }, { maxNumBatchedTokens: 16 });
    const evicted: KvEvent[] = [];
    engine.onKvEvent((e) => e.type === 'removed' && evicted.push(e));
    const reqs = Array.from({ length: 6 }, (_, i) => ({ p: prompt(8, 200 + i), seed: 300 + i }));
    const results = await Promise.all(
      reqs.map((r, i) =>
        engine
          .addRequest({
            promptTokenIds: r.p,
            sampling: i < 3 ? greedy(20) : { temperature: 0.8, seed: r.seed, maxTokens: 20 },
          })
          .result(),
      ),
    );
    expect(engine.stats().preemptions).toBeGreaterThan(0);
    expect(evicted.length).toBeGreaterThan(0);
    for (let i = 0; i < reqs.length; i++) {
      const r = reqs[i]!;
      expect(results[i]!.finishReason).toBe('length');
      if (i < 3) expect(results[i]!.tokenIds).toEqual(referenceGreedy(r.p, 20, V));
      else {
        const alone = make().engine;
        const ref = await alone
          .addRequest({ promptTokenIds: r.p, sampling: { temperature: 0.8, seed: r.seed, maxTokens: 20 } })
          .result();
        expect(results[i]!.tokenIds).toEqual(ref.tokenIds);
      }
    }
    expect(engine.stats().usedBlocks).toBe(0);
  });

  it('a sequence that outgrows the whole pool finishes with length', async () => {
    const { engine } = make({ numBlocks: 6, blockSize: 4 });
    const p = prompt(10, 15);
    const r = await engine.addRequest({ promptTokenIds: p, sampling: greedy(100) }).result();
    expect(r.finishReason).toBe('length');
    expect(p.length + r.tokenIds.length).toBe(24);
    expect(r.tokenIds).toEqual(referenceGreedy(p, 14, V));
    expect(engine.info.maxModelLen).toBe(24);
  });

  it('abort ends the stream and frees blocks, also mid-step and while waiting', async () => {
    const { engine, runner } = make({ delayMs: 2 }, { maxNumSeqs: 1 });
    const a = engine.addRequest({ promptTokenIds: prompt(30, 16), sampling: greedy(1000) });
    const b = engine.addRequest({ promptTokenIds: prompt(5, 17), sampling: greedy(1000) });
    const it = a[Symbol.asyncIterator]();
    for (let i = 0; i < 3; i++) expect((await it.next()).done).toBe(false);
    // b waits (one sequence at a time): aborting it touches no blocks.
    expect(engine.stats().waiting).toBe(1);
    expect(engine.abort(b.requestId)).toBe(true);
    const rb = await b.result();
    expect(rb.finishReason).toBe('abort');
    expect(rb.tokenIds).toEqual([]);
    // a's step is in flight now: its blocks come back once the step completes.
    const used = engine.stats().usedBlocks;
    expect(used).toBeGreaterThan(0);
    a.abort();
    const rest: EngineOutput[] = [];
    for (;;) {
      const n = await it.next();
      if (n.done) break;
      rest.push(n.value);
    }
    expect(rest.at(-1)!.finishReason).toBe('abort');
    expect(engine.abort(a.requestId)).toBe(false);
    await idle(engine);
    const steps = runner.log.length;
    await new Promise((r) => setTimeout(r, 20));
    expect(runner.log.length).toBe(steps);
    expect(engine.stats().usedBlocks).toBe(0);
    // The engine goes on serving.
    const c = await engine.addRequest({ promptTokenIds: prompt(6, 18), sampling: greedy(3) }).result();
    expect(c.tokenIds).toEqual(referenceGreedy(prompt(6, 18), 3, V));
  });

  it('prefillOnly + decodeFromBlocks across two engines (blocks copied like a KV transfer) equals a normal run', async () => {
    const P = make({ blockSize: 4 });
    const D = make({ blockSize: 4 });
    const N = make({ blockSize: 4 });
    const dEvents: KvEvent[] = [];
    D.engine.onKvEvent((e) => dEvents.push(e));
    for (const [i, sampling] of [greedy(15), { temperature: 1, topP: 0.95, seed: 77, maxTokens: 15 }].entries()) {
      const p = prompt(21 + i, 19 + i);
      const normal = await N.engine.addRequest({ promptTokenIds: p, sampling }).result();

      const alloc = D.engine.allocateBlocks(p);
      expect(alloc.blockIds).toHaveLength(6);
      const pre = await P.engine.prefillOnly({ promptTokenIds: p, sampling });
      expect(pre.finishReason).toBeNull();
      expect(pre.firstToken).toBe(normal.tokenIds[0]);
      expect(pre.blockIds).toHaveLength(6);
      // P keeps its blocks until released.
      expect(P.engine.stats().usedBlocks).toBe(6);
      D.runner.copyBlocksFrom(P.runner, pre.blockIds, alloc.blockIds);
      P.engine.releaseBlocks(pre.blockIds);
      expect(P.engine.stats().usedBlocks).toBe(0);

      const handle = D.engine.decodeFromBlocks({ promptTokenIds: p, sampling }, alloc.blockIds, pre.firstToken);
      const r = await handle.result();
      expect(r.tokenIds).toEqual(normal.tokenIds);
      expect(D.engine.stats().usedBlocks).toBe(0);
    }
    // Logprobs carried over from the prefill side keep the result aligned with a normal run.
    const p = prompt(9, 25);
    const sampling = greedy(4, { logprobs: 2 });
    const normal = await N.engine.addRequest({ promptTokenIds: p, sampling }).result();
    const pre = await P.engine.prefillOnly({ promptTokenIds: p, sampling });
    const alloc = D.engine.allocateBlocks(p);
    D.runner.copyBlocksFrom(P.runner, pre.blockIds, alloc.blockIds);
    P.engine.releaseBlocks(pre.blockIds);
    const r = await D.engine
      .decodeFromBlocks({ promptTokenIds: p, sampling }, alloc.blockIds, pre.firstToken, pre.logprobs)
      .result();
    expect(r.tokenIds).toEqual(normal.tokenIds);
    expect(r.logprobs).toEqual(normal.logprobs);
    // D published the transferred prompt blocks.
    expect(dEvents.some((e) => e.type === 'stored' && e.parentHash === null)).toBe(true);
  });

  it('decode side with a cached prefix: only the uncached blocks need transferring', async () => {
    const P = make({ blockSize: 4 });
    const D = make({ blockSize: 4 });
    const shared = prompt(16, 30);
    const first = [...shared, ...prompt(5, 31)];
    const second = [...shared, ...prompt(7, 32)];
    // D served `first` before: its 4 shared blocks are cached.
    await D.engine.addRequest({ promptTokenIds: first, sampling: greedy(2) }).result();
    const alloc = D.engine.allocateBlocks(second);
    expect(alloc.cachedTokens).toBe(16);
    const pre = await P.engine.prefillOnly({ promptTokenIds: second, sampling: greedy(8) });
    const from = alloc.cachedTokens / 4;
    D.runner.copyBlocksFrom(P.runner, pre.blockIds.subarray(from), alloc.blockIds.subarray(from));
    P.engine.releaseBlocks(pre.blockIds);
    const r = await D.engine
      .decodeFromBlocks({ promptTokenIds: second, sampling: greedy(8) }, alloc.blockIds, pre.firstToken)
      .result();
    expect(r.tokenIds).toEqual(referenceGreedy(second, 8, V));
  });

  it('prefillOnly into given blocks keeps them; stop on the first token; abort rejects and frees', async () => {
    const { engine } = make({ blockSize: 4, delayMs: 1 });
    const p = prompt(13, 40);
    const alloc = engine.allocateBlocks(p);
    expect(alloc.cachedTokens).toBe(0);
    const pre = await engine.prefillOnly({ promptTokenIds: p, sampling: greedy(5) }, alloc.blockIds);
    expect(Array.from(pre.blockIds)).toEqual(Array.from(alloc.blockIds));
    expect(pre.firstToken).toBe(referenceGreedy(p, 1, V)[0]);
    expect(engine.stats().usedBlocks).toBe(4);
    // Its full prompt blocks are now a cached prefix: prefill into fresh blocks reuses them.
    const again = await engine.prefillOnly({ promptTokenIds: p, sampling: greedy(5) });
    expect(again.cachedTokens).toBe(12);
    expect(again.firstToken).toBe(pre.firstToken);
    engine.releaseBlocks(pre.blockIds);
    engine.releaseBlocks(again.blockIds);
    expect(engine.stats().usedBlocks).toBe(0);

    const stop = await engine.prefillOnly({
      promptTokenIds: p,
      sampling: greedy(5, { stopTokenIds: [pre.firstToken] }),
    });
    expect(stop.finishReason).toBe('stop');
    expect(stop.stopReason).toBe(pre.firstToken);
    engine.releaseBlocks(stop.blockIds);

    const pending = engine.prefillOnly({ promptTokenIds: prompt(40, 41), requestId: 'x' });
    expect(engine.abort('x')).toBe(true);
    await expect(pending).rejects.toBeInstanceOf(CanceledError);
    await idle(engine);
    expect(engine.stats().usedBlocks).toBe(0);

    // decodeFromBlocks with a stop first token ends at once and frees the blocks.
    const a2 = engine.allocateBlocks(p);
    const h = engine.decodeFromBlocks(
      { promptTokenIds: p, sampling: greedy(5, { stopTokenIds: [7] }) },
      a2.blockIds,
      7,
    );
    const r = await h.result();
    expect(r).toMatchObject({ tokenIds: [7], finishReason: 'stop', stopReason: 7 });
    expect(engine.stats().usedBlocks).toBe(0);
  });

  it('given blocks that hold a cached prefix are never written', async () => {
    const { engine } = make({ blockSize: 4 });
    const p = prompt(8, 45); // block-aligned
    await engine.addRequest({ promptTokenIds: p, sampling: greedy(1) }).result();
    const alloc = engine.allocateBlocks(p);
    expect(alloc.cachedTokens).toBe(8);
    // Its last block is a cache hit, but prefill must write the last token's KV.
    await expect(async () => engine.prefillOnly({ promptTokenIds: p }, alloc.blockIds)).rejects.toThrow(
      /cached prefix/,
    );
    // Fine for decoding: nothing of the prompt is written.
    const r = await engine.decodeFromBlocks({ promptTokenIds: p, sampling: greedy(3) }, alloc.blockIds, 1).result();
    expect(r.tokenIds).toEqual([1, ...referenceGreedy([...p, 1], 2, V)]);
    const other = engine.allocateBlocks(p);
    expect(() => engine.decodeFromBlocks({ promptTokenIds: prompt(8, 46) }, other.blockIds, 1)).toThrow(
      /another prompt/,
    );
    engine.releaseBlocks(other.blockIds);
    expect(engine.stats().usedBlocks).toBe(0);
  });

  it('a throwing detokenize fails only its request', async () => {
    const { engine } = make();
    const bad = engine.addRequest({
      promptTokenIds: [1, 2],
      sampling: greedy(5, { stop: ['x'] }),
      detokenize: () => {
        throw new Error('no');
      },
    });
    const good = engine.addRequest({ promptTokenIds: [1, 2], sampling: greedy(5) });
    await expect(bad.result()).rejects.toThrow(/detokenize threw/);
    expect((await good.result()).tokenIds).toEqual(referenceGreedy([1, 2], 5, V));
    expect(engine.stats().usedBlocks).toBe(0);
  });

  it('allocateBlocks throws KvCacheFullError when the pool cannot hold the prompt now', () => {
    const { engine } = make({ numBlocks: 4, blockSize: 4 });
    const a = engine.allocateBlocks(prompt(12, 42));
    expect(() => engine.allocateBlocks(prompt(8, 43))).toThrow(KvCacheFullError);
    engine.releaseBlocks(a.blockIds);
    engine.releaseBlocks(engine.allocateBlocks(prompt(8, 43)).blockIds);
    expect(() => engine.decodeFromBlocks({ promptTokenIds: prompt(8, 44) }, [0, 1], 3)).toThrow(/not allocated/);
  });

  it('seeds are reproducible; different seeds differ; unseeded requests still run', async () => {
    const { engine } = make();
    const p = prompt(12, 50);
    const run = (seed?: number) =>
      engine.addRequest({ promptTokenIds: p, sampling: { temperature: 1.2, seed, maxTokens: 30 } }).result();
    const [a, b, c] = await Promise.all([run(5), run(5), run(6)]);
    expect(a.tokenIds).toEqual(b.tokenIds);
    expect(a.tokenIds).not.toEqual(c.tokenIds);
    expect((await run()).tokenIds).toHaveLength(30);
  });

  it('top-k 1 and tiny top-p equal greedy; temperature spreads the choice of first token', async () => {
    const { engine } = make();
    const p = prompt(9, 60);
    const ref = referenceGreedy(p, 25, V);
    const k1 = await engine.addRequest({ promptTokenIds: p, sampling: { topK: 1, seed: 3, maxTokens: 25 } }).result();
    const p0 = await engine
      .addRequest({ promptTokenIds: p, sampling: { topP: 1e-9, seed: 3, maxTokens: 25 } })
      .result();
    expect(k1.tokenIds).toEqual(ref);
    expect(p0.tokenIds).toEqual(ref);
    const firsts = await Promise.all(
      Array.from({ length: 200 }, (_, i) =>
        engine.addRequest({ promptTokenIds: p, sampling: { temperature: 1, topK: 3, seed: i, maxTokens: 1 } }).result(),
      ),
    );
    const logits = referenceLogits(p, V);
    const top3 = Array.from({ length: V }, (_, i) => i)
      .sort((x, y) => logits[y]! - logits[x]!)
      .slice(0, 3);
    const seen = new Set(firsts.map((r) => r.tokenIds[0]!));
    expect([...seen].every((t) => top3.includes(t))).toBe(true);
    expect(seen.size).toBeGreaterThan(1);
  });

  it('stop token ids and stop strings end generation; maxTokens gives length', async () => {
    const { engine } = make({}, { detokenize });
    const p = prompt(7, 70);
    const ref = referenceGreedy(p, 40, V);
    const stopId = ref[9]!;
    const cut = ref.indexOf(stopId) + 1;
    const byId = await engine
      .addRequest({ promptTokenIds: p, sampling: greedy(40, { stopTokenIds: [stopId] }) })
      .result();
    expect(byId).toMatchObject({ finishReason: 'stop', stopReason: stopId, tokenIds: ref.slice(0, cut) });

    const str = detokenize(ref.slice(12, 15));
    let end = 1;
    while (!detokenize(ref.slice(0, end)).includes(str)) end++;
    const handle = engine.addRequest({ promptTokenIds: p, sampling: greedy(40, { stop: ['zzzzzzzz', str] }) });
    const outs: EngineOutput[] = [];
    for await (const o of handle) outs.push(o);
    expect(outs.flatMap((o) => o.tokenIds)).toEqual(ref.slice(0, end));
    expect(outs.at(-1)).toMatchObject({ finishReason: 'stop', stopReason: str });

    // A per-request detokenize overrides the engine's.
    const upper = await engine
      .addRequest({
        promptTokenIds: p,
        sampling: greedy(40, { stop: [str.toUpperCase()] }),
        detokenize: (ids) => detokenize(ids).toUpperCase(),
      })
      .result();
    expect(upper.tokenIds).toEqual(ref.slice(0, end));

    const len = await engine.addRequest({ promptTokenIds: p, sampling: greedy(3) }).result();
    expect(len).toMatchObject({ finishReason: 'length', tokenIds: ref.slice(0, 3) });
    expect(len.stopReason).toBeUndefined();

    const noDetok = make().engine;
    expect(() => noDetok.addRequest({ promptTokenIds: p, sampling: { stop: ['a'] } })).toThrow(/detokenize/);
  });

  it('logprobs: log-softmax of the raw logits for the chosen token and the top N', async () => {
    const { engine } = make();
    const p = prompt(11, 80);
    const r: RequestResult = await engine
      .addRequest({ promptTokenIds: p, sampling: { temperature: 0.7, seed: 4, maxTokens: 6, logprobs: 3 } })
      .result();
    expect(r.logprobs).toHaveLength(6);
    const history = [...p];
    for (let i = 0; i < 6; i++) {
      const logits = referenceLogits(history, V);
      const max = Math.max(...logits);
      const lse = max + Math.log(logits.reduce((a, x) => a + Math.exp(x - max), 0));
      const lp = r.logprobs![i]!;
      expect(lp.tokenId).toBe(r.tokenIds[i]);
      expect(lp.logprob).toBeCloseTo(logits[r.tokenIds[i]!]! - lse, 5);
      const order = Array.from({ length: V }, (_, v) => v).sort((a, b) => logits[b]! - logits[a]!);
      expect(Array.from(lp.topTokenIds)).toEqual(order.slice(0, 3));
      for (let j = 0; j < 3; j++) expect(lp.topLogprobs[j]).toBeCloseTo(logits[order[j]!]! - lse, 5);
      history.push(r.tokenIds[i]!);
    }
    const none = await engine.addRequest({ promptTokenIds: p, sampling: greedy(2) }).result();
    expect(none.logprobs).toBeUndefined();
  });

  it('a runner that samples on its device (forwardSampled) gives the tokens and logprobs of whole rows', async () => {
    const host = make();
    const runner = new FakeSampledRunner({ vocabSize: V });
    const device = new LlmEngine(runner);
    engines.push(device);
    const samplings: SamplingParams[] = [
      greedy(12, { logprobs: 2 }),
      { temperature: 0.9, seed: 3, maxTokens: 12 },
      { temperature: 1.1, topK: 7, seed: 4, maxTokens: 12, logprobs: 1 },
      { temperature: 1, topP: 0.8, seed: 5, maxTokens: 12 },
      { temperature: 0.6, topK: 30, topP: 0.9, seed: 6, maxTokens: 12 },
    ];
    const run = (engine: LlmEngine) =>
      Promise.all(
        samplings.map((sampling, i) =>
          engine.addRequest({ promptTokenIds: prompt(10 + i, 90 + i), sampling }).result(),
        ),
      );
    const [a, b] = [await run(host.engine), await run(device)];
    expect(runner.plans.length).toBeGreaterThan(0);
    for (let i = 0; i < samplings.length; i++) {
      expect(b[i]!.tokenIds, `request ${i}`).toEqual(a[i]!.tokenIds);
      expect(b[i]!.logprobs?.length).toBe(a[i]!.logprobs?.length);
      b[i]!.logprobs?.forEach((lp, j) => {
        expect(lp.logprob).toBeCloseTo(a[i]!.logprobs![j]!.logprob, 5);
        expect(Array.from(lp.topTokenIds)).toEqual(Array.from(a[i]!.logprobs![j]!.topTokenIds));
      });
    }
  });

  it('prompts that can never fit are rejected with PromptTooLongError; bad input with BadArgumentError', async () => {
    const { engine } = make({ maxPositions: 64, numBlocks: 8, blockSize: 4 });
    expect(engine.info.maxModelLen).toBe(32);
    expect(() => engine.addRequest({ promptTokenIds: prompt(33, 90) })).toThrow(PromptTooLongError);
    const ctx = make({ maxPositions: 16, numBlocks: 64, blockSize: 4 }).engine;
    try {
      ctx.addRequest({ promptTokenIds: prompt(17, 91) });
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(PromptTooLongError);
      expect((e as PromptTooLongError).limit).toBe(16);
      expect((e as Error).message).toMatch(/context/);
    }
    expect(() => engine.addRequest({ promptTokenIds: [] })).toThrow(/empty/);
    expect(() => engine.addRequest({ promptTokenIds: [V] })).toThrow(/token id/);
    expect(() => engine.addRequest({ promptTokenIds: [1], sampling: { topP: 0 } })).toThrow(/topP/);
    expect(() => engine.addRequest({ promptTokenIds: [1], sampling: { temperature: -1 } })).toThrow(/temperature/);
    expect(() => engine.addRequest({ promptTokenIds: [1], sampling: { maxTokens: 0 } })).toThrow(/maxTokens/);
    engine.addRequest({ promptTokenIds: [1], requestId: 'dup', sampling: greedy(50) });
    expect(() => engine.addRequest({ promptTokenIds: [1], requestId: 'dup' })).toThrow(/already live/);
    // A prompt of exactly the limit gives one token.
    const r = await engine.addRequest({ promptTokenIds: prompt(32, 92), sampling: greedy(10) }).result();
    expect(r).toMatchObject({ finishReason: 'length' });
    expect(r.tokenIds).toHaveLength(1);
  });

  it('a runner error fails the requests of that step with EngineRequestError; the engine keeps serving', async () => {
    const { engine, runner } = make();
    const POISON = 63;
    const boom = new Error('device fell over');
    runner.failWhen = (b) => (b.tokens.includes(POISON) ? boom : null);
    const bad = engine.addRequest({ promptTokenIds: [1, 2, POISON, 4], sampling: greedy(5) });
    const err = await bad.result().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(EngineRequestError);
    expect((err as EngineRequestError).cause).toBe(boom);
    expect((err as EngineRequestError).requestId).toBe(bad.requestId);
    await expect(
      (async () => {
        for await (const _ of bad) void _;
      })(),
    ).rejects.toBeInstanceOf(EngineRequestError);
    runner.failWhen = null;
    const good = await engine.addRequest({ promptTokenIds: [1, 2, 3], sampling: greedy(5) }).result();
    expect(good.tokenIds).toEqual(referenceGreedy([1, 2, 3], 5, V));

    // Fail the 3rd step of a batch: every request in it fails, blocks come back, later requests run.
    let n = 0;
    runner.failWhen = () => (++n === 3 ? boom : null);
    const batch = Array.from({ length: 4 }, (_, i) =>
      engine.addRequest({ promptTokenIds: prompt(5, 93 + i), sampling: greedy(6) }),
    );
    const settled = await Promise.allSettled(batch.map((h) => h.result()));
    expect(settled.every((s) => s.status === 'rejected' && s.reason instanceof EngineRequestError)).toBe(true);
    expect(engine.stats().failedSteps).toBe(2);
    expect(engine.stats().usedBlocks).toBe(0);
    const after = await engine.addRequest({ promptTokenIds: [5, 6], sampling: greedy(4) }).result();
    expect(after.tokenIds).toEqual(referenceGreedy([5, 6], 4, V));
  });

  it('random workload: tiny pool, small budget, shared prefixes, aborts; greedy outputs exact, no block leaks', async () => {
    let x = 4242;
    const rnd = (n: number) => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) >>> 8) % n;
    const { engine } = make({ numBlocks: 24, blockSize: 4, delayMs: 0 }, { maxNumBatchedTokens: 13, maxNumSeqs: 5 });
    const bases = [prompt(12, 500), prompt(9, 501), prompt(20, 502)];
    const jobs: Promise<void>[] = [];
    let aborted = 0;
    for (let i = 0; i < 60; i++) {
      const p = [...bases[rnd(3)]!.slice(0, rnd(20)), ...prompt(1 + rnd(10), 600 + i)];
      const max = 1 + rnd(25);
      const h = engine.addRequest({ promptTokenIds: p, sampling: greedy(max) });
      const abortAfter = rnd(4) === 0 ? rnd(5) : -1;
      jobs.push(
        (async () => {
          const got: number[] = [];
          let reason = null;
          for await (const o of h) {
            got.push(...o.tokenIds);
            reason = o.finishReason;
            if (got.length === abortAfter) h.abort();
          }
          const ref = referenceGreedy(p, max, V);
          if (reason === 'abort') {
            aborted++;
            expect(ref.slice(0, got.length)).toEqual(got);
          } else expect(got).toEqual(ref);
        })(),
      );
      if (rnd(3) === 0) await new Promise((r) => setImmediate(r));
    }
    await Promise.all(jobs);
    expect(aborted).toBeGreaterThan(0);
    await idle(engine);
    const s = engine.stats();
    expect(s.usedBlocks).toBe(0);
    expect(s.preemptions).toBeGreaterThan(0);
    expect(s.prefixCacheHitBlocks).toBeGreaterThan(0);
  });

  it('dispose fails live requests with DisposedError and refuses new ones', async () => {
    const { engine, runner } = make({ delayMs: 2 }, { maxNumBatchedTokens: 4 });
    const h = engine.addRequest({ promptTokenIds: prompt(5, 99), sampling: greedy(1000) });
    const pre = engine.prefillOnly({ promptTokenIds: prompt(50, 98) }).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 10));
    await engine.dispose();
    await expect(h.result()).rejects.toBeInstanceOf(DisposedError);
    expect(await pre).toBeInstanceOf(DisposedError);
    expect(runner.disposed).toBe(true);
    expect(() => engine.addRequest({ promptTokenIds: [1] })).toThrow(DisposedError);
  });
});
