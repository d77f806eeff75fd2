import { afterEach, describe, expect, it } from 'vitest';
import type { GenerationChunk, SamplingParams } from '../../lib/frontend/backend.js';
import { NoWorkerAvailableError } from '../../lib/frontend/backend.js';
import { EmbeddedControlPlane } from '../../lib/control/control-plane.js';
import type { DisaggregationThresholds } from '../../lib/router/disagg.js';
import type { PoolRole, ServingMode } from '../../lib/deploy/graph.js';
import { METRIC_NAMES, ServeMetrics } from '../../lib/frontend/metrics.js';
import type { FromWorker, ToWorker, WorkerLoad } from '../../lib/worker/protocol.js';
import { Router, WorkerRequestError } from '../../lib/router/router.js';
import { kvBlockHashLanes } from '../../lib/kv/index.js';
import { KV_EVENTS_MISSING_AFTER } from '../../lib/router/index.js';
import { workerRegistration } from '../helpers/fake-worker.js';
import { sample } from '../helpers/serve.js';

// The router alone, in this process: an embedded control plane with registered workers that exist only as names,
// a `send` that records what the router tells each worker (and can find a worker unreachable), and the messages
// workers would answer with, fed to onMessage. What a caller sees: the iteration of each request, the messages
// the workers get, and the metrics.

const SAMPLING: SamplingParams = { temperature: 0, maxTokens: 8 };

type Generate = Extract<ToWorker, { type: 'generate' }>;

class Harness {
  readonly controlPlane = new EmbeddedControlPlane(3_600_000);
  readonly metrics: ServeMetrics | undefined;
  readonly sent: { to: string; message: ToWorker }[] = [];
  /** Workers whose `send` fails (their channel is closed). */
  readonly unreachable = new Set<string>();
  readonly router: Router;
  private next = 0;

  /** `thresholds` null: the defaults; else every prompt pays for a remote prefill (minRemotePrefillTokens 1). */
  constructor(
    mode: ServingMode = 'disagg',
    {
      withMetrics = true,
      thresholds = { minRemotePrefillTokens: 1, maxPrefillQueue: 2 } as DisaggregationThresholds | null,
    } = {},
  ) {
    this.metrics = withMetrics ? new ServeMetrics() : undefined;
    this.router = new Router(
      this.controlPlane,
      (to, message) => {
        if (this.unreachable.has(to)) return false;
        this.sent.push({ to, message });
        return true;
      },
      mode,
      this.metrics,
      thresholds ? { thresholds } : {},
    );
  }

  add(name: string, role: PoolRole, load: Partial<WorkerLoad> = {}): void {
    this.controlPlane.register(workerRegistration(name, role));
    this.load(name, load);
  }

  load(name: string, load: Partial<WorkerLoad>): void {
    this.controlPlane.heartbeat(name, { running: 0, waiting: 0, freeBlocks: 64, prefilling: 0, ...load });
  }

  /** Starts a request; its iterator, the generate message its worker got, and its abort controller. */
  start(promptIds: number[] = [1, 2, 3]) {
    const requestId = `r${this.next++}`;
    const controller = new AbortController();
    const before = this.sent.length;
    const chunks = this.router
      .generate({ requestId, promptIds, sampling: SAMPLING, signal: controller.signal })
      [Symbol.asyncIterator]();
    const sent = this.sent.slice(before).find((s) => s.message.type === 'generate');
    if (!sent) throw new Error('no generate message was sent');
    return { requestId, chunks, controller, worker: sent.to, generate: sent.message as Generate };
  }

  /** The worker name each of `n` new requests goes to (the requests stay in flight). */
  choose(n: number): string[] {
    return Array.from({ length: n }, () => this.start().worker);
  }

  /** Messages sent to `worker` since `from` (an index into `sent`), optionally of one type. */
  to(worker: string, type?: ToWorker['type'], from = 0): ToWorker[] {
    return this.sent
      .slice(from)
      .filter((s) => s.to === worker && (type === undefined || s.message.type === type))
      .map((s) => s.message);
  }

  from(worker: string, message: FromWorker): void {
    this.router.onMessage(worker, message);
  }

  /** The decode worker asks for a remote prefill of `requestId` on `prefillWorker`. */
  needPrefill(decode: string, requestId: string, prefillWorker: string): void {
    this.from(decode, {
      type: 'needPrefill',
      requestId,
      promptIds: [1, 2, 3],
      sampling: SAMPLING,
      prefillWorker,
      blockIds: [4, 5],
      cachedTokens: 0,
    });
  }

