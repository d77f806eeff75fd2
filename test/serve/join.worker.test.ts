/**
 * A joined worker (lib/worker/worker-join.ts) in this process, with a real etcd (test/helpers/etcd.ts), driven
 * through raw request-plane clients: its registration, request cancellation over TCP (an abort message, and a
 * frontend whose connection closes), answers going only to the frontend that asked, leaving discovery on stop.
 * Loopback only; every wait is bounded.
 */
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { EtcdControlPlane } from '../../lib/control/index.js';
import { BadArgumentError } from '../../lib/errors.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import type { FromWorker } from '../../lib/worker/protocol.js';
import { WorkerClient } from '../../lib/worker/request-plane.js';
import { joinFrontend } from '../../lib/frontend/request-plane-frontend.js';
import { joinWorker, type JoinedWorker } from '../../lib/worker/worker-join.js';
import { EtcdServer, etcdBinary } from '../helpers/etcd.js';

const binary = etcdBinary();
if (binary.missing) console.log(`skipping the joined-worker tests: ${binary.missing}`);

const WAIT = { timeout: 20_000, interval: 10 };
const NAMESPACE = `jw${process.pid}`;
/** Thousands of engine steps: far more than run between a cancellation and the worker acting on it. */
const MAX_TOKENS = 3000;

const graph = () => {
  const g = defaultGraph({ gpus: 0, mode: 'agg', port: 0, model: 'dummy:tiny' });
  for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 512, threads: 1 };
  return g;
};

