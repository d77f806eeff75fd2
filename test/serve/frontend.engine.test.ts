import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { RequestHandle } from '../../lib/engine/engine.js';
import { LlmEngine } from '../../lib/engine/llm-engine.js';
import { BYTE_EOS_ID, BYTE_VOCAB_SIZE } from '../../lib/engine/model/tokenizer-bytes.js';
import { byteTextTokenizer } from '../../lib/engine/tokenizer.js';
import { engineBackend } from '../../lib/frontend/engine-backend.js';
import { startFrontend, type RunningFrontend } from '../../lib/frontend/index.js';
import { FakeRunner, referenceGreedy } from '../helpers/fake-runner.js';

// The frontend over the real engine (with the deterministic fake runner): token ids, sampling parameters,
// EOS and aborts cross the GenerationBackend seam as the engine expects them.
const MODEL = 'fake';
const tokenizer = byteTextTokenizer();
let engine: LlmEngine;
let runner: FakeRunner;
let frontend: RunningFrontend;
let client: OpenAI;

beforeAll(async () => {
  runner = new FakeRunner({ vocabSize: BYTE_VOCAB_SIZE, numBlocks: 64, blockSize: 16, maxPositions: 512 });
  engine = new LlmEngine(runner);
  frontend = await startFrontend({
    backend: engineBackend(engine),
    tokenizer,
    modelName: MODEL,
    contextLength: engine.info.maxModelLen,
    vocabSize: engine.info.vocabSize,
    port: 0,
  });
  client = new OpenAI({ baseURL: `${frontend.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 10_000 });
});
afterAll(async () => {
  await frontend?.close({ drainMs: 1000 });
  await engine?.dispose();
});

async function idle(): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    const s = engine.stats();
    if (s.running === 0 && s.waiting === 0 && s.usedBlocks === 0) return;
    await new Promise((r) => setTimeout(r, 1));
  }
  throw new Error('engine did not go idle');
}

describe('frontend over LlmEngine', () => {
  it('greedy completion equals the reference, EOS and max_tokens included', async () => {
    const prompt = 'The quick brown fox';
    const ids = tokenizer.encode(prompt);
    const expected = referenceGreedy(ids, 12, BYTE_VOCAB_SIZE, [BYTE_EOS_ID]);
    const r = await client.completions.create({ model: MODEL, prompt, max_tokens: 12, temperature: 0 });
    expect(r.usage!.completion_tokens).toBe(expected.length);
    expect(r.choices[0]!.text).toBe(tokenizer.decode(expected));
    expect(r.choices[0]!.finish_reason).toBe(expected.at(-1) === BYTE_EOS_ID ? 'stop' : 'length');
  });

  it('a fixed seed gives the same text, streaming or not', async () => {
    const body = { model: MODEL, prompt: 'seeded', max_tokens: 16, temperature: 1, seed: 1234 };
    const a = await client.completions.create(body);
    const stream = await client.completions.create({ ...body, stream: true });
    let b = '';
    for await (const chunk of stream) b += chunk.choices[0]?.text ?? '';
    expect(b).toBe(a.choices[0]!.text);
  });

  it('a client that disconnects mid-stream aborts the engine request: it ends as aborted, its blocks freed', async () => {
    const added = vi.spyOn(engine, 'addRequest');
    runner.delayMs = 2;
    try {
      // EOS ignored: with sampling at temperature 1 the request could otherwise end by itself (stop) before the
      // disconnect reaches the engine on a loaded machine.
      const stream = await client.completions.create({
        model: MODEL,
        prompt: 'long',
        max_tokens: 400,
        stream: true,
        ignore_eos: true,
      } as OpenAI.CompletionCreateParamsStreaming);
      let n = 0;
      for await (const _ of stream) if (++n === 3) break;
      const handle = added.mock.results.at(-1)!.value as RequestHandle;
      const result = await handle.result();
      expect(result.finishReason).toBe('abort');
      expect(result.tokenIds.length).toBeLessThan(400);
      await idle();
      expect(engine.stats()).toMatchObject({ running: 0, waiting: 0, usedBlocks: 0 });
    } finally {
      runner.delayMs = 0;
      added.mockRestore();
    }
  });

  it('a client that gives up on a request not streaming aborts the engine request too', async () => {
    const added = vi.spyOn(engine, 'addRequest');
    runner.delayMs = 2;
    try {
      const controller = new AbortController();
      const pending = client.completions.create(
        { model: MODEL, prompt: 'long', max_tokens: 400 },
        { signal: controller.signal },
      );
      // Give up once the request is running in the engine.
      for (let i = 0; i < 1000 && added.mock.results.length === 0; i++) await new Promise((r) => setTimeout(r, 2));
      controller.abort();
      await expect(pending).rejects.toThrow();
      const result = await (added.mock.results.at(-1)!.value as RequestHandle).result();
      expect(result.finishReason).toBe('abort');
      expect(result.tokenIds.length).toBeLessThan(400);
      await idle();
      expect(engine.stats().usedBlocks).toBe(0);
    } finally {
      runner.delayMs = 0;
      added.mockRestore();
    }
  });

  it('top_k 1 samples greedily; ignore_eos generates past EOS up to max_tokens', async () => {
    const prompt = 'top k';
    const greedy = referenceGreedy(tokenizer.encode(prompt), 8, BYTE_VOCAB_SIZE, [BYTE_EOS_ID]);
    const r = await client.completions.create({
      model: MODEL,
      prompt,
      max_tokens: 8,
      temperature: 1,
      top_k: 1,
    } as OpenAI.CompletionCreateParamsNonStreaming);
    expect(r.choices[0]!.text).toBe(tokenizer.decode(greedy));

    // A prompt whose greedy continuation hits EOS early.
    const MAX = 48;
    let ids: number[] = [];
    for (let i = 0; ; i++) {
      ids = tokenizer.encode(`eos ${i}`);
      if (referenceGreedy(ids, MAX, BYTE_VOCAB_SIZE, [BYTE_EOS_ID]).length < MAX) break;
    }
    const stopped = await client.completions.create({ model: MODEL, prompt: ids, max_tokens: MAX, temperature: 0 });
    expect(stopped.choices[0]!.finish_reason).toBe('stop');
    expect(stopped.usage!.completion_tokens).toBeLessThan(MAX);
    const past = await client.completions.create({
      model: MODEL,
      prompt: ids,
      max_tokens: MAX,
      temperature: 0,
      ignore_eos: true,
    } as OpenAI.CompletionCreateParamsNonStreaming);
    expect(past.choices[0]!.finish_reason).toBe('length');
    expect(past.usage!.completion_tokens).toBe(MAX);
    expect(past.choices[0]!.text).toBe(tokenizer.decode(referenceGreedy(ids, MAX, BYTE_VOCAB_SIZE, [])));
  });
});
