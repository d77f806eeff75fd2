/**
 * Graceful drain of joined workers (`tandem worker --join`, lib/worker/worker-join.ts) behind a joined frontend,
 * with a real etcd (test/helpers/etcd.ts) and the official openai client (loopback): a worker told to drain (what
 * SIGTERM does) reports it over the request plane at once, so the frontend's routers choose it no more and its
 * /health answers 503; its streams in flight finish with exactly the text of an undisturbed run. Past the drain
 * timeout it stops with streams still running, and they migrate to the other worker, unchanged. The CLI worker
 * drains on SIGTERM, leaves discovery and exits 0, also when the signal comes while it starts up. Every wait is
 * bounded; everything stops at the end.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { EtcdControlPlane } from '../../lib/control/index.js';
import { packageRoot } from '../../lib/native/paths.js';
import { defaultGraph, type DeploymentGraph } from '../../lib/deploy/graph.js';
import { METRIC_NAMES } from '../../lib/frontend/metrics.js';
import { joinFrontend, type JoinedFrontend } from '../../lib/frontend/request-plane-frontend.js';
import { joinWorker, type JoinedWorker } from '../../lib/worker/worker-join.js';
import { EtcdServer, etcdBinary, freeLoopbackPort } from '../helpers/etcd.js';
import { sample, streamCompletion, type StreamOutcome } from '../helpers/serve.js';

const binary = etcdBinary();
if (binary.missing) console.log(`skipping the joined-worker drain tests: ${binary.missing}`);

const MODEL = 'dummy:tiny';
const WAIT = { timeout: 30_000, interval: 10 };
const NAMESPACE = `jd${process.pid}`;
const TOKEN = 'drain-test';

function graph(): DeploymentGraph {
  const g = defaultGraph({ gpus: 0, mode: 'agg', port: 0, model: MODEL });
  g.frontend.migrationLimit = 1;
  for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 512, threads: 1 };
  return g;
}

const PARAMS = [
  { prompt: 'A joined worker drains', temperature: 0, ignore_eos: true },
  { prompt: 'before it leaves etcd', temperature: 0.7, seed: 11, ignore_eos: true },
  { prompt: 'and nothing is lost', temperature: 0, frequency_penalty: 0.2, ignore_eos: true },
] as const;

describe.skipIf(binary.missing !== undefined)('drain of joined workers', () => {
  let etcd: EtcdServer;
  let frontend: JoinedFrontend;
  let client: OpenAI;
  const workers: JoinedWorker[] = [];

  const join = async (name: string, host: string) => {
    const w = await joinWorker({
      graph: graph(),
      pool: graph().pools[0]!.name,
      control: etcd.endpoint,
      controlOptions: { namespace: NAMESPACE },
      host,
      name,
      heartbeatMs: 50,
      statusPort: 0,
      token: TOKEN,
      log: () => {},
    });
    workers.push(w);
    return w;
  };
  /** Routers' choices now (routingChoices): connected, not draining. */
  const routable = () => frontend.workers.workers().map((w) => w.registration.name);
  const migrated = async () =>
    sample(
      await (await fetch(`${frontend.frontend.url}/metrics`)).text(),
      `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`,
    ) || 0;
  const stream = (p: (typeof PARAMS)[number], onFirstChunk?: () => Promise<void>) =>
    streamCompletion(client, { model: MODEL, max_tokens: 3000, ...p }, onFirstChunk);
  /** Opens every stream, and calls `whileOpen` once each has its first chunk (the streams wait for it). */
  const streamsWith = async (whileOpen: () => Promise<void>): Promise<StreamOutcome[]> => {
    let opened = 0;
    let ready!: () => void;
    const allOpen = new Promise<void>((resolve) => (ready = resolve));
    const running = Promise.all(
      PARAMS.map((p) =>
        stream(p, async () => {
          if (++opened === PARAMS.length) ready();
          await allOpen;
        }),
      ),
    );
    await allOpen;
    await whileOpen();
    return running;
  };

  beforeAll(async () => {
    etcd = await EtcdServer.start(binary.path!);
    await Promise.all([join('join-a', '127.0.0.2'), join('join-b', '127.0.0.3'), join('join-c', '127.0.0.4')]);
    frontend = await joinFrontend({
      graph: graph(),
      control: etcd.endpoint,
      controlOptions: { namespace: NAMESPACE },
      port: 0,
      token: TOKEN,
      log: () => {},
    });
    client = new OpenAI({ baseURL: `${frontend.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
    await vi.waitFor(() => expect(routable().sort()).toEqual(['join-a', 'join-b', 'join-c']), WAIT);
  }, 120_000);

  afterAll(async () => {
    await frontend?.stop({ drainMs: 500 });
    await Promise.all(workers.map((w) => w.stop()));
    await etcd?.stop();
  });

  it('a draining worker is routed nothing new; its streams finish unchanged, without migration', async () => {
    const undisturbed = await Promise.all(PARAMS.map((p) => stream(p)));
    const before = await migrated();
    let drained: Promise<boolean> | undefined;
    let busy: JoinedWorker | undefined;
    let held = 0;
    const outs = await streamsWith(async () => {
      // The worker holding the most of them drains.
      busy = workers.reduce((a, b) => (b.inFlight() > a.inFlight() ? b : a));
      held = busy.inFlight();
      expect(held).toBeGreaterThan(0);
      drained = busy.drain();
      await vi.waitFor(() => expect(routable()).not.toContain(busy!.name), WAIT);
      const health = await fetch(`http://${busy.registration().requestPlane!.host}:${busy.statusPort}/health`);
      expect(health.status).toBe(503);
      expect(await health.json()).toEqual({ status: 'draining' });
      // New requests are served by the others meanwhile.
      const fresh = await client.completions.create({ model: MODEL, prompt: 'new', max_tokens: 8 });
      expect(fresh.choices[0]!.text.length).toBeGreaterThan(0);
      expect(busy.inFlight()).toBeLessThanOrEqual(held);
    });
    for (const [i, out] of outs.entries()) {
      expect(out.error).toBeUndefined();
      expect(out.text).toBe(undisturbed[i]!.text);
      expect(out.completionTokens).toBe(undisturbed[i]!.completionTokens);
    }
    expect(await drained).toBe(true);
    expect(await migrated()).toBe(before);
    await busy!.stop();
    workers.splice(workers.indexOf(busy!), 1);
    await vi.waitFor(() => expect(routable()).toHaveLength(2), WAIT);
  }, 120_000);

  it('past the drain timeout the worker stops; its streams migrate and complete unchanged', async () => {
    const undisturbed = await Promise.all(PARAMS.map((p) => stream(p)));
    const before = await migrated();
    let held = 0;
    const outs = await streamsWith(async () => {
      const busy = workers.reduce((a, b) => (b.inFlight() > a.inFlight() ? b : a));
      held = busy.inFlight();
      expect(await busy.drain(50)).toBe(false);
      await busy.stop();
      workers.splice(workers.indexOf(busy), 1);
    });
    for (const [i, out] of outs.entries()) {
      expect(out.error).toBeUndefined();
      expect(out.text).toBe(undisturbed[i]!.text);
      expect(out.completionTokens).toBe(undisturbed[i]!.completionTokens);
    }
    expect(await migrated()).toBe(before + held);
  }, 120_000);
});

