import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { LoadDecision } from '../../lib/planner/planner.js';
import type { PlannerStatus } from '../../lib/planner/runtime.js';
import type { DeploymentGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { METRIC_NAMES } from '../../lib/frontend/metrics.js';
import { metric, plannerTestGraph } from '../helpers/serve.js';

// The planner in mode load on CPU workers, facing a synthetic overload: a TTFT SLA of 1 microsecond that every
// request misses, an ITL SLA every request meets by far. The GPU budget (by default the graph's 3 workers) is
// full, so the planner moves a decode worker to prefill; the decision, its inputs and the action show in
// /planner, /metrics and the log, and no request fails. Bounded: a fixed number of requests, waits with timeouts.
const MODEL = 'dummy:tiny';
const WAIT = { timeout: 60_000, interval: 25 };

function graph(): DeploymentGraph {
  const g = plannerTestGraph();
  // The graph's correction knobs (what launcher.ts hands the runtime): react on the first missed interval; never
  // scale down here; one change per pool in this test.
  g.planner = {
    mode: 'load',
    ttftMs: 0.001,
    itlMs: 100_000,
    intervalS: 0.2,
    minReplicas: 1,
    scaleUpAfterS: 0.2,
    scaleDownAfterS: 1_000_000,
    cooldownS: 600,
  };
  return g;
}

describe('planner, mode load (CPU workers)', () => {
  let d: Deployment;
  let client: OpenAI;
  const lines: string[] = [];

  beforeAll(async () => {
    d = await startDeployment(graph(), {
      log: (l) => lines.push(l),
      heartbeatMs: 20,
    });
    client = new OpenAI({ baseURL: `${d.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 1000 });
  });

  it('moves a decode worker to prefill when prefill misses its TTFT; /planner and /metrics show it', async () => {
    const status0 = (await (await fetch(`${d.frontend.url}/planner`)).json()) as PlannerStatus;
    expect(status0).toMatchObject({
      mode: 'load',
      connector: 'local',
      slas: { ttftMs: 0.001, itlMs: 100_000 },
      maxGpus: 3,
      replicas: { current: { prefill: 1, decode: 2 }, desired: { prefill: 1, decode: 2 } },
    });
    expect(await metric(d, `${METRIC_NAMES.plannerDesiredReplicas}{pool="prefill"}`)).toBe(1);

    const failures: string[] = [];
    let sent = 0;
    const moved = () => d.planner!.status().actions?.some((a) => a.action === 'move' && a.outcome === 'done');
    const stream = async () => {
      // Until the move is done (at most 200 requests): the planner needs traffic to see the TTFT.
      while (!moved() && sent < 200) {
        const i = sent++;
        try {
          const r = await client.completions.create({ model: MODEL, prompt: `overload ${i}`, max_tokens: 16 });
          if (!r.choices[0]?.finish_reason) failures.push(`request ${i}: no finish reason`);
        } catch (error) {
          failures.push(`request ${i}: ${(error as Error).message}`);
        }
      }
    };
    await Promise.all([stream(), stream()]);
    expect(failures).toEqual([]);
    await vi.waitFor(() => expect(moved()).toBe(true), WAIT);

    const status = (await (await fetch(`${d.frontend.url}/planner`)).json()) as PlannerStatus;
    expect(status.replicas).toEqual({ current: { prefill: 2, decode: 1 }, desired: { prefill: 2, decode: 1 } });
    const decision = status.decisions!.find(
      (x) => x.kind === 'load' && (x as LoadDecision).outputs.action.kind === 'move',
    ) as LoadDecision & { window: { ttftMs: number; seconds: number; kvUsage: Record<string, number> } };
    expect(decision.outputs.action).toEqual({ kind: 'move', from: 'decode', to: 'prefill' });
    // Its inputs: the interval's TTFT (over the SLA), and the metrics window it came from.
    expect(decision.inputs.prefillTtftMs[0]).toBeGreaterThan(0.001);
    expect(decision.window.ttftMs).toBe(decision.inputs.prefillTtftMs[0]);
    expect(decision.window.seconds).toBeGreaterThan(0);
    expect(Object.keys(decision.window.kvUsage).sort()).toEqual(['decode-0', 'decode-1', 'prefill-0']);
    expect(decision.reason).toMatch(/every prefill engine missed its TTFT/);
    // The graph's scaleUpAfterS (one interval) holds: the move came on the first interval that missed.
    const missedBefore = status.decisions!.filter(
      (x) => x.id < decision.id && x.kind === 'load' && (x as LoadDecision).outputs.pools.prefill.verdict === 'miss',
    );
    expect(missedBefore).toEqual([]);
    const action = status.actions!.find((a) => a.decision === decision.id)!;
    expect(action).toMatchObject({ action: 'move', from: 'decode', to: 'prefill', outcome: 'done' });
    expect(d.controlPlane.get(action.worker!)?.registration.role).toBe('prefill');

    expect(await metric(d, `${METRIC_NAMES.plannerDecisions}{kind="load",action="move"}`)).toBe(1);
    expect(await metric(d, `${METRIC_NAMES.plannerActions}{action="move",outcome="done"}`)).toBe(1);
    expect(await metric(d, `${METRIC_NAMES.plannerDesiredReplicas}{pool="prefill"}`)).toBe(2);
    expect(await metric(d, `${METRIC_NAMES.plannerReplicas}{pool="decode"}`)).toBe(1);
    if (process.env.TANDEM_TEST_LOG)
      console.log(lines.filter((l) => l.startsWith('[planner]') || l.includes('planner:')).join('\n'));
    expect(
      lines.some((l) => l.startsWith(`[planner] decision #${decision.id} load move:`) && l.includes('inputs')),
    ).toBe(true);

    // The deployment serves on after the move.
    const after = await client.completions.create({ model: MODEL, prompt: 'after the move', max_tokens: 8 });
    expect(after.choices[0]?.finish_reason).toBeTruthy();
  }, 180_000);

  it('mode sla with a profile that cannot be read fails the start before any process starts', async () => {
    const g = graph();
    g.planner = { ...g.planner, mode: 'sla', profile: '/nonexistent/tandem-profile.json' };
    const log: string[] = [];
    await expect(startDeployment(g, { log: (l) => log.push(l) })).rejects.toMatchObject({
      code: 'TANDEM_BAD_PROFILE',
      message: expect.stringContaining('/nonexistent/tandem-profile.json'),
    });
    expect(log.some((l) => l.includes('starting'))).toBe(false);
  });
});
