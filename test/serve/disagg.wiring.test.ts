import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { GenerationChunk } from '../../lib/frontend/backend.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { metric, prefillCounts } from '../helpers/serve.js';

// The remote-prefill decision sees what it is meant to see: the prompt tokens the decode worker does not hold
// in its prefix cache (allocateBlocks' cachedTokens), and the prefill pool's real queue (the router's requests
// in flight there). Read through the prefill counters, the prefill queue gauge and the KV bytes moved.
const BLOCK = 16;
const MIN_REMOTE = 4 * BLOCK;
const WAIT = { timeout: 20_000, interval: 20 };

/** A prompt of `n` token ids unique to `tag` (byte-level vocabulary of dummy:tiny: ids below 256). */
const prompt = (tag: number, n: number) => Array.from({ length: n }, (_, i) => (tag * 31 + i * 7) % 251);

/** `p`, or a rejection naming `what` once `ms` have passed (a bound, so that a stuck request fails the test). */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

async function run(d: Deployment, promptIds: number[]): Promise<GenerationChunk[]> {
  const chunks: GenerationChunk[] = [];
  const signal = new AbortController().signal;
  for await (const c of d.backend.generate({
    requestId: randomUUID(),
    promptIds,
    sampling: { temperature: 0, maxTokens: 4 },
    signal,
  }))
    chunks.push(c);
  return chunks;
}

describe('the remote-prefill decision, wired (CPU)', () => {
  let d: Deployment;

  beforeAll(async () => {
    const g = defaultGraph({ gpus: 0, mode: 'disagg', port: 0 });
    g.disaggregation = { minRemotePrefillTokens: MIN_REMOTE, maxPrefillQueue: 1 };
    for (const p of g.pools) p.engine = { ...p.engine, blockSize: BLOCK, numBlocks: 256, threads: 1 };
    // Heartbeats far apart: a prefill worker stopped by the test stays registered for 10 s.
    d = await startDeployment(g, { log: () => {}, heartbeatMs: 2000 });
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 500 });
  });

  /** Waits until the counters moved by `remote` and `local` since `before`, and checks they moved by no more. */
  async function expectPrefills(before: { remote: number; local: number }, remote: number, local: number) {
    await vi.waitFor(async () => {
      const now = await prefillCounts(d);
      expect(now.remote - before.remote + now.local - before.local).toBe(remote + local);
    }, WAIT);
    const now = await prefillCounts(d);
    expect({ remote: now.remote - before.remote, local: now.local - before.local }).toEqual({ remote, local });
  }

  it("the decode worker's cached prefix counts: a repeated long prompt is prefilled locally", async () => {
    const long = prompt(1, 10 * BLOCK);
    let before = await prefillCounts(d);
    let bytes = await metric(d, 'tandem_kv_transfer_bytes_total');
    await run(d, long);
    await expectPrefills(before, 1, 0);
    const firstBytes = (await metric(d, 'tandem_kv_transfer_bytes_total')) - bytes;
    expect(firstBytes).toBeGreaterThan(0);

    // The same prompt again: its 10 blocks are in the decode worker's prefix cache, nothing is left to compute
    // there, so it is prefilled locally (were the whole prompt counted, it would go remote).
    before = await prefillCounts(d);
    await run(d, long);
    await expectPrefills(before, 0, 1);

    // The prompt and 7 new blocks of tokens: remote again, and only the 7 blocks the decode worker lacks move.
    before = await prefillCounts(d);
    bytes = await metric(d, 'tandem_kv_transfer_bytes_total');
    await run(d, [...long, ...prompt(2, 7 * BLOCK)]);
    await expectPrefills(before, 1, 0);
    expect((await metric(d, 'tandem_kv_transfer_bytes_total')) - bytes).toBe((firstBytes / 10) * 7);
  });

  it('a full prefill queue counts: with maxPrefillQueue requests waiting there, the next prefills locally', async () => {
    const prefillPid = d.pids()['prefill-0']!;
    const before = await prefillCounts(d);
    expect(await metric(d, 'tandem_prefill_queue_depth')).toBe(0);
    process.kill(prefillPid, 'SIGSTOP'); // it takes the prefill request and does not answer yet
    try {
      const queued = run(d, prompt(3, 8 * BLOCK));
      await vi.waitFor(async () => expect(await metric(d, 'tandem_prefill_queue_depth')).toBe(1), WAIT);
      // The pool is full (1 waiting, maxPrefillQueue 1): this one is prefilled by the decode worker at once.
      const local = await within(run(d, prompt(4, 8 * BLOCK)), WAIT.timeout, 'the request after the full queue');
      expect(local.flatMap((c) => c.tokenIds)).toHaveLength(4);
      expect(await metric(d, 'tandem_prefill_queue_depth')).toBe(1);
      process.kill(prefillPid, 'SIGCONT');
      expect((await queued).flatMap((c) => c.tokenIds)).toHaveLength(4);
      await expectPrefills(before, 1, 1);
      expect(await metric(d, 'tandem_prefill_queue_depth')).toBe(0);
    } finally {
      process.kill(prefillPid, 'SIGCONT');
    }
  });
});