describe.skipIf(binary.missing !== undefined)('tandem worker --join on SIGTERM', () => {
  let etcd: EtcdServer;
  let dir: string;

  beforeAll(async () => {
    etcd = await EtcdServer.start(binary.path!);
    dir = mkdtempSync(join(tmpdir(), 'tandem-drain-'));
  }, 60_000);
  afterAll(async () => {
    await etcd?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** `tandem worker --join` as a child process, its output collected line by line. */
  function spawnWorker(name: string, extra: string[] = []) {
    writeFileSync(join(dir, 'graph.yaml'), `model: ${MODEL}\nmode: agg\npools:\n  - { name: agg, role: aggregated }\n`);
    const child = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        join(packageRoot, 'lib/cli/main.ts'),
        'worker',
        '--join',
        etcd.endpoint,
        '--namespace',
        `${NAMESPACE}-cli`,
        '--pool',
        'agg',
        '--graph',
        join(dir, 'graph.yaml'),
        '--name',
        name,
        '--drain-timeout',
        '5',
        ...extra,
      ],
      { cwd: packageRoot, env: { ...process.env, TANDEM_TOKEN: TOKEN }, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const lines: string[] = [];
    for (const s of [child.stdout!, child.stderr!]) createInterface({ input: s }).on('line', (l) => lines.push(l));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    return { child, lines, exited };
  }

  it('drains, leaves discovery and exits 0', async () => {
    const { child, lines, exited } = spawnWorker('cli-worker');
    const observer = await EtcdControlPlane.connect({ endpoints: etcd.endpoint, namespace: `${NAMESPACE}-cli` });
    try {
      await vi.waitFor(() => expect(observer.get('cli-worker'), lines.join('\n')).toBeDefined(), {
        timeout: 90_000,
        interval: 100,
      });
      child.kill('SIGTERM');
      expect(await exited, lines.join('\n')).toBe(0);
      expect(lines.some((l) => l.includes('SIGTERM: cli-worker drains 0 request(s) in flight'))).toBe(true);
      expect(lines.some((l) => l.includes('cli-worker drained; it leaves discovery'))).toBe(true);
      await vi.waitFor(() => expect(observer.get('cli-worker')).toBeUndefined(), WAIT);
    } finally {
      child.kill('SIGKILL');
      await observer.close();
    }
  }, 120_000);

  it('a SIGTERM while it starts up is kept: it comes up, drains, leaves discovery and exits 0', async () => {
    // /live answers before the model loads and the worker registers (lib/worker/worker-join.ts): the signal lands
    // mid start-up. Node's default action would kill the process there (exit code null), half-registered.
    const port = await freeLoopbackPort();
    const { child, lines, exited } = spawnWorker('early-worker', ['--status-port', String(port)]);
    const observer = await EtcdControlPlane.connect({ endpoints: etcd.endpoint, namespace: `${NAMESPACE}-cli` });
    try {
      await vi.waitFor(
        async () => expect((await fetch(`http://127.0.0.1:${port}/live`)).status, lines.join('\n')).toBe(200),
        { timeout: 90_000, interval: 50 },
      );
      child.kill('SIGTERM');
      expect(await exited, lines.join('\n')).toBe(0);
      expect(lines.some((l) => l.includes('[early-worker] registered in etcd'))).toBe(true);
      expect(lines.some((l) => l.includes('SIGTERM: early-worker drains 0 request(s) in flight'))).toBe(true);
      expect(lines.some((l) => l.includes('early-worker drained; it leaves discovery'))).toBe(true);
      await vi.waitFor(() => expect(observer.get('early-worker')).toBeUndefined(), WAIT);
    } finally {
      child.kill('SIGKILL');
      await observer.close();
    }
  }, 120_000);
});
