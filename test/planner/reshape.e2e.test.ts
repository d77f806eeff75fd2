/**
 * Re-shaping a CPU decode pool while it serves (issue 27): the local connector turns 2 x TP 1 decode workers into
 * 1 x TP 2 (two rank threads in one worker) and back, while the official openai client streams completions three
 * at a time. Every request completes with the text of an undisturbed run of the same prompts (greedy), none lost:
 * 2 -> 1 retires the old workers by drain; 1 -> 2 stops the TP 2 worker after a drain bound of 1 ms (and the
 * worker's own shutdown drain is 1 ms), so its requests in flight migrate to the new TP 1 workers. Loopback only; a fixed number of requests, every wait bounded.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { LocalConnector, type LocalWorkers } from '../../lib/planner/connectors/index.js';
import { writeProfile } from '../../lib/planner/profile.js';
import type { PlannerStatus } from '../../lib/planner/runtime.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { metric, plannerTestGraph, streamCompletion, type StreamOutcome } from '../helpers/serve.js';
import { syntheticLayout, syntheticProfile } from './synthetic.js';

const MODEL = 'dummy:tiny';
const WAIT = { timeout: 60_000, interval: 20 };
const PROMPTS = Array.from(
  { length: 18 },
  (_, i) => `request ${i}: the decode pool changes its layout while this runs`,
);
const params = (prompt: string) => ({ model: MODEL, prompt, max_tokens: 160, temperature: 0, ignore_eos: true });
const tp = (n: number) => ({ tp: n, pp: 1, ep: 1 });

/**
 * Streams the prompts in turn, three at a time, while `during` runs and at least until each was sent once (at
 * most 240 requests); resolves with each request's outcome (request i is prompt i % PROMPTS.length).
 */
async function streamAll(client: OpenAI, during: () => Promise<unknown> = async () => {}): Promise<StreamOutcome[]> {
  const out: StreamOutcome[] = [];
  let next = 0;
  let done = false;
  const one = async () => {
    while ((next < PROMPTS.length || !done) && next < 240) {
      const i = next++;
      out[i] = await streamCompletion(client, params(PROMPTS[i % PROMPTS.length]!));
    }
  };
  await Promise.all([one(), one(), one(), during().finally(() => (done = true))]);
  return out;
}

/** What each request of `streamed` returns when nothing changes: its prompt's undisturbed text. */
const expected = (streamed: StreamOutcome[], undisturbed: StreamOutcome[]) =>
  streamed.map((_, i) => undisturbed[i % PROMPTS.length]!.text);

async function planner(d: Deployment): Promise<PlannerStatus> {
  return (await (await fetch(`${d.frontend.url}/planner`)).json()) as PlannerStatus;
}

