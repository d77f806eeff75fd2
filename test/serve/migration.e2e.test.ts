import { randomUUID } from 'node:crypto';
import OpenAI, { APIError } from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { defaultGraph, type DeploymentGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { METRIC_NAMES } from '../../lib/frontend/metrics.js';
import { WorkerRequestError } from '../../lib/router/router.js';
import { busyWorker, killBusyWorker, metric, streamCompletion, waitIdle } from '../helpers/serve.js';

// Request migration end to end on CPU: a decode worker killed with SIGKILL (on its pid) mid-stream, and the
// official openai client's stream completes with exactly the text and token count of an undisturbed run, greedy
// and seeded, with penalties. With the limit used up, or migration off, the stream ends with an error event as
// before. Loopback only; every wait is bounded; the deployments stop at the end.
const MODEL = 'dummy:tiny';
/** Long enough that the worker is still generating when it is killed (it is killed after a few tokens). */
const MAX_TOKENS = 3000;
const WAIT = { timeout: 20_000, interval: 10 };

function graph(mode: 'disagg' | 'agg', migrationLimit: number): DeploymentGraph {
  const g = defaultGraph({ gpus: 0, mode, port: 0 });
  g.frontend.migrationLimit = migrationLimit;
  const serving = g.pools.find((p) => p.role !== 'prefill')!;
  serving.replicas = 2;
  // Prompts go to the prefill worker; the migrated attempt prefills prompt and output on its decode worker.
  g.disaggregation = { ...g.disaggregation, minRemotePrefillTokens: 1 };
  for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 512, threads: 1 };
  return g;
}

const PROMPT = 'Request migration keeps the stream going when a decode worker dies';

/** Streams PROMPT with `params` over the defaults (see streamCompletion). */
const stream = (client: OpenAI, params: Record<string, unknown>, onFirstChunk?: () => Promise<void>) =>
  streamCompletion(client, { model: MODEL, prompt: PROMPT, max_tokens: MAX_TOKENS, ...params }, onFirstChunk);

const migrations = (d: Deployment, outcome: string) =>
  metric(d, `${METRIC_NAMES.requestMigrations}{outcome="${outcome}"}`);

describe('request migration end to end (CPU, SIGKILL)', () => {
  let d: Deployment;
  let off: Deployment;
  let client: OpenAI;
  const lines: string[] = [];

  beforeAll(async () => {
    [d, off] = await Promise.all([
      startDeployment(graph('disagg', 1), { log: (l) => lines.push(l), heartbeatMs: 20 }),
      startDeployment(graph('agg', 0), { log: () => {}, heartbeatMs: 20 }),
    ]);
    client = new OpenAI({ baseURL: `${d.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
  }, 120_000);

  afterAll(async () => {
    await Promise.all([d?.stop({ drainMs: 500 }), off?.stop({ drainMs: 500 })]);
  });

  /** Waits until every worker is registered (a killed one restarts after its backoff). */
  const bothUp = (dep: Deployment) =>
    Promise.all(
      dep.graph.pools.flatMap((p) => Array.from({ length: p.replicas }, (_, i) => dep.waitReady(`${p.name}-${i}`))),
    );

  for (const [name, params] of [
    ['greedy', { temperature: 0 }],
    ['seeded, EOS ignored', { temperature: 0.9, top_p: 0.95, seed: 1234, ignore_eos: true }],
    // min_tokens counts the output streamed before the death: EOS ends the request at the same token.
    ['seeded, min_tokens', { temperature: 1, seed: 77, min_tokens: 2000 }],
    // Penalties count the output streamed before the death as output.
    [
      'greedy, penalties',
      { temperature: 0, presence_penalty: 0.8, frequency_penalty: 0.05, repetition_penalty: 1.2, ignore_eos: true },
    ],
  ] as const)
    it(`${name}: the stream completes with exactly the tokens of an undisturbed run`, async () => {
      await bothUp(d);
      const undisturbed = await stream(client, params);
      // Long enough that the kill, a few tokens in, lands mid-stream (the migration counter below says it did).
      expect(undisturbed.completionTokens).toBeGreaterThanOrEqual(2000);
      if (name !== 'seeded, min_tokens') expect(undisturbed.finishReason).toBe('length');
      const before = await migrations(d, 'migrated');
      await waitIdle(d, WAIT);
      let killed = '';
      const migrated = await stream(client, params, async () => {
        killed = await killBusyWorker(d, WAIT);
      });
      expect(migrated.error).toBeUndefined();
      expect(migrated.text).toBe(undisturbed.text);
      expect(migrated.completionTokens).toBe(undisturbed.completionTokens);
      expect(migrated.promptTokens).toBe(undisturbed.promptTokens);
      expect(migrated.finishReason).toBe(undisturbed.finishReason);
      expect(await migrations(d, 'migrated')).toBe(before + 1);
      expect(lines.some((l) => l.includes(`worker ${killed} stopped`) && l.includes('migrated with'))).toBe(true);
    });

  it("resume on the worker protocol: continues a request; one the engine refuses is that request's error", async () => {
    await bothUp(d);
    const backendRun = async (resume?: { outputTokenIds: number[] }, promptIds = [72, 105, 33]) => {
      const tokens: number[] = [];
      for await (const c of d.backend.generate({
        requestId: randomUUID(),
        promptIds,
        sampling: { temperature: 0.5, seed: 21, maxTokens: 40, stopTokenIds: [] },
        ...(resume ? { resume } : {}),
        signal: new AbortController().signal,
      }))
        tokens.push(...c.tokenIds);
      return tokens;
    };
    const whole = await backendRun();
    expect(await backendRun({ outputTokenIds: whole.slice(0, 15) })).toEqual(whole.slice(15));
    for (const outputTokenIds of [[1_000_000], whole]) {
      const error = await backendRun({ outputTokenIds }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(WorkerRequestError);
      expect(error).toMatchObject({ code: 'TANDEM_BAD_ARGUMENT', message: expect.stringMatching(/resume/) });
    }
    expect(await backendRun()).toEqual(whole);
  });

  it('the limit used up: the stream ends with an error event, counted', async () => {
    await bothUp(d);
    await waitIdle(d, WAIT);
    const before = await migrations(d, 'limit_reached');
    const out = await stream(client, { temperature: 0 }, async () => {
      // The first death migrates (limit 1); the worker it moved to dies too before the first restarts.
      const first = await killBusyWorker(d, WAIT);
      await vi.waitFor(async () => {
        const busy = await busyWorker(d, WAIT);
        expect(busy).not.toBe(first);
      }, WAIT);
      await killBusyWorker(d, WAIT);
    });
    expect(out.error).toBeInstanceOf(APIError);
    expect(out.error!.message).toMatch(/stopped .*migration limit 1 reached/);
    expect(out.completionTokens).toBeUndefined();
    expect(await migrations(d, 'limit_reached')).toBe(before + 1);
  });

  it('migrationLimit 0: the stream ends with an error event, as without migration', async () => {
    const c = new OpenAI({ baseURL: `${off.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
    const out = await stream(c, { temperature: 0 }, async () => {
      await killBusyWorker(off, WAIT);
    });
    expect(out.error).toBeInstanceOf(APIError);
    expect(out.error!.message).toMatch(/stopped .*migration limit 0 reached/);
    expect(out.finishReason).toBeUndefined();
    expect(await migrations(off, 'migrated')).toBe(0);
    expect(await migrations(off, 'limit_reached')).toBe(1);
  });
});
