import { randomUUID } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import type { GenerationChunk, SamplingParams } from '../../lib/frontend/backend.js';
import { EmbeddedControlPlane } from '../../lib/control/control-plane.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import type { ToWorker } from '../../lib/worker/protocol.js';
import { Router } from '../../lib/router/router.js';
import { LoadEstimate, type RouterPolicyName } from '../../lib/router/index.js';
import { workerRegistration } from '../helpers/fake-worker.js';

// Several frontends' routers share one load estimate (lib/router/load-estimate.ts): a burst that arrives through
// two frontends at once is spread over the workers, where two routers that each count only their own requests
// both find the same worker idle. First the routers alone (an embedded control plane, workers as names), then a
// launcher's two frontends over two CPU workers. Loopback only; every wait is bounded.

const SAMPLING: SamplingParams = { temperature: 0, maxTokens: 8 };
const WORKERS = ['w0', 'w1', 'w2', 'w3'];

/** Two routers (two frontends) over one control plane with four idle workers; `shared`: one load estimate. */
function twoRouters(policy: RouterPolicyName, shared: boolean) {
  const controlPlane = new EmbeddedControlPlane(3_600_000);
  for (const w of WORKERS) {
    controlPlane.register(workerRegistration(w));
    controlPlane.heartbeat(w, { running: 0, waiting: 0, freeBlocks: 64, prefilling: 0 });
  }
  const load = shared ? new LoadEstimate() : undefined;
  const sent: { router: number; to: string; message: ToWorker }[] = [];
  const routers = [0, 1].map(
    (i) =>
      new Router(
        controlPlane,
        (to, message) => {
          sent.push({ router: i, to, message });
          return true;
        },
        'agg',
        undefined,
        { routing: { policy }, ...(load ? { load } : {}) },
      ),
  );
  /** Starts a request on router `i`: the worker it went to, and its chunks. */
  const start = (i: number, promptIds: number[]) => {
    const requestId = randomUUID();
    const chunks = routers[i]!.generate({
      requestId,
      promptIds,
      sampling: SAMPLING,
      signal: new AbortController().signal,
    })[Symbol.asyncIterator]();
    const to = sent.filter((s) => s.message.type === 'generate').at(-1)!.to;
    return { requestId, to, chunks };
  };
  return { controlPlane, routers, start, load };
}

const prompt = (seed: number) => Array.from({ length: 40 }, (_, i) => (seed * 1000 + i) % 256);

let close: (() => void) | undefined;
afterEach(() => close?.());

describe('two routers sharing one load estimate', () => {
  for (const policy of ['kv', 'least-load'] as const)
    it(`${policy}: a burst of four requests through two frontends lands on four workers, not two`, () => {
      const alone = twoRouters(policy, false);
      // Each router alone finds w0, then w1 idle: both pile onto the same two workers.
      const piled = [0, 1, 0, 1].map((i, k) => alone.start(i, prompt(k)).to);
      expect(new Set(piled).size).toBe(2);
      alone.controlPlane.close();

      const { controlPlane, start } = twoRouters(policy, true);
      close = () => controlPlane.close();
      const spread = [0, 1, 0, 1].map((i, k) => start(i, prompt(k)).to);
      expect([...spread].sort()).toEqual(WORKERS);
    });

  it('a request releases what it added, also through the other router, and a worker that comes back starts afresh', async () => {
    const { controlPlane, routers, start, load } = twoRouters('kv', true);
    close = () => controlPlane.close();
    const a = start(0, prompt(1));
    const b = start(1, prompt(2));
    expect(load!.peek(a.to)).toEqual({ inflight: 1, queuedPrefillBlocks: 3, decodeBlocks: 3 });
    // a's first token: its prefill is no longer queued; its end: nothing of it is left.
    routers[0]!.onMessage(a.to, { type: 'tokens', requestId: a.requestId, tokenIds: [7], finishReason: null });
    expect(load!.peek(a.to)).toEqual({ inflight: 1, queuedPrefillBlocks: 0, decodeBlocks: 3 });
    routers[0]!.onMessage(a.to, { type: 'tokens', requestId: a.requestId, tokenIds: [], finishReason: 'stop' });
    const drain = async (chunks: AsyncIterator<GenerationChunk>) => {
      while (!(await chunks.next()).done);
    };
    await drain(a.chunks);
    expect(load!.peek(a.to)).toEqual({ inflight: 0, queuedPrefillBlocks: 0, decodeBlocks: 0 });
    // b's worker leaves (every router forgets it) and registers again: b's end does not touch the new entry.
    controlPlane.remove(b.to, 'test');
    controlPlane.register(workerRegistration(b.to));
    controlPlane.heartbeat(b.to, { running: 0, waiting: 0, freeBlocks: 64, prefilling: 0 });
    expect(load!.peek(b.to)).toBeUndefined();
    const again = [0, 1, 0, 1].map((r, k) => start(r, prompt(10 + k)).to);
    expect([...again].sort()).toEqual(WORKERS);
    await expect(drain(b.chunks)).rejects.toThrow(/stopped/);
    // b ended after its worker came back: the new entry keeps exactly the one request routed there since.
    expect(load!.peek(b.to)).toEqual({ inflight: 1, queuedPrefillBlocks: 3, decodeBlocks: 3 });
  });
});

describe("a launcher's two frontends share their routers' load estimate (CPU)", () => {
  let d: Deployment;

  beforeAll(async () => {
    const g = defaultGraph({ gpus: 0, mode: 'agg', port: 0 });
    g.frontend.replicas = 2;
    const serving = g.pools[0]!;
    serving.replicas = 2;
    serving.engine = { ...serving.engine, numBlocks: 512, threads: 1 };
    d = await startDeployment(g, { log: () => {}, heartbeatMs: 20 });
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 500 });
  });

  it('two requests sent at once through the two frontends run on the two workers', async () => {
    const controllers = [new AbortController(), new AbortController()];
    // In one turn of the event loop: no heartbeat can tell the second router about the first request.
    const streams = d.backends.map((backend, i) =>
      backend
        .generate({
          requestId: randomUUID(),
          promptIds: prompt(i),
          sampling: { temperature: 0, maxTokens: 4000, stopTokenIds: [] },
          signal: controllers[i]!.signal,
        })
        [Symbol.asyncIterator](),
    );
    const firsts = await Promise.all(streams.map((s) => s.next()));
    expect(firsts.every((f) => !f.done)).toBe(true);
    await vi.waitFor(
      () => {
        const running = d.controlPlane.workers().map((w) => w.load.running);
        expect(running).toEqual([1, 1]);
      },
      { timeout: 20_000, interval: 10 },
    );
    for (const c of controllers) c.abort();
    await Promise.all(streams.map((s) => s.return?.()));
  });
});
