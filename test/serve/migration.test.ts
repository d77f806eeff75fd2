import { afterEach, describe, expect, it } from 'vitest';
import { EngineRequestError } from '../../lib/errors.js';
import type { SamplingParams } from '../../lib/engine/engine.js';
import { LlmEngine } from '../../lib/engine/llm-engine.js';
import {
  NoWorkerAvailableError,
  type GenerationBackend,
  type GenerationChunk,
  type GenerationRequest,
} from '../../lib/frontend/backend.js';
import { engineBackend } from '../../lib/frontend/engine-backend.js';
import { METRIC_NAMES, ServeMetrics } from '../../lib/frontend/metrics.js';
import { DEFAULT_MIGRATION_LIMIT, MigratingBackend, WORKER_GONE } from '../../lib/frontend/migration.js';
import { WorkerRequestError } from '../../lib/router/router.js';
import { FakeRunner } from '../helpers/fake-runner.js';
import { sample } from '../helpers/serve.js';

// The migration layer over real engines (one per "worker"): a worker that dies after some chunks fails its
// stream as the router does (TANDEM_WORKER_GONE); the layer re-issues the request with the output so far and
// the consumer sees exactly the undisturbed run's tokens. The end-to-end test with processes killed by SIGKILL
// is migration.e2e.test.ts.
const V = 64;
const engines: LlmEngine[] = [];
afterEach(async () => {
  await Promise.all(engines.splice(0).map((e) => e.dispose()));
});

/**
 * Workers as a backend: each request goes to the next worker alive; worker i dies after `dieAfter[i]` chunks of
 * the request it serves (undefined: never). `refuse` makes the next generate throw NoWorkerAvailableError.
 */
class Workers implements GenerationBackend {
  readonly seen: GenerationRequest[] = [];
  private next = 0;
  refuseAfter = Infinity;
  constructor(
    private readonly backends: GenerationBackend[],
    private readonly dieAfter: (number | undefined)[],
  ) {}
  available() {
    return true;
  }
  generate(request: GenerationRequest): AsyncIterable<GenerationChunk> {
    if (this.seen.length >= this.refuseAfter) throw new NoWorkerAvailableError();
    this.seen.push(request);
    const i = this.next++ % this.backends.length;
    const inner = this.backends[i]!.generate(request);
    const limit = this.dieAfter[i];
    return (async function* () {
      let n = 0;
      for await (const chunk of inner) {
        if (limit !== undefined && n++ === limit)
          throw new WorkerRequestError(WORKER_GONE, `worker ${i} stopped (process exited (SIGKILL))`);
        yield chunk;
      }
    })();
  }
}

function engines2(n: number): GenerationBackend[] {
  return Array.from({ length: n }, () => {
    const e = new LlmEngine(new FakeRunner({ vocabSize: V }));
    engines.push(e);
    return engineBackend(e);
  });
}

const PROMPT = [3, 14, 15, 9, 26, 5, 35];

async function collect(backend: GenerationBackend, sampling: SamplingParams, requestId = 'req') {
  const tokens: number[] = [];
  const finishes: (string | null | undefined)[] = [];
  const logprobs: number[] = [];
  for await (const chunk of backend.generate({
    requestId,
    promptIds: PROMPT,
    sampling,
    signal: new AbortController().signal,
  })) {
    tokens.push(...chunk.tokenIds);
    for (const lp of chunk.logprobs ?? []) logprobs.push(lp.logprob);
    if (chunk.finishReason !== null && chunk.finishReason !== undefined) finishes.push(chunk.finishReason);
  }
  return { tokens, finishes, logprobs };
}

