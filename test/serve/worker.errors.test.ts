import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BYTE_VOCAB_SIZE } from '../../lib/engine/model/tokenizer-bytes.js';
import type { GenerationChunk, SamplingParams } from '../../lib/frontend/backend.js';
import { defaultGraph, type DeploymentGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { prefillCounts } from '../helpers/serve.js';

// One bad request must never take a worker down. These requests go to the workers through the router (the
// deployment's backend), past every check the frontend makes, so that what is tested is the worker's own
// guard: whatever a request makes the engine throw comes back as that request's error (code and message),
// and the worker, with every other stream on it, goes on.
const KV_BLOCKS = 16; // 256 tokens of KV pool per worker (block size 16), far below dummy:tiny's context

function graph(mode: 'disagg' | 'agg'): DeploymentGraph {
  const g = defaultGraph({ gpus: 0, mode, port: 0 });
  // Every prompt is offered to the prefill worker: the decode worker allocates blocks first.
  g.disaggregation = { ...g.disaggregation, minRemotePrefillTokens: 1 };
  for (const p of g.pools) p.engine = { ...p.engine, numBlocks: KV_BLOCKS, threads: 1 };
  return g;
}

const quiet = () => {};
const GREEDY: SamplingParams = { temperature: 0, maxTokens: 4 };

/** Runs a request through the router; resolves with its chunks or rejects with the worker's error. */
async function generate(d: Deployment, promptIds: number[], sampling: SamplingParams = GREEDY) {
  const controller = new AbortController();
  const chunks: GenerationChunk[] = [];
  for await (const chunk of d.backend.generate({
    requestId: randomUUID(),
    promptIds,
    sampling,
    signal: controller.signal,
  }))
    chunks.push(chunk);
  return chunks;
}

const tokens = (chunks: GenerationChunk[]) => chunks.flatMap((c) => c.tokenIds).length;

describe('a request the engine refuses is answered as that request’s error; the worker keeps serving', () => {
  let disagg: Deployment;
  let agg: Deployment;

  beforeAll(async () => {
    [disagg, agg] = await Promise.all([
      startDeployment(graph('disagg'), { log: quiet, heartbeatMs: 200 }),
      startDeployment(graph('agg'), { log: quiet, heartbeatMs: 200 }),
    ]);
  }, 120_000);

  afterAll(async () => {
    await Promise.all([disagg?.stop({ drainMs: 500 }), agg?.stop({ drainMs: 500 })]);
  });

  it('decode worker: a token id outside the vocabulary, while another stream runs on it', async () => {
    const pids = disagg.pids();
    const running = generate(disagg, [1, 2, 3], { temperature: 0, maxTokens: 64 });
    await expect(generate(disagg, [BYTE_VOCAB_SIZE])).rejects.toMatchObject({
      code: 'TANDEM_BAD_ARGUMENT',
      message: expect.stringContaining(`${BYTE_VOCAB_SIZE} is not a token id`),
    });
    // The stream that was running on the same worker ran to its end.
    const other = await running;
    expect(tokens(other)).toBe(64);
    expect(other.at(-1)!.finishReason).toBe('length');
    expect(disagg.pids()).toEqual(pids);
    expect(tokens(await generate(disagg, [1, 2, 3]))).toBe(4);
  });

  it('decode worker: a prompt longer than its KV pool (allocateBlocks) is TANDEM_PROMPT_TOO_LONG', async () => {
    const pids = disagg.pids();
    const prompt = Array.from({ length: KV_BLOCKS * 16 + 1 }, (_, i) => i % 200);
    await expect(generate(disagg, prompt)).rejects.toMatchObject({ code: 'TANDEM_PROMPT_TOO_LONG' });
    expect(disagg.pids()).toEqual(pids);
    expect(tokens(await generate(disagg, [5, 6, 7]))).toBe(4);
  });

  it('prefill worker (prefillOnly) and decode worker (its local fallback): sampling the engine refuses', async () => {
    const pids = disagg.pids();
    const before = await prefillCounts(disagg);
    // The decode worker only allocates blocks for the prompt (valid) and asks the prefill worker, whose
    // prefillOnly refuses the sampling; the decode worker then prefills locally, and refuses it too.
    await expect(generate(disagg, [1, 2, 3, 4], { temperature: 0, topP: 7, maxTokens: 4 })).rejects.toMatchObject({
      code: 'TANDEM_BAD_ARGUMENT',
      message: expect.stringContaining('topP'),
    });
    expect((await prefillCounts(disagg)).local).toBe(before.local + 1);
    expect(disagg.pids()).toEqual(pids);
    expect(tokens(await generate(disagg, [9, 8, 7, 6]))).toBe(4);
  });

  it('aggregated worker: a token id outside the vocabulary and a prompt too long', async () => {
    const pids = agg.pids();
    await expect(generate(agg, [3, BYTE_VOCAB_SIZE + 5])).rejects.toMatchObject({ code: 'TANDEM_BAD_ARGUMENT' });
    await expect(generate(agg, new Array(KV_BLOCKS * 16 + 1).fill(1))).rejects.toMatchObject({
      code: 'TANDEM_PROMPT_TOO_LONG',
    });
    expect(agg.pids()).toEqual(pids);
    expect(tokens(await generate(agg, [1, 2, 3]))).toBe(4);
  });

  it('through the frontend: a prompt the worker cannot hold is a 400, and the worker stays up', async () => {
    const pids = disagg.pids();
    const r = await fetch(`${disagg.frontend.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      // Within the model's context (the frontend's check), beyond the worker's KV pool.
      body: JSON.stringify({ model: 'dummy:tiny', prompt: new Array(KV_BLOCKS * 16 + 8).fill(65), max_tokens: 1 }),
    });
    expect(r.status).toBe(400);
    const body = (await r.json()) as { error: { message: string } };
    expect(body.error.message).toMatch(/longer than the KV pool/);
    expect(disagg.pids()).toEqual(pids);
  });
});
