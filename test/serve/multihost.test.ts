/**
 * Tandem across "hosts" on one machine: a real etcd (test/helpers/etcd.ts) and separate `tandem` processes bound
 * to 127.0.0.1, 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to loopback):
 *
 *   host 1 (127.0.0.1)  tandem frontend --join etcd://...
 *   host 2 (127.0.0.2)  tandem worker --pool prefill, tandem worker --pool decode
 *   host 3 (127.0.0.3)  tandem worker --pool decode
 *
 * Workers register in etcd and learn their peers from it; the frontend discovers them there and reaches them
 * over the TCP request plane with a shared token; KV moves between workers over the transfer agents' tcp backend.
 * Compared against an aggregated deployment on the same model and seed. Loopback only; every wait is bounded;
 * every process is stopped at the end (and killed if the test process dies).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { EtcdControlPlane } from '../../lib/control/index.js';
import { packageRoot } from '../../lib/native/paths.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { WorkerClient } from '../../lib/worker/request-plane.js';
import { EtcdServer, etcdBinary, freeLoopbackPort } from '../helpers/etcd.js';
import { sample, streamCompletion } from '../helpers/serve.js';

const binary = etcdBinary();
if (binary.missing) console.log(`skipping the multi-host tests: ${binary.missing}`);

const MODEL = 'dummy:tiny';
const NAMESPACE = `mh${process.pid}`;
const TOKEN = randomBytes(16).toString('hex');
const WAIT = { timeout: 30_000, interval: 50 };
/** The lease TTL is 5 s (DEFAULT_LEASE_TTL_S): a killed worker is gone well within this bound. */
const GONE = { timeout: 20_000, interval: 50 };
/** Long enough that the serving worker is still generating when it is killed (a few tokens in). */
const LONG_TOKENS = 3000;

const GRAPH = `model: ${MODEL}
mode: disagg
frontend: { host: 127.0.0.1, port: 0, migrationLimit: 2 }
pools:
  - { name: prefill, role: prefill, replicas: 1, device: cpu, engine: { numBlocks: 512, threads: 1 } }
  - { name: decode, role: decode, replicas: 1, device: cpu, engine: { numBlocks: 512, threads: 1 } }
# Every prompt is prefilled remotely, so that KV crosses hosts on every request.
disaggregation: { minRemotePrefillTokens: 1, maxPrefillQueue: 4 }
`;

const PROMPTS = [
  'Two hosts share one KV cache over tcp',
  'The prefill worker writes blocks into the decode pool',
  'etcd says who is alive',
];

interface Host {
  name: string;
  child: ChildProcess;
  lines: string[];
}

const children = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