  finish(worker: string, requestId: string, finishReason: 'stop' | 'length' | 'abort' = 'stop'): void {
    this.from(worker, { type: 'tokens', requestId, tokenIds: [], finishReason });
  }

  async metric(series: string): Promise<number> {
    return sample(await this.metrics!.text(), series);
  }

  /** Messages of one type sent to any worker. */
  all(type: ToWorker['type']): { to: string; message: ToWorker }[] {
    return this.sent.filter((s) => s.message.type === type);
  }
}

async function drain(chunks: AsyncIterator<GenerationChunk>): Promise<GenerationChunk[]> {
  const all: GenerationChunk[] = [];
  for (let c = await chunks.next(); !c.done; c = await chunks.next()) all.push(c.value);
  return all;
}

const QUEUE = METRIC_NAMES.prefillQueueDepth;
const REMOTE = `${METRIC_NAMES.prefills}{where="remote"}`;
const LOCAL = `${METRIC_NAMES.prefills}{where="local"}`;

let h: Harness;
afterEach(() => h?.controlPlane.close());

describe('which workers serve', () => {
  it('none: available() is false and generate throws NoWorkerAvailableError', () => {
    h = new Harness();
    expect(h.router.available()).toBe(false);
    expect(() => h.start()).toThrow(NoWorkerAvailableError);
    h.add('p0', 'prefill');
    expect(h.router.available()).toBe(false);
    expect(() => h.start()).toThrow(NoWorkerAvailableError);
    h.add('d0', 'decode');
    expect(h.router.available()).toBe(true);
    expect(h.start().worker).toBe('d0');
  });

  it('disagg: decode workers first, aggregated ones when there is no decode worker', () => {
    h = new Harness('disagg');
    h.add('a0', 'aggregated');
    expect(h.router.available()).toBe(true);
    expect(h.start().worker).toBe('a0');
    h.add('d0', 'decode', { running: 50 });
    expect(h.choose(2)).toEqual(['d0', 'd0']);
  });

  it('agg: aggregated workers first, decode ones when there is none; never a prefill candidate', () => {
    h = new Harness('agg');
    h.add('p0', 'prefill');
    h.add('d0', 'decode');
    const first = h.start();
    expect(first.worker).toBe('d0');
    expect(first.generate.prefill).toBeNull();
    h.add('a0', 'aggregated', { running: 50 });
    expect(h.choose(2)).toEqual(['a0', 'a0']);
  });

  it('a worker whose channel is closed: NoWorkerAvailableError naming it, and it is not counted as busy', () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('d1', 'decode', { running: 1 });
    h.unreachable.add('d0');
    expect(() => h.start()).toThrow(new NoWorkerAvailableError('worker d0 cannot take requests now'));
    h.unreachable.delete('d0');
    expect(h.choose(1)).toEqual(['d0']);
  });
});

describe('worker choice: the fewest requests in flight from this router, then the lightest reported load', () => {
  it('running, waiting and prefilling each count as load', () => {
    for (const field of ['running', 'waiting', 'prefilling'] as const) {
      h = new Harness();
      h.add('d0', 'decode', { [field]: 2 });
      h.add('d1', 'decode', { [field]: 1 });
      expect(h.choose(1), field).toEqual(['d1']);
      h.controlPlane.close();
    }
    // Their sum: 1 + 1 + 1 against 2.
    h = new Harness();
    h.add('d0', 'decode', { running: 1, waiting: 1, prefilling: 1 });
    h.add('d1', 'decode', { running: 2 });
    expect(h.choose(1)).toEqual(['d1']);
  });

  it('free blocks are not load; on a tie the first registered wins', () => {
    h = new Harness();
    h.add('d0', 'decode', { freeBlocks: 0 });
    h.add('d1', 'decode', { freeBlocks: 64 });
    expect(h.choose(1)).toEqual(['d0']);
  });

  it('requests in flight outweigh any reported load', () => {
    h = new Harness();
    h.add('d0', 'decode', { running: 900 });
    h.add('d1', 'decode', { running: 0 });
    // d1 takes one, then d0 (one in flight on d1 outweighs 900 running on d0), then d1 again (a tie in flight).
    expect(h.choose(4)).toEqual(['d1', 'd0', 'd1', 'd0']);
  });

  it('a finished request no longer counts: the next one goes back to the lightest worker', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('d1', 'decode', { running: 5 });
    for (let i = 0; i < 3; i++) {
      const r = h.start();
      expect(r.worker).toBe('d0');
      h.finish('d0', r.requestId);
      await drain(r.chunks);
    }
  });
});

