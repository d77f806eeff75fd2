import { afterEach, describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import type { RequestResult, SamplingParams } from '../../lib/engine/engine.js';
import { LlmEngine } from '../../lib/engine/llm-engine.js';
import { FakeRunner } from '../helpers/fake-runner.js';

// Resume (request migration): a request handed the first k output tokens of a run continues exactly as that run
// did. The resumed tokens are output, not prompt: a seeded sampler draws with counters k, k+1, ...; maxTokens,
// minTokens and stop strings count them; logprobs of the tokens generated after them are those of the run; the
// prompt's length stays the original one.
const V = 64;
const engines: LlmEngine[] = [];
afterEach(async () => {
  await Promise.all(engines.splice(0).map((e) => e.dispose()));
});

function make(options: { detokenize?: (ids: readonly number[]) => string; blockSize?: number } = {}) {
  const engine = new LlmEngine(
    new FakeRunner({ vocabSize: V, blockSize: options.blockSize ?? 4 }),
    options.detokenize ? { detokenize: options.detokenize } : {},
  );
  engines.push(engine);
  return engine;
}

const PROMPT = [5, 17, 33, 2, 61, 40, 9];
const N = 24;

async function run(engine: LlmEngine, sampling: SamplingParams, outputTokenIds?: number[]): Promise<RequestResult> {
  return engine
    .addRequest({ promptTokenIds: PROMPT, sampling, ...(outputTokenIds ? { resume: { outputTokenIds } } : {}) })
    .result();
}

/** Resumes `full`'s request after each k of `cuts` and checks that it yields the rest of `full`. */
async function expectContinues(engine: LlmEngine, sampling: SamplingParams, full: RequestResult, cuts: number[]) {
  for (const k of cuts) {
    const resumed = await run(engine, sampling, full.tokenIds.slice(0, k));
    expect(resumed.tokenIds, `resumed after ${k}`).toEqual(full.tokenIds.slice(k));
    expect(resumed.finishReason).toBe(full.finishReason);
    expect(resumed.promptTokens).toBe(PROMPT.length);
    if (full.logprobs) expect(resumed.logprobs).toEqual(full.logprobs.slice(k));
  }
}

describe('resume', () => {
  it('greedy: resumed after k tokens, the rest of the run', async () => {
    const engine = make();
    const sampling = { temperature: 0, maxTokens: N };
    const full = await run(engine, sampling);
    expect(full.tokenIds).toHaveLength(N);
    await expectContinues(engine, sampling, full, [0, 1, 4, 5, 13, N - 1]);
  });

  it('seeded sampling: the sampler continues at output position k, not at 0', async () => {
    const engine = make();
    for (const sampling of [
      { temperature: 1.3, seed: 7, maxTokens: N },
      { temperature: 0.8, topK: 9, topP: 0.9, seed: 1234567, maxTokens: N },
    ]) {
      const full = await run(engine, sampling);
      // Restarting the counter would draw the run's own first tokens again, which a seed makes a different run.
      const restarted = await engine
        .addRequest({ promptTokenIds: [...PROMPT, ...full.tokenIds.slice(0, 6)], sampling })
        .result();
      expect(restarted.tokenIds).not.toEqual(full.tokenIds.slice(6, 6 + restarted.tokenIds.length));
      await expectContinues(engine, sampling, full, [1, 6, 11, N - 1]);
    }
  });

  it('penalties count the resumed tokens as output', async () => {
    const engine = make();
    for (const sampling of [
      { temperature: 0, maxTokens: N, presencePenalty: 1.2, frequencyPenalty: 0.6 },
      { temperature: 0.9, seed: 11, maxTokens: N, frequencyPenalty: 1.5, repetitionPenalty: 1.4 },
    ]) {
      const full = await run(engine, sampling);
      await expectContinues(engine, sampling, full, [1, 7, 16]);
    }
  });

  it('logprobs of the tokens generated after the resumed ones are those of the run', async () => {
    const engine = make();
    const sampling = { temperature: 0.9, seed: 3, maxTokens: 12, logprobs: 3 };
    const full = await run(engine, sampling);
    await expectContinues(engine, sampling, full, [2, 7]);
  });

  it('maxTokens and the stop check count the resumed tokens; minTokens too', async () => {
    const engine = make();
    const greedy = { temperature: 0, maxTokens: N };
    const ref = (await run(engine, greedy)).tokenIds;
    // A token whose first occurrence is past the start, so that minTokens can hold it back.
    const at = ref.findIndex((t, i) => i > 2 && ref.indexOf(t) === i);
    const stopId = ref[at]!;
    const stopping = { ...greedy, stopTokenIds: [stopId] };
    const full = await run(engine, stopping);
    expect(full).toMatchObject({ finishReason: 'stop', tokenIds: ref.slice(0, at + 1) });
    await expectContinues(engine, stopping, full, [1, at]);
    // minTokens past the stop: the run goes on; the resumed request counts its resumed tokens toward minTokens.
    const held = { ...stopping, minTokens: at + 1 };
    const fullHeld = await run(engine, held);
    expect(fullHeld.tokenIds.length).toBeGreaterThan(at + 1);
    await expectContinues(engine, held, fullHeld, [at, at + 1]);
  });

  it('stop strings see the resumed text', async () => {
    const detokenize = (ids: readonly number[]) => ids.map((i) => String.fromCharCode(97 + (i % 26))).join('');
    const engine = make({ detokenize });
    const ref = (await run(engine, { temperature: 0, maxTokens: N })).tokenIds;
    // A stop string made of output tokens 4 and 5: resumed after token 4, the match spans the cut.
    const stop = detokenize(ref.slice(4, 6));
    const sampling = { temperature: 0, maxTokens: N, stop: [stop] };
    const full = await run(engine, sampling);
    expect(full.finishReason).toBe('stop');
    await expectContinues(engine, sampling, full, [5]);
  });

  it('refuses output the request could not have produced, and leaves the engine serving', async () => {
    const engine = make();
    const greedy = { temperature: 0, maxTokens: 8 };
    const ref = (await run(engine, greedy)).tokenIds;
    const bad = (sampling: SamplingParams, outputTokenIds: unknown) => () =>
      engine.addRequest({ promptTokenIds: PROMPT, sampling, resume: { outputTokenIds } as never });
    expect(bad(greedy, ref)).toThrow(/maxTokens \(8\) was already reached/);
    expect(bad(greedy, [1, V])).toThrow(/resume\.outputTokenIds\[1\] = 64 is not a token id/);
    expect(bad(greedy, 'abc')).toThrow(BadArgumentError);
    expect(bad({ ...greedy, stopTokenIds: [ref[2]!] }, ref.slice(0, 4))).toThrow(/outputTokenIds\[2\].*stop token/);
    // Below minTokens a stop token is ordinary output.
    expect(bad({ ...greedy, stopTokenIds: [ref[2]!], minTokens: 3 }, ref.slice(0, 4))).not.toThrow();
    expect(() => engine.addRequest({ promptTokenIds: PROMPT, sampling: greedy, resume: null as never })).toThrow(
      /resume must be an object/,
    );
    const resume = { outputTokenIds: [1] };
    expect(() => engine.prefillOnly({ promptTokenIds: PROMPT, sampling: greedy, resume })).toThrow(/addRequest only/);
    const alloc = engine.allocateBlocks(PROMPT);
    expect(() =>
      engine.decodeFromBlocks({ promptTokenIds: PROMPT, sampling: greedy, resume }, alloc.blockIds, 1),
    ).toThrow(/addRequest only/);
    engine.releaseBlocks(alloc.blockIds);
    // The context limit: prompt and output already at maxModelLen.
    const ctx = engine.info.maxModelLen;
    expect(bad({ temperature: 0 }, new Array(ctx - PROMPT.length).fill(1))).toThrow(/context limit/);
    expect((await run(engine, greedy)).tokenIds).toEqual(ref);
  });

  it('a resumed request shares a batch with others and survives preemption unchanged', async () => {
    const engine = new LlmEngine(new FakeRunner({ vocabSize: V, blockSize: 4, numBlocks: 14 }));
    engines.push(engine);
    const sampling = { temperature: 1, seed: 99, maxTokens: 20 };
    const full = await run(engine, sampling);
    const others = [1, 2, 3].map((s) =>
      engine.addRequest({ promptTokenIds: [s, s + 1, s + 2], sampling: { ...sampling, seed: s } }).result(),
    );
    const resumed = run(engine, sampling, full.tokenIds.slice(0, 9));
    await Promise.all(others);
    expect((await resumed).tokenIds).toEqual(full.tokenIds.slice(9));
    expect(engine.stats().preemptions).toBeGreaterThan(0);
  });
});
