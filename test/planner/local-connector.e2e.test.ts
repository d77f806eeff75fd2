import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { LocalConnector } from '../../lib/planner/connectors/index.js';
import type { PlannerStatus } from '../../lib/planner/runtime.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { metric, plannerTestGraph } from '../helpers/serve.js';

// The local connector on CPU workers under a steady stream of requests (official openai client, loopback): a
// decode worker drained and switched to prefill in place (same process: no weights reloaded), a worker added,
// one drained and stopped; not one request fails. Bounded: a fixed number of requests per phase, every wait
// with a timeout, the deployment stopped at the end.
const MODEL = 'dummy:tiny';
const WAIT = { timeout: 60_000, interval: 20 };

async function planner(d: Deployment): Promise<PlannerStatus> {
  const res = await fetch(`${d.frontend.url}/planner`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toBe('application/json');
  return (await res.json()) as PlannerStatus;
}

/**
 * Sends completions, three at a time, while `during` runs and until at least `count` were sent (at most 500);
 * resolves with how many were sent, how many completed, and the failures (none expected).
 */
async function steadyStream(
  client: OpenAI,
  count: number,
  during: () => Promise<unknown>,
): Promise<{ sent: number; ok: number; failures: string[] }> {
  const failures: string[] = [];
  let ok = 0;
  let next = 0;
  let done = false;
  const one = async (): Promise<void> => {
    while ((next < count || !done) && next < 500) {
      const i = next++;
      try {
        const r = await client.completions.create({
          model: MODEL,
          prompt: `request ${i}: the planner moves workers between pools while this runs`,
          max_tokens: 48,
          temperature: 0,
        });
        if (r.choices[0]?.finish_reason && (r.usage?.completion_tokens ?? 0) > 0) ok++;
        else failures.push(`request ${i}: ${JSON.stringify(r)}`);
      } catch (error) {
        failures.push(`request ${i}: ${(error as Error).message}`);
      }
    }
  };
  await Promise.all([one(), one(), one(), during().finally(() => (done = true))]);
  return { sent: next, ok, failures };
}

describe('local connector (CPU workers, requests streaming)', () => {
  let d: Deployment;
  let client: OpenAI;
  const lines: string[] = [];

  beforeAll(async () => {
    d = await startDeployment(plannerTestGraph(), { log: (l) => lines.push(l), heartbeatMs: 20 });
    client = new OpenAI({ baseURL: `${d.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 1000 });
  });

  it('GET /planner with the planner off: the mode and the pools as they are', async () => {
    expect(d.planner).toBeUndefined();
    const off = await planner(d);
    expect(off).toMatchObject({ mode: 'off', replicas: { current: { prefill: 1, decode: 2 } } });
    // Each replica's layout, in \`tandem plan\`'s vocabulary.
    const tp1 = { tp: 1, pp: 1, ep: 1 };
    expect(off.layouts.current.prefill).toEqual({
      layout: 'tp1',
      parallelism: tp1,
      replicas: [{ name: 'prefill-0', layout: 'tp1', parallelism: tp1 }],
    });
    expect(off.layouts.current.decode.replicas.map((r) => r.name).sort()).toEqual(['decode-0', 'decode-1']);
    const res = await fetch(`${d.frontend.url}/planner`, { method: 'POST' });
    expect(res.status).toBe(405);
  });

  it('moves a decode worker to prefill in place, under load, with no request failing', async () => {
    const connector = new LocalConnector(d.localWorkers, { drainTimeoutMs: 30_000 });
    expect(connector.replicas()).toEqual({ prefill: 1, decode: 2 });
    const pidsBefore = d.pids();
    let moved = '';
    const remoteBefore = await metric(d, 'tandem_prefills_total{where="remote"}');
    const { sent, ok, failures } = await steadyStream(client, 24, async () => {
      // Requests are in flight when the move starts.
      await vi.waitFor(() => expect(d.controlPlane.workers().some((w) => w.load.running > 0)).toBe(true), WAIT);
      moved = await connector.moveReplica('decode', 'prefill');
    });
    expect(failures).toEqual([]);
    expect(ok).toBe(sent);
    expect(moved).toMatch(/^decode-[01]$/);
    expect(connector.replicas()).toEqual({ prefill: 2, decode: 1 });
    expect(d.controlPlane.get(moved)?.registration.role).toBe('prefill');
    // The same process: its engine, weights and KV pool stayed.
    expect(d.pids()[moved]).toBe(pidsBefore[moved]);
    expect(await planner(d)).toMatchObject({ mode: 'off', replicas: { current: { prefill: 2, decode: 1 } } });

    // It serves prefills now: with one decode worker left, requests spread over two prefill workers.
    const served = await steadyStream(client, 12, async () => {});
    expect(served.failures).toEqual([]);
    await vi.waitFor(
      async () => expect(await metric(d, 'tandem_prefills_total{where="remote"}')).toBeGreaterThan(remoteBefore),
      WAIT,
    );
    expect(lines.some((l) => l.includes(`${moved} registered (prefill`))).toBe(true);
  }, 180_000);

  it('a drain given up: the worker is routed to again and takes remote prefills again', async () => {
    const w = d.localWorkers;
    const [p, other] = w.serving('prefill');
    expect(other).toBeDefined();
    expect(await w.drain(p!, 30_000)).toBe(true);
    expect(w.serving('prefill')).toEqual([other]);
    w.undrain(p!);
    expect(w.serving('prefill').sort()).toEqual([p, other].sort());
    // The other prefill worker drained: every remote prefill has to be p's.
    expect(await w.drain(other!, 30_000)).toBe(true);
    try {
      const remote = () => metric(d, 'tandem_prefills_total{where="remote"}');
      const local = () => metric(d, 'tandem_prefills_total{where="local"}');
      const before = await remote();
      const localBefore = await local();
      for (let i = 0; i < 4; i++) {
        const r = await client.completions.create({
          model: MODEL,
          prompt: `undrained ${i}: a prompt for the prefill worker that was drained and then undrained`,
          max_tokens: 4,
        });
        expect(r.choices[0]?.finish_reason).toBeTruthy();
      }
      // A remote prefill is counted when the prefill worker's prefillDone reaches the router, on that worker's
      // channel: it can come after the response has ended (test/serve/e2e.test.ts). None was prefilled locally.
      await vi.waitFor(async () => expect(await remote()).toBe(before + 4), WAIT);
      expect(await local()).toBe(localBefore);
    } finally {
      w.undrain(other!);
    }
  }, 120_000);

  it('adds a decode worker, drains and stops a prefill and a decode worker, under load, with no request failing', async () => {
    const connector = new LocalConnector(d.localWorkers, { drainTimeoutMs: 30_000 });
    let added = '';
    const removed: string[] = [];
    const { sent, ok, failures } = await steadyStream(client, 36, async () => {
      added = await connector.addReplica('decode');
      removed.push(await connector.removeReplica('prefill'));
      removed.push(await connector.removeReplica('decode'));
    });
    expect(failures).toEqual([]);
    expect(ok).toBe(sent);
    expect(added).toBe('decode-2');
    expect(connector.replicas()).toEqual({ prefill: 1, decode: 1 });
    for (const name of removed) {
      expect(d.pids()[name]).toBeUndefined();
      expect(d.controlPlane.get(name)).toBeUndefined();
    }
    // The last replica of a pool is never taken.
    await expect(connector.removeReplica('prefill')).rejects.toMatchObject({ code: 'TANDEM_PLANNER_ACTION_FAILED' });
    await expect(connector.moveReplica('decode', 'prefill')).rejects.toThrow(/it has 1 serving/);
    const last = await client.completions.create({ model: MODEL, prompt: 'after the moves', max_tokens: 8 });
    expect(last.choices[0]?.finish_reason).toBeTruthy();
  }, 240_000);
});
