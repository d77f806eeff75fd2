import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { defaultGraph, type DeploymentGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { METRIC_NAMES } from '../../lib/frontend/metrics.js';
import { busyWorker, metric, streamCompletion, waitIdle, type StreamOutcome } from '../helpers/serve.js';

// Graceful drain on SIGTERM of the launcher's worker processes, with the official openai client (loopback): a
// worker sent SIGTERM while streams run on it reports draining (new requests go to the other worker), lets them
// finish with exactly the text of an undisturbed run, then exits (and the launcher restarts it). Past the drain
// timeout, or on a second SIGTERM, it exits at once and its requests migrate: nothing is lost. Every wait is
// bounded; the deployments stop at the end.
const MODEL = 'dummy:tiny';
const WAIT = { timeout: 30_000, interval: 10 };

function graph(): DeploymentGraph {
  const g = defaultGraph({ gpus: 0, mode: 'agg', port: 0 });
  g.frontend.migrationLimit = 1;
  g.pools[0]!.replicas = 2;
  for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 512, threads: 1 };
  return g;
}

const PARAMS = [
  { prompt: 'Drain lets the requests in flight finish', temperature: 0, ignore_eos: true },
  { prompt: 'before the worker exits', temperature: 0.8, seed: 7, ignore_eos: true },
  { prompt: 'and sends it nothing new', temperature: 0, presence_penalty: 0.5, ignore_eos: true },
] as const;

/** The worker names of each deployment, taken at its start: pids() leaves out a worker between exit and restart. */
const workerNames = new WeakMap<Deployment, string[]>();

/** Deployment `d`'s workers all registered (one that exited and is being restarted included). */
const allUp = (d: Deployment) => Promise.all(workerNames.get(d)!.map((name) => d.waitReady(name)));

