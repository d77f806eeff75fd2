import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { METRIC_NAMES } from '../../lib/frontend/metrics.js';
import { gpuGate } from '../helpers/gpu.js';
import { killBusyWorker, metric, openCompletionStream, streamCompletion, waitIdle } from '../helpers/serve.js';

// KV-aware routing and request migration on ONE GPU: two aggregated GPU workers share GPU 0 (a pool each, as a
// pool's replicas take distinct GPUs), the router's policy is kv. (a) A repeated long prompt lands on the worker
// whose prefix cache holds it, and is answered with usage.prompt_tokens_details.cached_tokens > 0. (b) The worker
// serving a long greedy stream is killed (SIGKILL on its pid) mid-stream; the official openai client's stream
// completes with exactly the tokens of an undisturbed run (the frontend migrates it to the other worker). The GPU
// twin of test/serve/router.test.ts's KV routing and test/serve/migration.e2e.test.ts. Loopback only; every wait
// is bounded; the deployment stops at the end.
const gate = await gpuGate(1);

/** The smallest preset the GPU engine runs (dummy:tiny: head dim 16, byte vocabulary: a token per character). */
const MODEL = 'dummy:tiny';
const BLOCK_SIZE = 16;
/**
 * dummy:tiny's KV is 2 layers x (K + V) x 2 KV heads x head dim 16 x 16 tokens x 2 bytes (bf16) = 4 KiB a block:
 * 2,048 blocks are 8 MiB a worker, room for every prompt and stream here (the longest is ~3,100 tokens, 194
 * blocks), with the weights a few MiB more; two workers' CUDA contexts cost more than their KV.
 */
const NUM_BLOCKS = 2048;
/** Long enough that the worker is still generating when it is killed (a few tokens in). */
const MAX_TOKENS = 3000;
const WAIT = { timeout: 30_000, interval: 10 };
const WORKERS = ['gpu-a-0', 'gpu-b-0'];

const GRAPH = `
model: ${MODEL}
mode: agg
frontend: { host: 127.0.0.1, port: 0, migrationLimit: 3 }
pools:
  - { name: gpu-a, role: aggregated, replicas: 1, device: cuda, gpuIds: [0], engine: { numBlocks: ${NUM_BLOCKS}, blockSize: ${BLOCK_SIZE} } }
  - { name: gpu-b, role: aggregated, replicas: 1, device: cuda, gpuIds: [0], engine: { numBlocks: ${NUM_BLOCKS}, blockSize: ${BLOCK_SIZE} } }
router: { policy: kv }
`;

/** A prompt of ~`sentences` x 40 characters (tokens), different per `seed`. */
const longPrompt = (seed: string, sentences: number) =>
  Array.from({ length: sentences }, (_, i) => `${seed} sentence ${i} of a long system prompt;`).join(' ');

/** Prompt tokens each worker has served so far, from /metrics. */
async function promptTokensByWorker(d: Deployment): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const w of WORKERS) out[w] = (await metric(d, `${METRIC_NAMES.workerPromptTokens}{worker="${w}"}`)) || 0;
  return out;
}

/** The worker whose served prompt tokens grew by exactly `promptTokens` between two readings. */
function servedBy(before: Record<string, number>, after: Record<string, number>, promptTokens: number): string[] {
  return WORKERS.filter((w) => after[w]! - before[w]! === promptTokens);
}

/** A long greedy completion of `prompt` (streamed: see openCompletionStream). */
const longGreedy = (prompt: string) => ({
  model: MODEL,
  prompt,
  max_tokens: MAX_TOKENS,
  temperature: 0,
  ignore_eos: true,
});