function tandem(name: string, args: string[], env: NodeJS.ProcessEnv = {}): Host {
  const child = spawn(process.execPath, ['--import', 'tsx', join(packageRoot, 'lib/cli/main.ts'), ...args], {
    cwd: packageRoot,
    env: { ...process.env, TANDEM_TOKEN: TOKEN, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  child.once('exit', () => children.delete(child));
  const lines: string[] = [];
  for (const stream of [child.stdout!, child.stderr!])
    createInterface({ input: stream }).on('line', (line) => lines.push(line));
  return { name, child, lines };
}

async function stop(host: Host): Promise<void> {
  const { child } = host;
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

describe.skipIf(binary.missing !== undefined)('three hosts on loopback: etcd discovery, TCP request plane', () => {
  let etcd: EtcdServer;
  let dir: string;
  let observer: EtcdControlPlane;
  let agg: Deployment;
  let aggClient: OpenAI;
  let client: OpenAI;
  let frontendUrl: string;
  const hosts: Record<string, Host> = {};

  const worker = (name: string, pool: string, host: string) =>
    tandem(name, [
      'worker',
      '--join',
      etcd.endpoint,
      '--namespace',
      NAMESPACE,
      '--pool',
      pool,
      '--graph',
      join(dir, 'graph.yaml'),
      '--host',
      host,
      '--name',
      name,
      // The "hosts" share one kernel, where the transfer agents would pick shared memory.
      '--kv-backend',
      'tcp',
    ]);

  const complete = async (c: OpenAI, prompt: string, maxTokens = 12) => {
    const r = await c.completions.create({ model: MODEL, prompt, max_tokens: maxTokens, temperature: 0 });
    return r.choices[0]!.text;
  };
  const metrics = async () => (await fetch(`${frontendUrl}/metrics`)).text();

  beforeAll(async () => {
    etcd = await EtcdServer.start(binary.path!);
    dir = mkdtempSync(join(tmpdir(), 'tandem-multihost-'));
    writeFileSync(join(dir, 'graph.yaml'), GRAPH);
    const port = await freeLoopbackPort();
    frontendUrl = `http://127.0.0.1:${port}`;
    hosts.prefill = worker('prefill-h2', 'prefill', '127.0.0.2');
    hosts.decodeH2 = worker('decode-h2', 'decode', '127.0.0.2');
    hosts.decodeH3 = worker('decode-h3', 'decode', '127.0.0.3');
    hosts.frontend = tandem('frontend-h1', [
      'frontend',
      '--join',
      etcd.endpoint,
      '--namespace',
      NAMESPACE,
      '--graph',
      join(dir, 'graph.yaml'),
      '--host',
      '127.0.0.1',
      '--port',
      String(port),
    ]);
    const g = defaultGraph({ gpus: 0, mode: 'agg', port: 0, model: MODEL });
    for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 512, threads: 1 };
    agg = await startDeployment(g, { log: () => {}, seed: 0 });
    aggClient = new OpenAI({ baseURL: `${agg.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
    client = new OpenAI({ baseURL: `${frontendUrl}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
    observer = await EtcdControlPlane.connect({ endpoints: etcd.endpoint, namespace: NAMESPACE });
    await vi.waitFor(
      () => {
        for (const h of Object.values(hosts)) expect(h.child.exitCode, h.lines.join('\n')).toBeNull();
        expect(
          observer
            .workers()
            .map((w) => w.registration.name)
            .sort(),
        ).toEqual(['decode-h2', 'decode-h3', 'prefill-h2']);
        for (const name of ['prefill-h2', 'decode-h2', 'decode-h3'])
          expect(hosts.frontend!.lines.some((l) => l.includes(`worker ${name} (`) && l.includes('reachable'))).toBe(
            true,
          );
      },
      { timeout: 90_000, interval: 100 },
    );
  }, 150_000);

  afterAll(async () => {
    await Promise.all(Object.values(hosts).map(stop));
    await agg?.stop({ drainMs: 500 });
    await observer?.close();
    await etcd?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it('workers register their request-plane address, pool and role; disaggregated output over TCP equals aggregated', async () => {
    const decodeH3 = observer.get('decode-h3')!.registration;
    expect(decodeH3).toMatchObject({ role: 'decode', pool: 'decode', requestPlane: { host: '127.0.0.3' } });
    expect(observer.get('prefill-h2')!.registration).toMatchObject({
      role: 'prefill',
      pool: 'prefill',
      requestPlane: { host: '127.0.0.2' },
    });
    const remoteBefore = sample(await metrics(), 'tandem_prefills_total{where="remote"}') || 0;
    for (const prompt of PROMPTS) expect(await complete(client, prompt)).toBe(await complete(aggClient, prompt));
    const text = await metrics();
    // Every prompt was prefilled on host 2 and its KV written into a decode worker's pool over tcp.
    expect(sample(text, 'tandem_prefills_total{where="remote"}')).toBe(remoteBefore + PROMPTS.length);
    expect(sample(text, 'tandem_kv_transfer_bytes_total')).toBeGreaterThan(0);
    const chat = await client.chat.completions.create({
      model: MODEL,
      messages: [{ role: 'user', content: 'Hello from host 1' }],
      max_tokens: 8,
      temperature: 0,
    });
    const aggChat = await aggClient.chat.completions.create({
      model: MODEL,
      messages: [{ role: 'user', content: 'Hello from host 1' }],
      max_tokens: 8,
      temperature: 0,
    });
    expect(chat.choices[0]!.message.content).toBe(aggChat.choices[0]!.message.content);
  });

  it('a frontend without the token, or with another, is refused by the workers', async () => {
    const address = observer.get('decode-h3')!.registration.requestPlane!;
    for (const token of [undefined, 'not-the-token']) {
      const previous = process.env.TANDEM_TOKEN;
      delete process.env.TANDEM_TOKEN;
      const c = new WorkerClient({ ...address, frontend: 'intruder', ...(token ? { token } : {}) });
      if (previous !== undefined) process.env.TANDEM_TOKEN = previous;
      const events: string[] = [];
      c.on('up', () => events.push('up'));
      c.on('refused', (reason) => events.push(`refused: ${reason}`));
      try {
        await vi.waitFor(
          () => expect(events).toEqual([expect.stringMatching(/^refused: wrong or missing token/)]),
          WAIT,
        );
        expect(c.send({ type: 'kvSnapshotRequest' })).toBe(false);
      } finally {
        c.close();
      }
    }
    const ok = new WorkerClient({ ...address, frontend: 'friend', token: TOKEN });
    try {
      await vi.waitFor(() => expect(ok.connected).toBe(true), WAIT);
    } finally {
      ok.close();
    }
  });

  it('kill -9 the host of the worker serving a stream: its workers leave discovery, the stream migrates, new requests succeed', async () => {
    const prompt = 'A host dies mid-stream and another decode worker carries on';
    const params = { model: MODEL, prompt, max_tokens: LONG_TOKENS, temperature: 0, ignore_eos: true };
    const undisturbed = await streamCompletion(aggClient, params);
    expect(undisturbed.completionTokens).toBe(LONG_TOKENS);
    const promptTokens = async () => {
      const text = await metrics();
      return Object.fromEntries(
        ['decode-h2', 'decode-h3'].map((n) => [
          n,
          sample(text, `tandem_worker_prompt_tokens_total{worker="${n}"}`) || 0,
        ]),
      );
    };
    const before = await promptTokens();
    let serving = '';
    let killed: string[] = [];
    const migrated = await streamCompletion(client, params, async () => {
      // The worker that streams this request counted its prompt at its first token.
      const after = await promptTokens();
      serving = Object.keys(after).find((n) => after[n]! > before[n]!)!;
      // Every process of its host: host 2 holds the prefill worker too.
      killed = serving === 'decode-h2' ? ['prefill-h2', 'decode-h2'] : ['decode-h3'];
      const processes = serving === 'decode-h2' ? [hosts.prefill!, hosts.decodeH2!] : [hosts.decodeH3!];
      for (const h of processes) h.child.kill('SIGKILL');
    });
    expect(serving).toMatch(/^decode-h[23]$/);
    expect(migrated.error).toBeUndefined();
    expect(migrated.text).toBe(undisturbed.text);
    expect(migrated.completionTokens).toBe(LONG_TOKENS);
    expect(sample(await metrics(), 'tandem_request_migrations_total{outcome="migrated"}')).toBe(1);
    // Their leases lapse: they leave discovery everywhere, the other host's workers stay.
    const all = ['decode-h2', 'decode-h3', 'prefill-h2'];
    await vi.waitFor(
      () =>
        expect(
          observer
            .workers()
            .map((w) => w.registration.name)
            .sort(),
        ).toEqual(all.filter((n) => !killed.includes(n))),
      GONE,
    );
    // The surviving decode worker serves them (prefilling locally when the prefill host is gone).
    for (const p of PROMPTS) expect(await complete(client, p)).toBe(await complete(aggClient, p));
  }, 180_000);

  it('etcd restarted without its data: the workers register again and the frontend serves through them', async () => {
    const alive = observer
      .workers()
      .map((w) => w.registration.name)
      .sort();
    expect(alive.length).toBeGreaterThan(0);
    await etcd.kill();
    await etcd.restart({ fresh: true });
    // A plane connected now reads the new store: the workers are there only if they put themselves there again.
    const fresh = await EtcdControlPlane.connect({ endpoints: etcd.endpoint, namespace: NAMESPACE });
    try {
      await vi.waitFor(
        () =>
          expect(
            fresh
              .workers()
              .map((w) => w.registration.name)
              .sort(),
          ).toEqual(alive),
        {
          timeout: 60_000,
          interval: 100,
        },
      );
    } finally {
      await fresh.close();
    }
    await vi.waitFor(
      () =>
        expect(
          observer
            .workers()
            .map((w) => w.registration.name)
            .sort(),
        ).toEqual(alive),
      WAIT,
    );
    await vi.waitFor(
      async () => expect(await complete(client, PROMPTS[0]!)).toBe(await complete(aggClient, PROMPTS[0]!)),
      { timeout: 60_000, interval: 500 },
    );
  }, 150_000);
});
