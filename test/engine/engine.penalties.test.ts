import { afterEach, describe, expect, it } from 'vitest';
import type { SamplingParams } from '../../lib/engine/engine.js';
import { LlmEngine } from '../../lib/engine/llm-engine.js';
import { SAMPLE_FULL_ROW } from '../../lib/engine/runner.js';
import { Sampler, seedHalves } from '../../lib/engine/sampler.js';
import { FakeSampledRunner } from '../helpers/device-sampling.js';
import { FakeRunner, referenceLogits } from '../helpers/fake-runner.js';

// Presence, frequency and repetition penalties (OpenAI's and vLLM's), against a plain reference written from
// their definitions: repetition divides a positive logit (multiplies a negative one) of each token seen in prompt
// or output; frequency subtracts weight x count in the output; presence subtracts its weight once per output token.
const V = 64;
const engines: LlmEngine[] = [];
afterEach(async () => {
  await Promise.all(engines.splice(0).map((e) => e.dispose()));
});

function make() {
  const engine = new LlmEngine(new FakeRunner({ vocabSize: V }));
  engines.push(engine);
  return engine;
}

const PROMPT = [7, 7, 12, 40, 3, 12, 59];

/** Greedy decoding with penalties, from the definitions, over the fake runner's logits. */
function referencePenalized(maxTokens: number, presence: number, frequency: number, repetition: number): number[] {
  const history = [...PROMPT];
  const out: number[] = [];
  for (let i = 0; i < maxTokens; i++) {
    const logits = Array.from(referenceLogits(history, V));
    for (let v = 0; v < V; v++) {
      const count = out.filter((t) => t === v).length;
      if (repetition !== 1 && (count > 0 || PROMPT.includes(v)))
        logits[v] = logits[v]! > 0 ? logits[v]! / repetition : logits[v]! * repetition;
      logits[v] = logits[v]! - frequency * count - (count > 0 ? presence : 0);
    }
    let best = 0;
    for (let v = 1; v < V; v++) if (Math.fround(logits[v]!) > Math.fround(logits[best]!)) best = v;
    out.push(best);
    history.push(best);
  }
  return out;
}

const run = (engine: LlmEngine, sampling: SamplingParams) =>
  engine.addRequest({ promptTokenIds: PROMPT, sampling }).result();

describe('penalties', () => {
  it('greedy with each penalty gives the reference tokens, and differs from no penalty', async () => {
    const engine = make();
    const plain = (await run(engine, { temperature: 0, maxTokens: 30 })).tokenIds;
    for (const [presence, frequency, repetition] of [
      [1.5, 0, 1],
      [0, 0.7, 1],
      [0, 0, 1.8],
      [0, 0, 0.5],
      [-0.5, 0.4, 1.3],
    ] as const) {
      const got = await run(engine, {
        temperature: 0,
        maxTokens: 30,
        presencePenalty: presence,
        frequencyPenalty: frequency,
        repetitionPenalty: repetition,
      });
      const label = `presence ${presence} frequency ${frequency} repetition ${repetition}`;
      expect(got.tokenIds, label).toEqual(referencePenalized(30, presence, frequency, repetition));
      expect(got.tokenIds, label).not.toEqual(plain);
    }
  });

  it('logprobs stay those of the raw logits', async () => {
    const engine = make();
    const sampling = { temperature: 0, maxTokens: 6, logprobs: 2 };
    const plain = await run(engine, sampling);
    const penalized = await run(engine, { ...sampling, repetitionPenalty: 1.01 });
    // The same first token (a tiny penalty), and the same log-softmax of the same raw logits for it.
    expect(penalized.tokenIds[0]).toBe(plain.tokenIds[0]);
    expect(penalized.logprobs![0]).toEqual(plain.logprobs![0]);
  });

  it('out-of-range penalties are refused', () => {
    const engine = make();
    const bad = (sampling: SamplingParams) => () => engine.addRequest({ promptTokenIds: PROMPT, sampling });
    expect(bad({ presencePenalty: 2.5 })).toThrow(/presencePenalty must be a number in \[-2, 2\]/);
    expect(bad({ frequencyPenalty: NaN })).toThrow(/frequencyPenalty must be a number in \[-2, 2\]/);
    expect(bad({ repetitionPenalty: 0 })).toThrow(/repetitionPenalty must be a finite number > 0/);
    expect(bad({ repetitionPenalty: Infinity })).toThrow(/repetitionPenalty/);
  });

  it('an engine that samples on a device gives the tokens and logprobs of host sampling, penalized', async () => {
    const device = new LlmEngine(new FakeSampledRunner({ vocabSize: V }));
    engines.push(device);
    const host = make();
    for (const sampling of [
      { temperature: 0, maxTokens: 20, presencePenalty: 1, repetitionPenalty: 1.5, logprobs: 2 },
      { temperature: 0.9, seed: 8, maxTokens: 20, frequencyPenalty: 0.8, logprobs: 1 },
      { temperature: 1, topK: 5, seed: 9, maxTokens: 20, repetitionPenalty: 0.7 },
    ]) {
      const [d, h] = [await run(device, sampling), await run(host, sampling)];
      expect(d.tokenIds).toEqual(h.tokenIds);
      expect(d.logprobs).toEqual(h.logprobs);
    }
  });

  it('a device is asked for the whole row of a penalized request', () => {
    const sampler = new Sampler(V);
    const params = { temperature: 0.8, topK: 0, topP: 1, ...seedHalves(1) };
    const plan = sampler.plan([
      { params, counter: 0, logprobs: -1 },
      { params, counter: 0, logprobs: -1, fullRow: true },
    ]);
    expect(plan.flags[0]! & SAMPLE_FULL_ROW).toBe(0);
    expect(plan.flags[1]! & SAMPLE_FULL_ROW).toBe(SAMPLE_FULL_ROW);
  });
});