describe.skipIf(!gate.run)('KV-aware routing and request migration on one GPU (two workers share GPU 0)', () => {
  let d: Deployment;
  let client: OpenAI;
  const lines: string[] = [];

  const bothUp = () => Promise.all(WORKERS.map((w) => d.waitReady(w)));
  const idle = () => waitIdle(d, WAIT);

  beforeAll(async () => {
    const graph = parseGraph(GRAPH, '10.serve.router.gpu');
    expect(graph.pools.map((p) => [p.name, p.device, p.gpuIds])).toEqual([
      ['gpu-a', 'cuda', [0]],
      ['gpu-b', 'cuda', [0]],
    ]);
    expect(graph.router.policy).toBe('kv');
    d = await startDeployment(graph, { log: (l) => lines.push(l), heartbeatMs: 20 });
    await bothUp();
    client = new OpenAI({ baseURL: `${d.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 120_000 });
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 1000 });
  });

  it('kv: a repeated long prompt lands on the worker that holds it, with cached_tokens > 0', async () => {
    const p1 = longPrompt('alpha', 15); // ~600 tokens
    const p2 = longPrompt('bravo', 18); // ~700 tokens: prompt lengths tell the workers' counts apart
    // p1 runs (a long stream, in flight) while p2 comes: p2 goes to the other worker, whose cost has no load.
    let before = await promptTokensByWorker(d);
    const held = await openCompletionStream(client, longGreedy(p1));
    const iterator = held[Symbol.asyncIterator]();
    expect((await iterator.next()).done).toBe(false); // p1 is routed and generating
    const second = await client.completions.create({ model: MODEL, prompt: p2, max_tokens: 8, temperature: 0 });
    expect(second.usage!.prompt_tokens_details).toEqual({ cached_tokens: 0 });
    held.controller.abort(); // the client leaves: p1's worker stops it (its prompt blocks stay cached)
    await iterator.return?.().catch(() => {}); // an aborted read may reject: the abort is what was wanted
    await idle();
    let after = await promptTokensByWorker(d);
    const [p2Worker, ...more] = servedBy(before, after, second.usage!.prompt_tokens);
    expect(more).toEqual([]);
    expect(p2Worker).toBeDefined();
    const p1Worker = WORKERS.find((w) => w !== p2Worker)!;
    expect(after[p1Worker]! - before[p1Worker]!).toBeGreaterThan(500); // p1 was served there

    for (const [prompt, worker] of [
      [p1, p1Worker],
      [p2, p2Worker],
      [p1, p1Worker],
    ] as const) {
      before = await promptTokensByWorker(d);
      const cachedBefore = (await metric(d, `${METRIC_NAMES.workerCachedPromptTokens}{worker="${worker}"}`)) || 0;
      const again = await client.completions.create({ model: MODEL, prompt, max_tokens: 8, temperature: 0 });
      after = await promptTokensByWorker(d);
      expect(servedBy(before, after, again.usage!.prompt_tokens), prompt.slice(0, 5)).toEqual([worker]);
      const cached = again.usage!.prompt_tokens_details!.cached_tokens!;
      expect(cached).toBeGreaterThan(0);
      // Every full block but the one holding the prompt's last token (the engine computes at least one).
      expect(cached).toBe(Math.floor((again.usage!.prompt_tokens - 1) / BLOCK_SIZE) * BLOCK_SIZE);
      expect(await metric(d, `${METRIC_NAMES.workerCachedPromptTokens}{worker="${worker}"}`)).toBe(
        cachedBefore + cached,
      );
    }
  });

  it('migration: SIGKILL on the worker serving a long greedy stream; the stream completes with exactly the tokens of an undisturbed run', async () => {
    await bothUp();
    const prompt = longPrompt('migration', 4);
    const undisturbed = await streamCompletion(client, longGreedy(prompt));
    expect(undisturbed.error).toBeUndefined();
    expect(undisturbed.completionTokens).toBe(MAX_TOKENS);
    expect(undisturbed.finishReason).toBe('length');
    const migratedBefore = await metric(d, `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`);
    await idle();
    let killed = '';
    const migrated = await streamCompletion(client, longGreedy(prompt), async () => {
      killed = await killBusyWorker(d, WAIT);
    });
    expect(migrated.error).toBeUndefined();
    // Where they part, if they do (bf16 numerics of a re-prefill against token-by-token decode).
    let at = 0;
    while (at < undisturbed.text.length && undisturbed.text[at] === migrated.text[at]) at++;
    expect(at, `first difference at character ${at} of ${undisturbed.text.length}`).toBe(undisturbed.text.length);
    expect(migrated.text).toBe(undisturbed.text);
    expect(migrated.completionTokens).toBe(undisturbed.completionTokens);
    expect(migrated.promptTokens).toBe(undisturbed.promptTokens);
    expect(migrated.finishReason).toBe('length');
    expect(await metric(d, `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`)).toBe(migratedBefore + 1);
    expect(lines.some((l) => l.includes(`worker ${killed} stopped`) && l.includes('migrated with'))).toBe(true);
    console.log(`[figure] 1-GPU migration: ${killed} killed mid-stream, ${MAX_TOKENS} greedy tokens identical`);
    await bothUp(); // the killed worker restarts (the launcher's backoff) before the deployment stops
  });
});
