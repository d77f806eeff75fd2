import { afterEach, describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import type { SamplingParams } from '../../lib/engine/engine.js';
import { LlmEngine } from '../../lib/engine/llm-engine.js';
import { FakeRunner, referenceGreedy } from '../helpers/fake-runner.js';

// minTokens (vLLM's min_tokens) at its boundary: a stop token or stop string ends the request only once at
// least minTokens tokens precede it, on the whole-request path and on the prefill / decode split.
const V = 64;
const engines: LlmEngine[] = [];
afterEach(async () => {
  await Promise.all(engines.splice(0).map((e) => e.dispose()));
});

function make(detokenize?: (ids: readonly number[]) => string) {
  const engine = new LlmEngine(new FakeRunner({ vocabSize: V }), detokenize ? { detokenize } : {});
  engines.push(engine);
  return engine;
}

const PROMPT = [5, 17, 33, 2, 61, 40, 9];
const greedy = (maxTokens: number, extra: SamplingParams = {}): SamplingParams => ({
  temperature: 0,
  maxTokens,
  ...extra,
});

/** The greedy output cut where a stop at the first occurrence of `stopId` past minTokens ends it. */
function expected(ref: number[], stopId: number, minTokens: number): number[] {
  const at = ref.findIndex((t, i) => t === stopId && i >= minTokens);
  return at < 0 ? ref : ref.slice(0, at + 1);
}

describe('minTokens', () => {
  const ref = referenceGreedy(PROMPT, 40, V);
  // A token whose first occurrence is not the first output token, so that minTokens can hold it back.
  const k = ref.findIndex((t, i) => i > 0 && ref.indexOf(t) === i);
  const stopId = ref[k]!;

  it('a stop token at position minTokens + 1 ends the request; at position minTokens it does not', async () => {
    const engine = make();
    const run = (minTokens: number) =>
      engine
        .addRequest({ promptTokenIds: PROMPT, sampling: greedy(40, { stopTokenIds: [stopId], minTokens }) })
        .result();
    // The stop token is output token k + 1 (1-based): k tokens precede it.
    const atBoundary = await run(k);
    expect(atBoundary).toMatchObject({ finishReason: 'stop', stopReason: stopId, tokenIds: ref.slice(0, k + 1) });
    const past = await run(k + 1);
    expect(past.tokenIds).toEqual(expected(ref, stopId, k + 1));
    expect(past.tokenIds.length).toBeGreaterThan(k + 1);
    // minTokens = maxTokens: exactly maxTokens tokens whatever they are.
    const forced = await engine
      .addRequest({ promptTokenIds: PROMPT, sampling: greedy(30, { stopTokenIds: ref, minTokens: 30 }) })
      .result();
    expect(forced).toMatchObject({ finishReason: 'length', tokenIds: ref.slice(0, 30) });
  });

  it('stop strings wait for minTokens too', async () => {
    const detokenize = (ids: readonly number[]) => ids.map((i) => String.fromCharCode(97 + (i % 26))).join('');
    const engine = make(detokenize);
    const str = detokenize([stopId]);
    const first = detokenize(ref).indexOf(str); // the token that completes the first match
    const run = (minTokens: number) =>
      engine.addRequest({ promptTokenIds: PROMPT, sampling: greedy(40, { stop: [str], minTokens }) }).result();
    expect((await run(first)).tokenIds).toEqual(ref.slice(0, first + 1));
    const later = await run(first + 1);
    expect(later.tokenIds.length).toBeGreaterThan(first + 1);
  });

  it('prefillOnly and decodeFromBlocks: the first token does not stop a request with minTokens >= 1', async () => {
    const engine = make();
    const first = ref[0]!;
    const stops = await engine.prefillOnly({ promptTokenIds: PROMPT, sampling: greedy(5, { stopTokenIds: [first] }) });
    expect(stops.finishReason).toBe('stop');
    engine.releaseBlocks(stops.blockIds);
    const held = await engine.prefillOnly({
      promptTokenIds: PROMPT,
      sampling: greedy(5, { stopTokenIds: [first], minTokens: 1 }),
    });
    expect(held.finishReason).toBeNull();
    engine.releaseBlocks(held.blockIds);

    const alloc = engine.allocateBlocks(PROMPT);
    const decoded = await engine
      .decodeFromBlocks(
        { promptTokenIds: PROMPT, sampling: greedy(5, { stopTokenIds: [first], minTokens: 1 }) },
        alloc.blockIds,
        first,
      )
      .result();
    expect(decoded.tokenIds[0]).toBe(first);
    expect(decoded.tokenIds.length).toBeGreaterThan(1);
  });

  it('minTokens must be an integer in 0 .. maxTokens', () => {
    const engine = make();
    const add = (minTokens: number, maxTokens = 5) =>
      engine.addRequest({ promptTokenIds: PROMPT, sampling: greedy(maxTokens, { minTokens }) });
    expect(() => add(6)).toThrow(BadArgumentError);
    expect(() => add(6)).toThrow(/minTokens must be an integer in 0 \.\. maxTokens \(5\) \(got 6\)/);
    expect(() => add(-1)).toThrow(BadArgumentError);
    expect(() => add(1.5)).toThrow(BadArgumentError);
    expect(() => add(5).abort()).not.toThrow();
  });
});