describe('re-shaping a CPU decode pool under streaming load (local connector)', () => {
  let d: Deployment;
  let client: OpenAI;
  let undisturbed: StreamOutcome[];
  const lines: string[] = [];

  beforeAll(async () => {
    const graph = plannerTestGraph();
    graph.frontend.migrationLimit = 3;
    // A worker told to stop lets its requests in flight finish for 1 ms at most, then exits: they migrate.
    d = await startDeployment(graph, { log: (l) => lines.push(l), heartbeatMs: 20, workerDrainTimeoutMs: 1 });
    client = new OpenAI({ baseURL: `${d.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
    undisturbed = await streamAll(client);
    for (const o of undisturbed) expect(o).toMatchObject({ finishReason: 'length', completionTokens: 160 });
  }, 180_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 1000 });
  });

  it('2 x tp1 -> 1 x tp2 by drain: every stream completes with the undisturbed text', async () => {
    const connector = new LocalConnector(d.localWorkers, { drainTimeoutMs: 30_000 });
    expect(connector.layouts().decode).toMatchObject({ layout: 'tp1', parallelism: tp(1) });
    const old = connector
      .layouts()
      .decode.replicas.map((r) => r.name)
      .sort();
    expect(old).toEqual(['decode-0', 'decode-1']);
    let started: string[] = [];
    const streamed = await streamAll(client, async () => {
      await vi.waitFor(() => expect(d.controlPlane.workers('decode').some((w) => w.load.running > 0)).toBe(true), WAIT);
      started = await connector.reshapePool('decode', tp(2), 1);
    });
    expect(streamed.map((o) => o.error?.message)).toEqual(streamed.map(() => undefined));
    expect(streamed.map((o) => o.text)).toEqual(expected(streamed, undisturbed));
    expect(streamed.every((o) => o.finishReason === 'length' && o.completionTokens === 160)).toBe(true);

    expect(started).toEqual(['decode-2']);
    expect(connector.replicas()).toEqual({ prefill: 1, decode: 1 });
    expect(connector.layouts().decode).toEqual({
      layout: 'tp2',
      parallelism: tp(2),
      replicas: [{ name: 'decode-2', layout: 'tp2', parallelism: tp(2) }],
    });
    for (const name of old) expect(d.pids()[name]).toBeUndefined();
    expect(lines.some((l) => /^\[decode-2\] .*open on cpu as tp 2 x pp 1 \(2 ranks/.test(l))).toBe(true);
    // /planner (the planner is off here) shows each replica's layout.
    expect((await planner(d)).layouts.current.decode).toEqual(connector.layouts().decode);
  }, 240_000);

  it('1 x tp2 -> 2 x tp1 with a 1 ms drain: requests in flight migrate, every stream completes with the undisturbed text', async () => {
    // The TP 2 worker is retired while it runs requests: its drain starts once it reports one running.
    const whileBusy: LocalWorkers = {
      ...d.localWorkers,
      drain: async (name, timeoutMs) => {
        await vi.waitFor(() => expect(d.controlPlane.get(name)!.load.running).toBeGreaterThan(0), WAIT);
        return d.localWorkers.drain(name, timeoutMs);
      },
    };
    const connector = new LocalConnector(whileBusy, { drainTimeoutMs: 1 });
    const migrated = () => metric(d, 'tandem_request_migrations_total{outcome="migrated"}');
    const before = (await migrated()) || 0;
    let started: string[] = [];
    const streamed = await streamAll(client, async () => {
      await vi.waitFor(() => expect(d.controlPlane.get('decode-2')!.load.running).toBeGreaterThan(0), WAIT);
      started = await connector.reshapePool('decode', tp(1), 2);
    });
    expect(streamed.map((o) => o.error?.message)).toEqual(streamed.map(() => undefined));
    expect(streamed.map((o) => o.text)).toEqual(expected(streamed, undisturbed));
    expect(streamed.every((o) => o.finishReason === 'length' && o.completionTokens === 160)).toBe(true);
    expect(started.sort()).toEqual(['decode-3', 'decode-4']);
    expect(connector.layouts().decode).toMatchObject({ layout: 'tp1', parallelism: tp(1) });
    expect(connector.replicas()).toEqual({ prefill: 1, decode: 2 });
    expect(d.pids()['decode-2']).toBeUndefined();
    expect(await migrated()).toBeGreaterThan(before);
  }, 240_000);

  it('a layout the model does not take is a typed error before anything changes', async () => {
    const connector = new LocalConnector(d.localWorkers);
    await expect(connector.reshapePool('decode', tp(3), 1)).rejects.toMatchObject({
      code: 'TANDEM_BAD_PARALLEL_LAYOUT',
    });
    expect(connector.layouts().decode).toMatchObject({ layout: 'tp1', replicas: [{}, {}] });
    const last = await streamCompletion(client, params(PROMPTS[0]!));
    expect(last.text).toBe(undisturbed[0]!.text);
  }, 60_000);

  it('the live planner (reshape on) re-shapes the decode pool to tp2 when its profile says so; no request lost', async () => {
    // A profile in which a TP 1 decode step (over 500 ms) never meets the ITL of 50 ms and a TP 2 step does.
    const dir = mkdtempSync(join(tmpdir(), 'tandem-reshape-'));
    const profile = syntheticProfile([
      syntheticLayout({ decodeSpeedup: 0.01 }),
      syntheticLayout({ tp: 2, decodeSpeedup: 10 }),
    ]);
    writeProfile(join(dir, 'p.json'), { ...profile, model: MODEL, device: { kind: 'cpu', name: 'synthetic CPU' } });
    const graph = plannerTestGraph();
    graph.frontend.migrationLimit = 3;
    // Judged every 0.5 s; 3 wins in a row (scaleUpAfterS) re-shape; never scaled down, one change per pool.
    graph.planner = {
      mode: 'load',
      ttftMs: 5000,
      itlMs: 50,
      intervalS: 0.5,
      minReplicas: 1,
      scaleUpAfterS: 1.5,
      scaleDownAfterS: 1_000_000,
      cooldownS: 600,
      profile: join(dir, 'p.json'),
      reshape: true,
    };
    const live = await startDeployment(graph, { log: () => {}, heartbeatMs: 20 });
    try {
      const liveClient = new OpenAI({
        baseURL: `${live.frontend.url}/v1`,
        apiKey: 'none',
        maxRetries: 0,
        timeout: 60_000,
      });
      const before = await planner(live);
      expect(before).toMatchObject({
        mode: 'load',
        reshape: true,
        layouts: { desired: { decode: { layout: 'tp1' } } },
      });
      const streamed = await streamAll(liveClient, () =>
        vi.waitFor(async () => {
          const s = await planner(live);
          expect(s.layouts.current.decode.layout).toBe('tp2');
          expect(s.acting).toBe(false);
        }, WAIT),
      );
      expect(streamed.map((o) => o.error?.message)).toEqual(streamed.map(() => undefined));
      expect(streamed.map((o) => o.text)).toEqual(expected(streamed, undisturbed));
      const status = await planner(live);
      expect(status.replicas.current).toEqual({ prefill: 1, decode: 1 });
      expect(status.layouts.desired!.decode).toEqual({ layout: 'tp2', parallelism: tp(2), gpusPerReplica: 2 });
      const reshape = status.decisions!.find((d) => d.kind === 'load' && d.outputs.action.kind === 'reshape');
      expect(reshape?.reason).toMatch(
        /^re-shape decode from 2 x tp1 to 1 x tp2 \(3 times in a row\): 2 x tp1 serve 0 req\/s/,
      );
      expect(status.actions!.filter((a) => a.action === 'reshape')).toMatchObject([
        { pool: 'decode', layouts: { from: 'tp1', to: 'tp2' }, outcome: 'done' },
      ]);
    } finally {
      await live.stop({ drainMs: 1000 });
      rmSync(dir, { recursive: true, force: true });
    }
  }, 240_000);
});