describe('MigratingBackend', () => {
  const cases: [string, SamplingParams][] = [
    ['greedy', { temperature: 0, maxTokens: 30 }],
    ['seeded', { temperature: 1.1, topP: 0.95, seed: 42, maxTokens: 30, logprobs: 2 }],
    ['seeded with min tokens and a stop token', { temperature: 0.7, seed: 5, maxTokens: 30, minTokens: 12 }],
  ];
  for (const [name, sampling] of cases)
    it(`${name}: a worker that dies mid-stream, twice, changes nothing the client sees`, async () => {
      const reference = await collect(new Workers(engines2(1), [undefined]), sampling);
      const stopTokenIds = name.includes('stop') ? [reference.tokens[14]!] : undefined;
      const s = stopTokenIds ? { ...sampling, stopTokenIds } : sampling;
      const undisturbed = await collect(new Workers(engines2(1), [undefined]), s);
      const metrics = new ServeMetrics();
      const lines: string[] = [];
      const workers = new Workers(engines2(3), [4, 7, undefined]);
      const migrating = new MigratingBackend(workers, { metrics, log: (l) => lines.push(l) });
      const got = await collect(migrating, s);
      expect(got).toEqual(undisturbed);
      expect(got.finishes).toHaveLength(1);
      // Three attempts: the second resumed after 4 tokens, the third after 4 + 7, each under an id of its own.
      expect(workers.seen.map((r) => r.requestId)).toEqual(['req', 'req#m1', 'req#m2']);
      expect(workers.seen.map((r) => r.resume?.outputTokenIds)).toEqual([
        undefined,
        undisturbed.tokens.slice(0, 4),
        undisturbed.tokens.slice(0, 11),
      ]);
      expect(workers.seen.every((r) => r.promptIds === PROMPT)).toBe(true);
      const text = await metrics.text();
      expect(sample(text, `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`)).toBe(2);
      expect(lines).toEqual([
        'request req: worker 0 stopped (process exited (SIGKILL)); migrated with 4 tokens streamed (migration 1 of 3)',
        'request req: worker 1 stopped (process exited (SIGKILL)); migrated with 11 tokens streamed (migration 2 of 3)',
      ]);
    });

  it('a worker that dies before the first token: re-issued as it was (no resume)', async () => {
    const workers = new Workers(engines2(2), [0, undefined]);
    const sampling = { temperature: 0, maxTokens: 10 };
    const got = await collect(new MigratingBackend(workers), sampling);
    expect(got).toEqual(await collect(new Workers(engines2(1), [undefined]), sampling));
    expect(workers.seen[1]!.resume).toBeUndefined();
  });

  it('limit 0, or the limit used up: the error of the dead worker, the tokens before it streamed', async () => {
    for (const limit of [0, 2]) {
      const metrics = new ServeMetrics();
      const workers = new Workers(engines2(4), [3, 3, 3, 3]);
      const tokens: number[] = [];
      const run = async () => {
        for await (const c of new MigratingBackend(workers, { limit, metrics }).generate({
          requestId: 'r',
          promptIds: PROMPT,
          sampling: { temperature: 0, maxTokens: 40 },
          signal: new AbortController().signal,
        }))
          tokens.push(...c.tokenIds);
      };
      const error = await run().catch((e: unknown) => e);
      expect(error).toBeInstanceOf(WorkerRequestError);
      expect(error).toMatchObject({ code: WORKER_GONE, message: expect.stringContaining(`migration limit ${limit}`) });
      expect(workers.seen).toHaveLength(limit + 1);
      expect(tokens).toHaveLength(3 * (limit + 1));
      const text = await metrics.text();
      expect(sample(text, `${METRIC_NAMES.requestMigrations}{outcome="limit_reached"}`)).toBe(1);
      expect(sample(text, `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`)).toBe(limit);
    }
  });

  it('no worker left to take it: the error, counted as no_worker', async () => {
    const metrics = new ServeMetrics();
    const workers = new Workers(engines2(1), [2]);
    workers.refuseAfter = 1;
    const error = await collect(new MigratingBackend(workers, { metrics }), { temperature: 0 }).catch((e) => e);
    expect(error).toMatchObject({ code: WORKER_GONE, message: expect.stringContaining('no worker left') });
    expect(sample(await metrics.text(), `${METRIC_NAMES.requestMigrations}{outcome="no_worker"}`)).toBe(1);
  });

  it('other failures are not migrated; a request with nothing to serve it fails at once, as the router does', async () => {
    const failing: GenerationBackend = {
      available: () => true,
      // eslint-disable-next-line require-yield
      async *generate() {
        throw new EngineRequestError('request r failed: boom', 'r');
      },
    };
    const metrics = new ServeMetrics();
    await expect(collect(new MigratingBackend(failing, { metrics }), {})).rejects.toThrow('boom');
    expect(sample(await metrics.text(), `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`)).toBe(0);
    const none: GenerationBackend = {
      available: () => false,
      generate: () => {
        throw new NoWorkerAvailableError();
      },
    };
    const m = new MigratingBackend(none);
    expect(m.available()).toBe(false);
    expect(() =>
      m.generate({ requestId: 'x', promptIds: PROMPT, sampling: {}, signal: new AbortController().signal }),
    ).toThrow(NoWorkerAvailableError);
  });

  it('a request whose client left is not migrated', async () => {
    const workers = new Workers(engines2(2), [2, undefined]);
    const controller = new AbortController();
    const chunks: number[] = [];
    const run = async () => {
      for await (const c of new MigratingBackend(workers).generate({
        requestId: 'a',
        promptIds: PROMPT,
        sampling: { temperature: 0, maxTokens: 20 },
        signal: controller.signal,
      })) {
        chunks.push(...c.tokenIds);
        if (chunks.length === 2) controller.abort();
      }
    };
    await expect(run()).rejects.toMatchObject({ code: WORKER_GONE });
    expect(workers.seen).toHaveLength(1);
  });

  it('the limit is checked', () => {
    const b = engines2(1)[0]!;
    expect(new MigratingBackend(b).limit).toBe(DEFAULT_MIGRATION_LIMIT);
    for (const limit of [-1, 1.5, NaN]) expect(() => new MigratingBackend(b, { limit })).toThrow(TypeError);
  });
});