describe.skipIf(binary.missing !== undefined)('a joined worker', () => {
  let etcd: EtcdServer;
  let joined: JoinedWorker;
  let observer: EtcdControlPlane;
  const clients: WorkerClient[] = [];

  function connect(frontend: string) {
    const address = joined.registration().requestPlane!;
    const c = new WorkerClient({ ...address, frontend, token: 'join-test' });
    clients.push(c);
    const messages: FromWorker[] = [];
    c.on('message', (m) => messages.push(m));
    return { c, messages };
  }

  const generate = (requestId: string) => ({
    type: 'generate' as const,
    requestId,
    promptIds: [72, 101, 108, 108, 111],
    sampling: { temperature: 0, maxTokens: MAX_TOKENS, stopTokenIds: [] },
    prefill: null,
  });

  const tokensOf = (messages: FromWorker[], requestId: string) =>
    messages.filter(
      (m): m is Extract<FromWorker, { type: 'tokens' }> => m.type === 'tokens' && m.requestId === requestId,
    );

  beforeAll(async () => {
    etcd = await EtcdServer.start(binary.path!);
    const pool = graph().pools[0]!.name;
    joined = await joinWorker({
      graph: graph(),
      pool,
      control: etcd.endpoint,
      controlOptions: { namespace: NAMESPACE, leaseTtlSeconds: 2 },
      host: '127.0.0.2',
      name: 'agg-a',
      heartbeatMs: 50,
      statusPort: 0,
      token: 'join-test',
      log: () => {},
    });
    observer = await EtcdControlPlane.connect({ endpoints: etcd.endpoint, namespace: NAMESPACE });
  }, 60_000);

  afterAll(async () => {
    for (const c of clients) c.close();
    await joined?.stop();
    await observer?.close();
    await etcd?.stop();
  });

  it('registers its role, pool and request-plane address in etcd', async () => {
    await vi.waitFor(() => expect(observer.get('agg-a')).toBeDefined(), WAIT);
    const reg = observer.get('agg-a')!.registration;
    expect(reg).toMatchObject({ role: 'aggregated', pool: graph().pools[0]!.name, pid: process.pid });
    expect(reg.requestPlane).toEqual({ host: '127.0.0.2', port: expect.any(Number) });
    // Its load reaches etcd too (the lease keeps it alive; the load is what routers weigh).
    await vi.waitFor(() => expect(observer.get('agg-a')!.load.freeBlocks).toBeGreaterThan(0), WAIT);
  });

  it('answers /live and /health on its status port', async () => {
    const base = `http://127.0.0.2:${joined.statusPort}`;
    expect((await fetch(`${base}/live`)).status).toBe(200);
    const health = await fetch(`${base}/health`);
    expect(health.status).toBe(200);
    expect(await health.json()).toEqual({ status: 'ok' });
    expect((await fetch(`${base}/nope`)).status).toBe(404);
  });

  it('a joined frontend: /live always, /health once it reaches a worker; it serves through the worker', async () => {
    const g = graph();
    const alone = await joinFrontend({
      graph: g,
      control: etcd.endpoint,
      controlOptions: { namespace: `${NAMESPACE}-empty` },
      port: 0,
      token: 'join-test',
      log: () => {},
    });
    const served = await joinFrontend({
      graph: g,
      control: etcd.endpoint,
      controlOptions: { namespace: NAMESPACE },
      port: 0,
      token: 'join-test',
      log: () => {},
    });
    try {
      expect((await fetch(`${alone.frontend.url}/live`)).status).toBe(200);
      expect((await fetch(`${alone.frontend.url}/health`)).status).toBe(503);
      expect((await fetch(`${served.frontend.url}/live`)).status).toBe(200);
      await vi.waitFor(async () => expect((await fetch(`${served.frontend.url}/health`)).status).toBe(200), WAIT);
      const r = await fetch(`${served.frontend.url}/v1/completions`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ model: g.model, prompt: 'over tcp', max_tokens: 5, temperature: 0 }),
      });
      expect(r.status).toBe(200);
      expect(((await r.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens).toBe(5);
    } finally {
      await Promise.all([alone.stop({ drainMs: 0 }), served.stop({ drainMs: 0 })]);
    }
  });

  it('a joined frontend takes its API key from the variable the graph names, and refuses to start without it', async () => {
    const g = graph();
    g.frontend.apiKeyEnv = 'TANDEM_JOIN_TEST_KEY';
    const options = {
      graph: g,
      control: etcd.endpoint,
      controlOptions: { namespace: NAMESPACE },
      port: 0,
      log: () => {},
    };
    delete process.env.TANDEM_JOIN_TEST_KEY;
    await expect(joinFrontend(options)).rejects.toThrow(/TANDEM_JOIN_TEST_KEY/);
    process.env.TANDEM_JOIN_TEST_KEY = 'k3y';
    const f = await joinFrontend({ ...options, token: 'join-test' });
    try {
      expect((await fetch(`${f.frontend.url}/v1/models`)).status).toBe(401);
      const ok = await fetch(`${f.frontend.url}/v1/models`, { headers: { Authorization: 'Bearer k3y' } });
      expect(ok.status).toBe(200);
    } finally {
      delete process.env.TANDEM_JOIN_TEST_KEY;
      await f.stop({ drainMs: 0 });
    }
  });

  it('refuses a request-plane bind beyond loopback without a token, before touching etcd', async () => {
    const previous = process.env.TANDEM_TOKEN;
    delete process.env.TANDEM_TOKEN;
    try {
      await expect(
        joinWorker({ graph: graph(), pool: graph().pools[0]!.name, control: etcd.endpoint, host: '0.0.0.0' }),
      ).rejects.toThrow(BadArgumentError);
      // A wildcard bind needs to be told where others reach the worker.
      await expect(
        joinWorker({
          graph: graph(),
          pool: graph().pools[0]!.name,
          control: etcd.endpoint,
          host: '0.0.0.0',
          token: 't',
        }),
      ).rejects.toThrow(/--advertise/);
      await expect(joinWorker({ graph: graph(), pool: 'nope', control: etcd.endpoint })).rejects.toThrow(
        /no pool 'nope'/,
      );
    } finally {
      if (previous !== undefined) process.env.TANDEM_TOKEN = previous;
    }
  });

  it('an abort over TCP ends the request early; answers go only to the frontend that asked', async () => {
    const a = connect('fa');
    const b = connect('fb');
    await vi.waitFor(() => expect(a.c.connected && b.c.connected).toBe(true), WAIT);
    expect(a.c.send(generate('fa/r1'))).toBe(true);
    await vi.waitFor(() => expect(tokensOf(a.messages, 'fa/r1').length).toBeGreaterThan(0), WAIT);
    a.c.send({ type: 'abort', requestId: 'fa/r1' });
    await vi.waitFor(() => expect(tokensOf(a.messages, 'fa/r1').at(-1)?.finishReason).toBe('abort'), WAIT);
    const generated = tokensOf(a.messages, 'fa/r1').reduce((n, m) => n + m.tokenIds.length, 0);
    expect(generated).toBeLessThan(MAX_TOKENS);
    // The other frontend heard the worker-wide messages (heartbeats, KV events), none of fa's request.
    await vi.waitFor(() => expect(b.messages.some((m) => m.type === 'heartbeat')).toBe(true), WAIT);
    expect(b.messages.some((m) => 'requestId' in m)).toBe(false);
    // A request id of another frontend sent on this connection is ignored.
    a.c.send(generate('fb/r2'));
    a.c.send(generate('fa/r3'));
    await vi.waitFor(() => expect(tokensOf(a.messages, 'fa/r3').length).toBeGreaterThan(0), WAIT);
    a.c.send({ type: 'abort', requestId: 'fa/r3' });
    expect(tokensOf(b.messages, 'fb/r2')).toEqual([]);
    a.c.close();
    b.c.close();
  });

  it("a frontend's connection closing aborts its requests there", async () => {
    const a = connect('fc');
    const b = connect('fd');
    await vi.waitFor(() => expect(a.c.connected && b.c.connected).toBe(true), WAIT);
    await vi.waitFor(() => {
      const beats = b.messages.filter((m) => m.type === 'heartbeat');
      expect(beats.at(-1)?.load.running).toBe(0);
    }, WAIT);
    a.c.send(generate('fc/r1'));
    await vi.waitFor(() => expect(tokensOf(a.messages, 'fc/r1').length).toBeGreaterThan(0), WAIT);
    a.c.close();
    // The same frontend back at once: tokens of its requests would now reach it. The aborted request sends none.
    const again = connect('fc');
    await vi.waitFor(() => expect(again.c.connected).toBe(true), WAIT);
    const from = b.messages.length;
    await vi.waitFor(() => {
      const beats = b.messages.slice(from).filter((m) => m.type === 'heartbeat');
      expect(beats.at(-1)?.load.running).toBe(0);
    }, WAIT);
    const late = tokensOf(again.messages, 'fc/r1');
    expect(late.flatMap((m) => m.tokenIds)).toEqual([]);
    expect(late.every((m) => m.finishReason === 'abort')).toBe(true);
    again.c.close();
    b.c.close();
  });

  it('bad frames and garbage messages over TCP: the connection closes or the request fails, the worker serves on', async () => {
    // Not a frontend's message at all: the worker closes that connection (the client sees it go down).
    const notMessages: unknown[] = [
      null,
      42,
      'generate',
      [],
      {},
      { type: 7 },
      { type: 'init', init: {} },
      { type: 'shutdown' },
      { type: 'drain' },
      { type: 'setRole', role: 'decode' },
      { type: 'peer', peer: null },
      { type: 'generate' },
      { type: 'abort', requestId: 5 },
    ];
    for (const value of notMessages) {
      const x = connect('fz');
      const down = new Promise<void>((resolve) => x.c.once('down', () => resolve()));
      await vi.waitFor(() => expect(x.c.connected).toBe(true), WAIT);
      x.c.send(value as never);
      await down;
      x.c.close();
    }
    // Frontend messages with garbage fields (seeded): each fails on its own, at most as that request.
    const anything = fc.oneof(fc.anything(), fc.array(fc.integer()), fc.constant(undefined));
    const garbage = fc.sample(
      fc.record({
        type: fc.constantFrom('generate', 'prefill', 'prefillFailed', 'abort'),
        n: fc.nat(1000),
        promptIds: anything,
        sampling: anything,
        prefill: anything,
        blockIds: anything,
        resume: anything,
        reason: anything,
      }),
      { seed: 26, numRuns: 60 },
    );
    const g = connect('fy');
    await vi.waitFor(() => expect(g.c.connected).toBe(true), WAIT);
    for (const { n, ...m } of garbage) expect(g.c.send({ ...m, requestId: `fy/g${n}` } as never)).toBe(true);
    // Still serving: a real request on the same connection completes.
    g.c.send({ ...generate('fy/ok'), sampling: { temperature: 0, maxTokens: 5, stopTokenIds: [] } });
    await vi.waitFor(() => expect(tokensOf(g.messages, 'fy/ok').at(-1)?.finishReason).toBe('length'), WAIT);
    expect(g.c.connected).toBe(true);
    for (let n = 0; n <= 1000; n++) g.c.send({ type: 'abort', requestId: `fy/g${n}` });
    g.c.close();
  }, 60_000);

  it('stop() takes it out of discovery', async () => {
    await joined.stop();
    await vi.waitFor(() => expect(observer.get('agg-a')).toBeUndefined(), WAIT);
  });
});