describe("the router's prefill decision, sent to the decode worker", () => {
  it('remote to the cheapest prefill worker while the pool has room; local once it is saturated', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill', { prefilling: 1 });
    h.add('p1', 'prefill');
    const a = h.start([7, 8, 9]);
    // Equal costs and none in flight: the lighter reported load.
    expect(a.generate).toEqual({
      type: 'generate',
      requestId: a.requestId,
      promptIds: [7, 8, 9],
      sampling: SAMPLING,
      prefill: { worker: 'p1' },
    });
    h.needPrefill('d0', a.requestId, 'p1');
    // p1 has a prefill queued: p0 is cheaper.
    const b = h.start();
    expect(b.generate.prefill).toEqual({ worker: 'p0' });
    h.needPrefill('d0', b.requestId, 'p0');
    // Two queued in a pool of two (maxPrefillQueue 2): still room.
    const c = h.start();
    expect(c.generate.prefill).not.toBeNull();
    h.needPrefill('d0', c.requestId, c.generate.prefill!.worker);
    h.needPrefill('d0', h.start().requestId, 'p0');
    // Four queued: saturated, the decode worker prefills.
    expect(h.start().generate.prefill).toBeNull();
    // Once a prefill is done it no longer counts.
    h.from('p1', { type: 'prefillDone', requestId: a.requestId, ok: true, bytes: 10, ms: 2 });
    expect(h.start().generate.prefill).not.toBeNull();
  });

  it('a prompt shorter than minRemotePrefillTokens prefills locally (the default thresholds)', () => {
    h = new Harness('disagg', { thresholds: null });
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    expect(h.start([1, 2, 3]).generate.prefill).toBeNull();
  });

  it('no prefill worker: null', () => {
    h = new Harness();
    h.add('d0', 'decode');
    expect(h.start().generate.prefill).toBeNull();
  });
});