function setUp(options: { workerDrainTimeoutMs?: number }) {
  const ctx = { lines: [] as string[] } as { d: Deployment; client: OpenAI; lines: string[] };
  beforeAll(async () => {
    ctx.d = await startDeployment(graph(), { log: (l) => ctx.lines.push(l), heartbeatMs: 50, ...options });
    workerNames.set(ctx.d, Object.keys(ctx.d.pids()));
    ctx.client = new OpenAI({ baseURL: `${ctx.d.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
  }, 120_000);
  afterAll(async () => {
    await ctx.d?.stop({ drainMs: 500 });
  });
  return ctx;
}

const migrated = (d: Deployment) => metric(d, `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`);

describe('drain on SIGTERM (default drain timeout)', () => {
  const ctx = setUp({});
  const stream = (p: (typeof PARAMS)[number], maxTokens: number, onFirstChunk?: () => Promise<void>) =>
    streamCompletion(ctx.client, { model: MODEL, max_tokens: maxTokens, ...p }, onFirstChunk);

  it('streams in flight finish unchanged, new requests go to the other worker, then the worker exits', async () => {
    const { d, client } = ctx;
    await allUp(d);
    const undisturbed = await Promise.all(PARAMS.map((p) => stream(p, 1500)));
    await waitIdle(d, WAIT);
    const before = await migrated(d);
    // Every stream on one worker (the other is frozen while they are routed), then SIGTERM to that worker.
    const [first, second] = Object.keys(d.pids());
    const secondPid = d.pids()[second!]!;
    process.kill(secondPid, 'SIGSTOP');
    let outs: StreamOutcome[];
    let pid = 0;
    try {
      await vi.waitFor(() => expect(d.controlPlane.get(second!)?.suspect).toBe(true), WAIT);
      let opened = 0;
      let ready!: () => void;
      const allOpen = new Promise<void>((resolve) => (ready = resolve));
      const running = Promise.all(
        PARAMS.map((p) =>
          stream(p, 1500, async () => {
            if (++opened === PARAMS.length) ready();
            await allOpen;
          }),
        ),
      );
      await allOpen;
      expect(await busyWorker(d, WAIT)).toBe(first);
      pid = d.pids()[first!]!;
      // The streams stay in flight (frozen) until the SIGTERM has arrived.
      process.kill(pid, 'SIGSTOP');
      process.kill(secondPid, 'SIGCONT');
      await vi.waitFor(() => expect(d.controlPlane.get(second!)?.suspect).toBe(false), WAIT);
      process.kill(pid, 'SIGTERM');
      process.kill(pid, 'SIGCONT');
      await vi.waitFor(() => expect(d.controlPlane.get(first!)?.load.draining).toBe(true), WAIT);
      // While it drains, new requests go to the other worker: with the draining one frozen, one still completes.
      process.kill(pid, 'SIGSTOP');
      try {
        const fresh = await client.completions.create({ model: MODEL, prompt: 'new', max_tokens: 8, temperature: 0 });
        expect(fresh.choices[0]!.text.length).toBeGreaterThan(0);
      } finally {
        process.kill(pid, 'SIGCONT');
      }
      outs = await running;
    } finally {
      process.kill(secondPid, 'SIGCONT');
      if (pid) process.kill(pid, 'SIGCONT');
    }
    for (const [i, out] of outs.entries()) {
      expect(out.error).toBeUndefined();
      expect(out.text).toBe(undisturbed[i]!.text);
      expect(out.completionTokens).toBe(undisturbed[i]!.completionTokens);
    }
    // They finished on the draining worker: nothing migrated. Then it exited, and the launcher restarts it.
    expect(await migrated(d)).toBe(before);
    await vi.waitFor(() => expect(d.pids()[first!] ?? pid).not.toBe(pid), WAIT);
    expect(ctx.lines.some((l) => l.includes(`${first} is draining`))).toBe(true);
    expect(ctx.lines.some((l) => l.includes(`[${first}]`) && l.includes('SIGTERM: draining 3 request'))).toBe(true);
  }, 120_000);

  it('a second SIGTERM exits at once; the requests in flight migrate and complete unchanged', async () => {
    const { d } = ctx;
    await allUp(d);
    const undisturbed = await stream(PARAMS[1], 3000);
    await waitIdle(d, WAIT);
    const before = await migrated(d);
    const out = await stream(PARAMS[1], 3000, async () => {
      const name = await busyWorker(d, WAIT);
      const pid = d.pids()[name]!;
      process.kill(pid, 'SIGTERM');
      await vi.waitFor(() => expect(d.controlPlane.get(name)?.load.draining).toBe(true), WAIT);
      process.kill(pid, 'SIGTERM');
      // Gone well before its 30 s drain would end.
      await vi.waitFor(() => expect(d.controlPlane.get(name)?.registration.pid).not.toBe(pid), WAIT);
    });
    expect(out.error).toBeUndefined();
    expect(out.text).toBe(undisturbed.text);
    expect(out.completionTokens).toBe(undisturbed.completionTokens);
    expect(await migrated(d)).toBe(before + 1);
  }, 120_000);
});

describe('drain on SIGTERM past the drain timeout', () => {
  const ctx = setUp({ workerDrainTimeoutMs: 200 });

  it('the worker exits at the timeout; its request migrates and completes unchanged', async () => {
    const { d, client } = ctx;
    await allUp(d);
    const params = { model: MODEL, max_tokens: 3000, ...PARAMS[2] };
    const undisturbed = await streamCompletion(client, params);
    await waitIdle(d, WAIT);
    const before = await migrated(d);
    let name = '';
    const out = await streamCompletion(client, params, async () => {
      name = await busyWorker(d, WAIT);
      process.kill(d.pids()[name]!, 'SIGTERM');
    });
    expect(out.error).toBeUndefined();
    expect(out.text).toBe(undisturbed.text);
    expect(out.completionTokens).toBe(undisturbed.completionTokens);
    expect(await migrated(d)).toBe(before + 1);
    expect(ctx.lines.some((l) => l.includes(`[${name}]`) && l.includes('drain timeout: exiting with 1 request'))).toBe(
      true,
    );
  }, 120_000);
});
