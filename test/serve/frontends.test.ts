import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { FromWorker } from '../../lib/worker/protocol.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { deliverToRouters, requestPlaneId, startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { METRIC_NAMES } from '../../lib/frontend/metrics.js';
import { sample } from '../helpers/serve.js';

// Several frontends over one set of workers (frontend.replicas), on CPU: each answers any request the same,
// serves /health and /metrics, and streams on through a decode worker's death (each frontend's router and
// migration on its own). Loopback only; every wait is bounded; the deployment stops at the end.
const MODEL = 'dummy:tiny';
const WAIT = { timeout: 20_000, interval: 10 };

describe('deliverToRouters', () => {
  const routers = () =>
    [0, 1, 2].map(() => ({
      got: [] as [string, FromWorker][],
      onMessage(from: string, m: FromWorker) {
        this.got.push([from, m]);
      },
    }));
  it("a message about a request reaches its frontend's router only, with the id that router knows", () => {
    const rs = routers();
    const lines: string[] = [];
    const m: FromWorker = {
      type: 'tokens',
      requestId: requestPlaneId(1, 'cmpl-1#m1'),
      tokenIds: [5],
      finishReason: null,
    };
    deliverToRouters(rs, 'decode-0', m, (l) => lines.push(l));
    expect(rs.map((r) => r.got.length)).toEqual([0, 1, 0]);
    expect(rs[1]!.got[0]).toEqual(['decode-0', { ...m, requestId: 'cmpl-1#m1' }]);
    // An id no router owns: dropped, said so.
    deliverToRouters(rs, 'decode-0', { type: 'localPrefill', requestId: 'cmpl-2' }, (l) => lines.push(l));
    deliverToRouters(rs, 'decode-0', { type: 'localPrefill', requestId: requestPlaneId(7, 'x') }, (l) => lines.push(l));
    expect(rs.map((r) => r.got.length)).toEqual([0, 1, 0]);
    expect(lines).toEqual([
      '[launcher] decode-0 sent localPrefill about unknown request cmpl-2: dropped',
      '[launcher] decode-0 sent localPrefill about unknown request f7/x: dropped',
    ]);
  });

  it('a message about no request reaches every router', () => {
    const rs = routers();
    const m = {
      type: 'heartbeat',
      name: 'decode-1',
      load: { running: 1, waiting: 0, freeBlocks: 3, prefilling: 0 },
    } as const;
    deliverToRouters(rs, 'decode-1', m, () => {});
    expect(rs.map((r) => r.got)).toEqual([0, 1, 2].map(() => [['decode-1', m]]));
  });
});

describe('two frontends (CPU)', () => {
  let d: Deployment;
  let clients: OpenAI[];

  beforeAll(async () => {
    const g = defaultGraph({ gpus: 0, mode: 'disagg', port: 0 });
    g.frontend.replicas = 2;
    g.pools.find((p) => p.role === 'decode')!.replicas = 2;
    g.disaggregation = { ...g.disaggregation, minRemotePrefillTokens: 1 };
    for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 512, threads: 1 };
    d = await startDeployment(g, { log: () => {}, heartbeatMs: 20 });
    clients = d.frontends.map(
      (f) => new OpenAI({ baseURL: `${f.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 }),
    );
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 500 });
  });

  it('each listens on a port of its own and serves /health and /metrics', async () => {
    expect(d.frontends).toHaveLength(2);
    expect(d.frontend).toBe(d.frontends[0]);
    expect(new Set(d.frontends.map((f) => f.port)).size).toBe(2);
    for (const f of d.frontends) {
      const health = await fetch(`${f.url}/health`);
      expect(health.status).toBe(200);
      const text = await (await fetch(`${f.url}/metrics`)).text();
      expect(sample(text, `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`)).toBe(0);
    }
  });

  it('the same request to either frontend gets the same answer, also when both run at once', async () => {
    for (const params of [{ temperature: 0 }, { temperature: 0.8, seed: 9 }]) {
      const ask = (c: OpenAI) =>
        c.completions.create({ model: MODEL, prompt: 'Two frontends, one answer', max_tokens: 40, ...params });
      const [a, b] = [await ask(clients[0]!), await ask(clients[1]!)];
      expect(b.choices[0]!.text).toBe(a.choices[0]!.text);
      // Token counts equal; the cached part differs (the second request finds the first one's prefix cached).
      const counts = ({ prompt_tokens_details: _, ...rest }: OpenAI.CompletionUsage) => rest;
      expect(counts(b.usage!)).toEqual(counts(a.usage!));
      // At once, several on each: every stream reaches its own frontend (a message routed to the other
      // frontend's router would leave a request hanging or mixed into another).
      const together = await Promise.all([0, 1, 0, 1, 0, 1].map((i) => ask(clients[i]!)));
      for (const r of together) expect(r.choices[0]!.text).toBe(a.choices[0]!.text);
    }
  });

  it('a decode worker killed mid-stream breaks neither frontend', async () => {
    const params = {
      model: MODEL,
      prompt: 'Both streams go on',
      max_tokens: 3000,
      temperature: 0.7,
      seed: 3,
      ignore_eos: true,
    };
    const run = async (c: OpenAI, onFirst?: () => Promise<void>) => {
      let text = '';
      let first = true;
      for await (const chunk of await c.completions.create({
        ...params,
        stream: true,
      } as OpenAI.CompletionCreateParamsStreaming)) {
        text += chunk.choices[0]?.text ?? '';
        if (first && onFirst) await onFirst();
        first = false;
      }
      return text;
    };
    const undisturbed = await run(clients[0]!);
    // Its worker's heartbeats report it done before the next streams start (the kill picks the busy worker).
    await vi.waitFor(() => expect(d.controlPlane.workers().every((w) => w.load.running === 0)).toBe(true), WAIT);
    let killed = false;
    const kill = async () => {
      if (killed) return;
      killed = true;
      let name: string | undefined;
      await vi.waitFor(() => {
        name = d.controlPlane.workers('decode').find((w) => w.load.running > 0)?.registration.name;
        expect(name).toBeDefined();
      }, WAIT);
      process.kill(d.pids()[name!]!, 'SIGKILL');
    };
    const texts = await Promise.all([run(clients[0]!, kill), run(clients[1]!)]);
    expect(texts).toEqual([undisturbed, undisturbed]);
    const migrated = await Promise.all(
      d.frontends.map(async (f) =>
        sample(await (await fetch(`${f.url}/metrics`)).text(), `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`),
      ),
    );
    // One registry for the deployment: every frontend shows its totals; at least the stream on the killed worker moved.
    expect(migrated[0]).toBe(migrated[1]);
    expect(migrated[0]).toBeGreaterThanOrEqual(1);
    // Both frontends still serve.
    for (const c of clients)
      expect(
        (await c.completions.create({ model: MODEL, prompt: 'after', max_tokens: 4 })).usage!.completion_tokens,
      ).toBe(4);
  });
});