describe('remote prefill relay', () => {
  it('needPrefill goes to the prefill worker named, with the decode worker as target; prefillDone counts it', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    const r = h.start();
    h.needPrefill('d0', r.requestId, 'p0');
    expect(h.to('p0')).toEqual([
      {
        type: 'prefill',
        requestId: r.requestId,
        promptIds: [1, 2, 3],
        sampling: SAMPLING,
        target: { worker: 'd0', blockIds: [4, 5], cachedTokens: 0 },
      },
    ]);
    expect(await h.metric(QUEUE)).toBe(1);
    h.from('p0', { type: 'prefillDone', requestId: r.requestId, ok: true, bytes: 4096, ms: 30, transferMs: 10 });
    expect(await h.metric(QUEUE)).toBe(0);
    expect(await h.metric(REMOTE)).toBe(1);
    expect(await h.metric(LOCAL)).toBe(0);
    expect(await h.metric(METRIC_NAMES.kvTransferBytes)).toBe(4096);
    expect(await h.metric(`${METRIC_NAMES.kvTransferSeconds}_sum`)).toBeCloseTo(0.01);
    expect(await h.metric(`${METRIC_NAMES.kvTransferSeconds}_count`)).toBe(1);
    expect(await h.metric(`${METRIC_NAMES.remotePrefillSeconds}_sum`)).toBeCloseTo(0.03);
    // A prefill that succeeded is not reported to the decode worker (the KV notification tells it).
    expect(h.to('d0', 'prefillFailed')).toEqual([]);
    // Without transferMs, the transfer is timed by the whole prefill.
    const s = h.start();
    h.needPrefill('d0', s.requestId, 'p0');
    h.from('p0', { type: 'prefillDone', requestId: s.requestId, ok: true, bytes: 1, ms: 20 });
    expect(await h.metric(`${METRIC_NAMES.kvTransferSeconds}_sum`)).toBeCloseTo(0.03);
  });

  it('a prefill that failed: the decode worker is told, with the error, and computes the prompt itself', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    const r = h.start();
    h.needPrefill('d0', r.requestId, 'p0');
    h.from('p0', { type: 'prefillDone', requestId: r.requestId, ok: false, bytes: 0, ms: 1, error: 'out of blocks' });
    expect(h.to('d0', 'prefillFailed')).toEqual([
      { type: 'prefillFailed', requestId: r.requestId, reason: 'out of blocks' },
    ]);
    expect(await h.metric(QUEUE)).toBe(0);
    expect(await h.metric(REMOTE)).toBe(0);
    expect(await h.metric(METRIC_NAMES.kvTransferBytes)).toBe(0);
    h.from('d0', { type: 'localPrefill', requestId: r.requestId });
    expect(await h.metric(LOCAL)).toBe(1);
    // A second answer for the same prefill changes nothing.
    h.from('p0', { type: 'prefillDone', requestId: r.requestId, ok: false, bytes: 0, ms: 1 });
    expect(h.to('d0', 'prefillFailed')).toHaveLength(1);
    expect(h.start().generate.prefill).toEqual({ worker: 'p0' });
  });

  it('a prefill worker that is gone or unreachable: prefillFailed to the decode worker at once', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    const r = h.start();
    h.needPrefill('d0', r.requestId, 'p9');
    expect(h.to('d0', 'prefillFailed')).toEqual([
      { type: 'prefillFailed', requestId: r.requestId, reason: 'prefill worker gone' },
    ]);
    h.unreachable.add('p0');
    h.needPrefill('d0', r.requestId, 'p0');
    expect(h.to('d0', 'prefillFailed')[1]).toEqual({
      type: 'prefillFailed',
      requestId: r.requestId,
      reason: 'prefill worker unreachable',
    });
    expect(await h.metric(QUEUE)).toBe(0);
    h.unreachable.delete('p0');
    expect(h.start().generate.prefill).toEqual({ worker: 'p0' });
  });

  it('needPrefill for a request the router does not know (it ended): prefillFailed, nothing relayed', () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    h.needPrefill('d0', 'unknown', 'p0');
    expect(h.to('d0')).toEqual([{ type: 'prefillFailed', requestId: 'unknown', reason: 'prefill worker gone' }]);
    expect(h.to('p0')).toEqual([]);
  });

  it('a request that ends before its prefillDone arrives leaves nothing queued', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    h.add('p1', 'prefill', { prefilling: 1 });
    const r = h.start();
    h.needPrefill('d0', r.requestId, 'p0');
    h.from('d0', { type: 'tokens', requestId: r.requestId, tokenIds: [3], finishReason: 'stop' });
    await drain(r.chunks);
    expect(await h.metric(QUEUE)).toBe(0);
    h.from('p0', { type: 'prefillDone', requestId: r.requestId, ok: true, bytes: 1, ms: 1 });
    expect(h.start().generate.prefill).toEqual({ worker: 'p0' });
  });

  it('abandonPrefill (the decode worker served the request itself): the prefill worker is told to abort', () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    const r = h.start();
    const local = h.start();
    h.needPrefill('d0', r.requestId, 'p0');
    h.from('d0', { type: 'abandonPrefill', requestId: r.requestId });
    h.from('d0', { type: 'abandonPrefill', requestId: local.requestId }); // no remote prefill: nothing to stop
    h.from('d0', { type: 'abandonPrefill', requestId: 'unknown' }); // a request that has ended: nothing either
    expect(h.all('abort')).toEqual([{ to: 'p0', message: { type: 'abort', requestId: r.requestId } }]);
  });

  it('a prefill still running when its request ends: its failure still reaches the decode worker (which keeps the blocks it lent until then), once', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    const [failed, succeeded, orphaned] = [h.start(), h.start(), h.start()];
    for (const r of [failed, succeeded, orphaned]) {
      h.needPrefill('d0', r.requestId, 'p0');
      h.finish('d0', r.requestId); // served by the decode worker itself after a timeout
      await drain(r.chunks);
    }
    expect(await h.metric(QUEUE)).toBe(0);
    h.from('p0', { type: 'prefillDone', requestId: failed.requestId, ok: false, bytes: 0, ms: 1, error: 'aborted' });
    h.from('p0', { type: 'prefillDone', requestId: failed.requestId, ok: false, bytes: 0, ms: 1, error: 'again' });
    // A prefill that succeeded tells the decode worker itself, with its KV notification.
    h.from('p0', { type: 'prefillDone', requestId: succeeded.requestId, ok: true, bytes: 1, ms: 1 });
    expect(h.to('d0', 'prefillFailed')).toEqual([
      { type: 'prefillFailed', requestId: failed.requestId, reason: 'aborted' },
    ]);
    // The prefill worker leaves before answering: the decode worker hears that too.
    h.controlPlane.remove('p0', 'SIGKILL');
    expect(h.to('d0', 'prefillFailed')).toEqual([
      { type: 'prefillFailed', requestId: failed.requestId, reason: 'aborted' },
      { type: 'prefillFailed', requestId: orphaned.requestId, reason: 'prefill worker p0 stopped (SIGKILL)' },
    ]);
    expect(await h.metric(REMOTE)).toBe(1);
    // Relayed once: a late answer from a worker of the same name changes nothing.
    h.add('p0', 'prefill');
    h.from('p0', { type: 'prefillDone', requestId: orphaned.requestId, ok: false, bytes: 0, ms: 1 });
    expect(h.to('d0', 'prefillFailed')).toHaveLength(2);
  });

  it('owed answers: only the prefill worker that left is answered for; a decode worker that left is told nothing', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('d1', 'decode');
    h.add('p0', 'prefill');
    h.add('p1', 'prefill');
    const [onP0, onP1] = [h.start(), h.start()]; // d0, d1
    const onD0 = h.start(); // d0 again, with p0
    expect([onP0.worker, onP1.worker, onD0.worker]).toEqual(['d0', 'd1', 'd0']);
    h.needPrefill('d0', onP0.requestId, 'p0');
    h.needPrefill('d1', onP1.requestId, 'p1');
    h.needPrefill('d0', onD0.requestId, 'p0');
    for (const r of [onP0, onP1, onD0]) {
      h.finish(r.worker, r.requestId);
      await drain(r.chunks);
    }
    h.controlPlane.remove('p1', 'SIGKILL');
    expect(h.all('prefillFailed')).toEqual([
      {
        to: 'd1',
        message: { type: 'prefillFailed', requestId: onP1.requestId, reason: 'prefill worker p1 stopped (SIGKILL)' },
      },
    ]);
    // p0's answers are still owed to d0 ...
    h.from('p0', { type: 'prefillDone', requestId: onP0.requestId, ok: false, bytes: 0, ms: 1, error: 'stopped' });
    expect(h.to('d0', 'prefillFailed')).toEqual([
      { type: 'prefillFailed', requestId: onP0.requestId, reason: 'stopped' },
    ]);
    // ... until d0 itself is gone.
    h.controlPlane.remove('d0', 'SIGKILL');
    h.from('p0', { type: 'prefillDone', requestId: onD0.requestId, ok: false, bytes: 0, ms: 1 });
    expect(h.all('prefillFailed')).toHaveLength(2);
  });
});

describe('streams', () => {
  it('chunks in order, logprobs kept, the finish reason ends the iteration', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    const r = h.start();
    const first = r.chunks.next();
    const logprobs = [{ tokenId: 5, logprob: -0.5, topTokenIds: new Int32Array(0), topLogprobs: new Float32Array(0) }];
    h.from('d0', { type: 'tokens', requestId: r.requestId, tokenIds: [5], logprobs, finishReason: null });
    expect(await first).toEqual({ done: false, value: { tokenIds: [5], finishReason: null, logprobs } });
    h.from('d0', { type: 'tokens', requestId: r.requestId, tokenIds: [6, 7], finishReason: null });
    h.from('d0', { type: 'tokens', requestId: r.requestId, tokenIds: [8], finishReason: 'length' });
    // Tokens of other requests, and any after the end, are not this request's.
    h.from('d0', { type: 'tokens', requestId: 'other', tokenIds: [1], finishReason: null });
    h.from('d0', { type: 'tokens', requestId: r.requestId, tokenIds: [9], finishReason: null });
    const rest = await drain(r.chunks);
    expect(rest).toEqual([
      { tokenIds: [6, 7], finishReason: null },
      { tokenIds: [8], finishReason: 'length' },
    ]);
    expect(rest[0]).not.toHaveProperty('logprobs');
    // A finished request is not aborted.
    r.controller.abort();
    expect(h.to('d0', 'abort')).toEqual([]);
  });

  it('a request the worker failed: the iteration throws its code and message, after the chunks before it', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    const r = h.start();
    h.from('d0', { type: 'tokens', requestId: r.requestId, tokenIds: [5], finishReason: null });
    h.from('d0', { type: 'failed', requestId: r.requestId, code: 'TANDEM_BAD_ARGUMENT', message: 'token 999' });
    expect(await r.chunks.next()).toEqual({ done: false, value: { tokenIds: [5], finishReason: null } });
    const error = await r.chunks.next().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(WorkerRequestError);
    expect(error).toMatchObject({ code: 'TANDEM_BAD_ARGUMENT', message: 'd0: token 999' });
    // It ended on the worker: nothing to abort anywhere, nothing left in flight.
    expect(h.all('abort')).toEqual([]);
    h.add('d1', 'decode', { running: 1 });
    expect(h.choose(1)).toEqual(['d0']);
  });

  it('a worker that goes away mid-stream: TANDEM_WORKER_GONE with the reason; its in-flight count goes with it', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('d1', 'decode', { running: 1 });
    const r = h.start();
    const other = h.start();
    expect([r.worker, other.worker]).toEqual(['d0', 'd1']);
    const next = r.chunks.next();
    h.controlPlane.remove('d0', 'exit_1');
    const error = await next.catch((e: unknown) => e);
    expect(error).toBeInstanceOf(WorkerRequestError);
    expect(error).toMatchObject({ code: 'TANDEM_WORKER_GONE', message: 'worker d0 stopped (exit_1)' });
    // The other worker's stream goes on.
    h.finish('d1', other.requestId, 'length');
    expect(await drain(other.chunks)).toEqual([{ tokenIds: [], finishReason: 'length' }]);
    h.add('d0', 'decode');
    expect(h.choose(2)).toEqual(['d0', 'd1']);
  });

  it('a decode worker that goes away or fails the request during a remote prefill: the prefill worker is told to abort', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    const r = h.start();
    const failed = h.start();
    h.needPrefill('d0', r.requestId, 'p0');
    h.needPrefill('d0', failed.requestId, 'p0');
    h.from('d0', { type: 'failed', requestId: failed.requestId, code: 'TANDEM_ENGINE', message: 'no' });
    await expect(failed.chunks.next()).rejects.toMatchObject({ code: 'TANDEM_ENGINE' });
    expect(h.to('p0', 'abort')).toEqual([{ type: 'abort', requestId: failed.requestId }]);
    const next = r.chunks.next();
    h.controlPlane.remove('d0', 'SIGKILL');
    await expect(next).rejects.toMatchObject({ code: 'TANDEM_WORKER_GONE' });
    expect(h.to('p0', 'abort')).toEqual([
      { type: 'abort', requestId: failed.requestId },
      { type: 'abort', requestId: r.requestId },
    ]);
    expect(await h.metric(QUEUE)).toBe(0);
  });

  it('a prefill worker that goes away: prefillFailed to the decode worker, whose stream goes on', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    h.add('p1', 'prefill');
    const r = h.start();
    const elsewhere = h.start();
    const local = h.start();
    h.needPrefill('d0', r.requestId, 'p0');
    h.needPrefill('d0', elsewhere.requestId, 'p1');
    h.controlPlane.remove('p0', 'SIGKILL');
    expect(h.to('d0', 'prefillFailed')).toEqual([
      { type: 'prefillFailed', requestId: r.requestId, reason: 'prefill worker p0 stopped (SIGKILL)' },
    ]);
    expect(await h.metric(QUEUE)).toBe(1);
    h.from('d0', { type: 'tokens', requestId: r.requestId, tokenIds: [1], finishReason: 'stop' });
    expect(await drain(r.chunks)).toEqual([{ tokenIds: [1], finishReason: 'stop' }]);
    // Requests prefilled elsewhere, or locally, are left alone.
    for (const other of [elsewhere, local]) {
      h.finish('d0', other.requestId);
      expect(await drain(other.chunks)).toEqual([{ tokenIds: [], finishReason: 'stop' }]);
    }
    expect(await h.metric(QUEUE)).toBe(0);
  });
});

describe('abort', () => {
  it('the signal sends abort to the decode worker and to the prefill worker it relayed to', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    const r = h.start();
    h.needPrefill('d0', r.requestId, 'p0');
    const next = r.chunks.next();
    r.controller.abort();
    expect(h.to('d0', 'abort')).toEqual([{ type: 'abort', requestId: r.requestId }]);
    expect(h.to('p0', 'abort')).toEqual([{ type: 'abort', requestId: r.requestId }]);
    h.finish('d0', r.requestId, 'abort');
    expect(await next).toEqual({ done: false, value: { tokenIds: [], finishReason: 'abort' } });
    expect(await r.chunks.next()).toEqual({ done: true, value: undefined });
    // Sent once: not again when the iteration ends.
    expect(h.to('d0', 'abort')).toHaveLength(1);
    expect(await h.metric(QUEUE)).toBe(0);
    expect(h.start().generate.prefill).toEqual({ worker: 'p0' });
  });

  it('without a remote prefill, only the decode worker hears of it', () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    const r = h.start();
    r.controller.abort();
    expect(h.all('abort')).toEqual([{ to: 'd0', message: { type: 'abort', requestId: r.requestId } }]);
  });

  it('a consumer that stops early aborts the request on both workers and frees its place', async () => {
    h = new Harness();
    h.add('d0', 'decode');
    h.add('d1', 'decode', { running: 1 });
    h.add('p0', 'prefill');
    const r = h.start();
    h.needPrefill('d0', r.requestId, 'p0');
    h.from('d0', { type: 'tokens', requestId: r.requestId, tokenIds: [5], finishReason: null });
    expect((await r.chunks.next()).value).toEqual({ tokenIds: [5], finishReason: null });
    expect(h.to('d0', 'abort')).toEqual([]);
    await r.chunks.return!();
    expect(h.to('d0', 'abort')).toEqual([{ type: 'abort', requestId: r.requestId }]);
    expect(h.to('p0', 'abort')).toEqual([{ type: 'abort', requestId: r.requestId }]);
    expect(await h.metric(QUEUE)).toBe(0);
    // Nothing in flight is left: the next request goes to the lighter d0, with an empty prefill queue.
    const next = h.start();
    expect(next.worker).toBe('d0');
    expect(next.generate.prefill).toEqual({ worker: 'p0' });
    // The signal of the request that ended sends nothing more.
    r.controller.abort();
    expect(h.to('d0', 'abort')).toHaveLength(1);
  });
});

describe('without metrics (they are optional)', () => {
  it('relays, counts and frees the same', async () => {
    h = new Harness('disagg', { withMetrics: false });
    h.add('d0', 'decode');
    h.add('p0', 'prefill');
    h.add('p1', 'prefill');
    const [done, failed, ended, gone] = [h.start(), h.start(), h.start(), h.start()];
    h.needPrefill('d0', done.requestId, 'p0');
    h.from('p0', { type: 'prefillDone', requestId: done.requestId, ok: true, bytes: 1, ms: 1 });
    h.needPrefill('d0', failed.requestId, 'p0');
    h.from('p0', { type: 'prefillDone', requestId: failed.requestId, ok: false, bytes: 0, ms: 1, error: 'e' });
    h.from('d0', { type: 'localPrefill', requestId: failed.requestId });
    h.needPrefill('d0', ended.requestId, 'p0');
    h.needPrefill('d0', gone.requestId, 'p1');
    h.controlPlane.remove('p1', 'SIGKILL');
    expect(h.to('d0', 'prefillFailed')).toEqual([
      { type: 'prefillFailed', requestId: failed.requestId, reason: 'e' },
      { type: 'prefillFailed', requestId: gone.requestId, reason: 'prefill worker p1 stopped (SIGKILL)' },
    ]);
    for (const r of [done, failed, ended, gone]) {
      h.finish('d0', r.requestId);
      await drain(r.chunks);
    }
    expect(h.start().generate.prefill).toEqual({ worker: 'p0' });
  });
});

describe('messages that are not about a request stream', () => {
  it('are ignored', () => {
    h = new Harness();
    h.add('d0', 'decode');
    const before = h.sent.length;
    h.from('d0', { type: 'heartbeat', name: 'd0', load: { running: 0, waiting: 0, freeBlocks: 1, prefilling: 0 } });
    h.from('d0', { type: 'failed', requestId: 'unknown', code: 'X', message: 'y' });
    h.from('p0', { type: 'prefillDone', requestId: 'unknown', ok: false, bytes: 0, ms: 0 });
    expect(h.sent.length).toBe(before);
  });
});

describe('KV events and KV-aware routing', () => {
  const prompt = Array.from({ length: 64 }, (_, i) => 1000 + i); // 4 blocks of 16
  const lanes = kvBlockHashLanes(prompt, 16);
  const batch = (incarnation: number, seq: number, stored = true) => ({
    incarnation,
    seq,
    kinds: Uint8Array.of(stored ? 1 : 0),
    counts: Uint32Array.of(4),
    lanes,
  });

  it("a worker's snapshot and events feed the index: the request goes where its prefix is; a gap asks for a snapshot", async () => {
    h = new Harness('agg');
    h.add('a0', 'aggregated');
    h.add('a1', 'aggregated');
    h.from('a0', { type: 'kvSnapshot', snapshot: { incarnation: 1, seq: 0, lanes: new Uint32Array(0) } });
    h.from('a1', { type: 'kvSnapshot', snapshot: { incarnation: 2, seq: 0, lanes: new Uint32Array(0) } });
    h.from('a1', { type: 'kvEvents', batch: batch(2, 1) });
    expect(h.router.kv.blocksOf('a1')).toBe(4);
    expect(h.start(prompt).worker).toBe('a1');
    // a0 skips a number: asked for a snapshot, counted.
    h.from('a0', { type: 'kvEvents', batch: batch(1, 2) });
    expect(h.to('a0', 'kvSnapshotRequest')).toEqual([{ type: 'kvSnapshotRequest' }]);
    expect(h.router.kv.blocksOf('a0')).toBe(0);
    expect(await h.metric(`${METRIC_NAMES.routerKvEventGaps}{worker="a0"}`)).toBe(1);
    // A removal empties a1; a1 gone: its blocks leave the index.
    h.from('a1', { type: 'kvEvents', batch: batch(2, 2, false) });
    expect(h.router.kv.blocksOf('a1')).toBe(0);
    h.from('a1', { type: 'kvEvents', batch: batch(2, 3) });
    h.controlPlane.remove('a1', 'test');
    expect(h.router.kv.index.blocks).toBe(0);
  });

  it('cached tokens: carried on the first chunk, and counted per worker', async () => {
    h = new Harness('agg');
    h.add('a0', 'aggregated');
    const r = h.start(prompt);
    h.from('a0', { type: 'tokens', requestId: r.requestId, tokenIds: [5], finishReason: null, cachedTokens: 48 });
    h.from('a0', { type: 'tokens', requestId: r.requestId, tokenIds: [6], finishReason: 'stop' });
    expect(await drain(r.chunks)).toEqual([
      { tokenIds: [5], finishReason: null, cachedTokens: 48 },
      { tokenIds: [6], finishReason: 'stop' },
    ]);
    expect(await h.metric(`${METRIC_NAMES.workerPromptTokens}{worker="a0"}`)).toBe(64);
    expect(await h.metric(`${METRIC_NAMES.workerCachedPromptTokens}{worker="a0"}`)).toBe(48);
  });

  it('a worker that serves requests without publishing KV events: a loud warning and a metric', async () => {
    const lines: string[] = [];
    const metrics = new ServeMetrics();
    const cp = new EmbeddedControlPlane(3_600_000);
    const router = new Router(cp, () => true, 'agg', metrics, { log: (l) => lines.push(l) });
    cp.register(workerRegistration('a0', 'aggregated'));
    cp.heartbeat('a0', { running: 0, waiting: 0, freeBlocks: 64, prefilling: 0 });
    for (let i = 0; i < KV_EVENTS_MISSING_AFTER; i++) {
      const it = router.generate({
        requestId: `q${i}`,
        promptIds: prompt,
        sampling: SAMPLING,
        signal: new AbortController().signal,
      });
      router.onMessage('a0', { type: 'tokens', requestId: `q${i}`, tokenIds: [1], finishReason: 'stop' });
      await drain(it[Symbol.asyncIterator]());
    }
    expect(lines).toEqual([
      'WARNING: worker a0 serves requests but has published no KV events: KV-aware routing cannot see its cache (is prefix caching off, or are its events lost?)',
    ]);
    expect(sample(await metrics.text(), `${METRIC_NAMES.routerKvEventsMissing}{worker="a0"}`)).toBe(1);
    router.onMessage('a0', { type: 'kvEvents', batch: batch(9, 1) });
    router.onMessage('a0', { type: 'kvSnapshot', snapshot: { incarnation: 9, seq: 1, lanes } });
    expect(sample(await metrics.text(), `${METRIC_NAMES.routerKvEventsMissing}{worker="a0"}`)).toBe(0);
    cp.close();
  });

  it('the policy comes from the options: round-robin ignores the cache', () => {
    const cp = new EmbeddedControlPlane(3_600_000);
    const sent: string[] = [];
    const router = new Router(cp, (to, m) => (m.type === 'generate' && sent.push(to), true), 'agg', undefined, {
      routing: { policy: 'round-robin' },
    });
    for (const n of ['a0', 'a1']) {
      cp.register(workerRegistration(n, 'aggregated'));
      cp.heartbeat(n, { running: 0, waiting: 0, freeBlocks: 64, prefilling: 0 });
    }
    router.onMessage('a1', { type: 'kvSnapshot', snapshot: { incarnation: 1, seq: 0, lanes } });
    for (let i = 0; i < 3; i++)
      router.generate({
        requestId: `q${i}`,
        promptIds: prompt,
        sampling: SAMPLING,
        signal: new AbortController().signal,
      });
    expect(sent).toEqual(['a0', 'a1', 'a0']);
    expect(router.kv.policyName).toBe('round-robin');
    cp.close();
  });
});
