/**
 * EPLB settings where users set them (issue 28): a graph pool's `eplb` (validated with the graph's positions and
 * messages, carried by the launcher into the worker's engine), `tandem generate --eplb` (and its --eplb-*
 * options), openModel's `eplb`; and the expert load window the planner sees beside /metrics.
 */
import { describe, expect, it, vi } from 'vitest';
import { openModel } from '../../lib/engine/open.js';
import { CpuModelRunner } from '../../lib/engine/cpu.js';
import { BadArgumentError } from '../../lib/errors.js';
import { DEFAULT_EPLB_POLICY } from '../../lib/moe/index.js';
import { MetricsWindow } from '../../lib/planner/observe.js';
import { GraphError, parseGraph } from '../../lib/deploy/graph.js';
import { workerInit } from '../../lib/deploy/launcher.js';
import { ServeMetrics } from '../../lib/frontend/metrics.js';
import type { FromWorker, WorkerInit } from '../../lib/worker/protocol.js';
import { EmbeddedControlPlane } from '../../lib/control/index.js';
import { openWorker } from '../../lib/worker/worker.js';
import { runTs } from '../helpers/cli.js';

const graphText = (pool: string, model = 'dummy:tiny-moe') => `model: ${model}
mode: agg
pools:
  - name: moe
    role: aggregated
    device: cpu
    expertParallelSize: 2
${pool
  .split('\n')
  .map((l) => `    ${l}`)
  .join('\n')}
`;

const issuesOf = (text: string): string[] => {
  try {
    parseGraph(text, 'g.yaml');
  } catch (e) {
    if (e instanceof GraphError) return e.issues.map((i) => `${i.line}:${i.path}: ${i.message}`);
    throw e;
  }
  return [];
};

describe('graph: a pool eplb setting', () => {
  it('takes the policy defaults and any override, and the launcher hands it to the worker', () => {
    const g = parseGraph(graphText('eplb:\n  windowSteps: 8\n  minImbalanceGain: 0.1'), 'g.yaml');
    const pool = g.pools[0]!;
    expect(pool.eplb).toEqual({ ...DEFAULT_EPLB_POLICY, windowSteps: 8, minImbalanceGain: 0.1 });
    expect(parseGraph(graphText('eplb: {}'), 'g.yaml').pools[0]!.eplb).toEqual(DEFAULT_EPLB_POLICY);
    expect(parseGraph(graphText(''), 'g.yaml').pools[0]!.eplb).toBeUndefined();
    const init = workerInit(g, pool, 0, {});
    expect(init.eplb).toEqual(pool.eplb);
    expect(init.expertParallelSize).toBe(2);
    const staticGraph = parseGraph(graphText(''), 'g.yaml');
    expect(workerInit(staticGraph, staticGraph.pools[0]!, 0, {})).not.toHaveProperty('eplb');
  });

  it('refuses bad settings at their line, naming the field', () => {
    expect(issuesOf(graphText('eplb:\n  windowSteps: 0'))).toEqual([
      '9:pools[0].eplb.windowSteps: must be a positive integer',
    ]);
    expect(issuesOf(graphText('eplb:\n  minImbalanceGain: 1'))).toEqual([
      '9:pools[0].eplb.minImbalanceGain: must be a number in [0, 1)',
    ]);
    expect(issuesOf(graphText('eplb:\n  redundantSlotsPerRank: -1'))).toEqual([
      '9:pools[0].eplb.redundantSlotsPerRank: must be an integer >= 0',
    ]);
    expect(issuesOf(graphText('eplb:\n  redundantSlots: 1'))).toEqual([
      expect.stringMatching(
        /^9:pools\[0\]\.eplb: unknown key 'redundantSlots' \(known: windowSteps, periodSteps, redundantSlotsPerRank, minImbalanceGain\)/,
      ),
    ]);
    expect(issuesOf(graphText('eplb:\n  periodsteps: 4'))).toEqual([
      expect.stringMatching(/unknown key 'periodsteps' \(did you mean 'periodSteps'\?\)/),
    ]);
    expect(issuesOf(graphText('eplb: true'))).toEqual(['8:pools[0].eplb: must be a mapping']);
    // dummy:tiny-moe has 8 experts: at most 8 redundant slots per rank.
    expect(issuesOf(graphText('eplb:\n  redundantSlotsPerRank: 9'))).toEqual([
      "9:pools[0].eplb.redundantSlotsPerRank: must be at most the model's 8 experts (one replica of each per rank)",
    ]);
    expect(issuesOf(graphText('eplb: {}').replace('expertParallelSize: 2', 'expertParallelSize: 1'))).toEqual([
      '8:pools[0].eplb: needs expertParallelSize > 1 (it balances the experts over the expert-parallel ranks)',
    ]);
    // The GPU engine balances its expert-parallel ranks too (lib/engine/cuda-experts.ts).
    expect(issuesOf(graphText('eplb: {}').replace('device: cpu', 'device: cuda'))).toEqual([]);
  });
});

describe('openModel eplb', () => {
  it('opens CPU EP ranks with the balancer of the policy; refuses it without expert parallelism', async () => {
    const policy = { ...DEFAULT_EPLB_POLICY, windowSteps: 2, periodSteps: 2 };
    const opened = await openModel({
      model: 'dummy:tiny-moe',
      device: 'cpu',
      numBlocks: 16,
      expertParallelSize: 2,
      eplb: policy,
    });
    try {
      const runner = opened.runner as CpuModelRunner;
      expect(runner.expertBalancer?.policy).toEqual(policy);
      expect(runner.expertPlacement.slotsPerRank).toBe(4 + 1);
    } finally {
      await opened.dispose();
    }
    const refused = openModel({ model: 'dummy:tiny-moe', device: 'auto', numBlocks: 16, eplb: policy });
    await expect(refused).rejects.toBeInstanceOf(BadArgumentError);
    await expect(refused).rejects.toThrow(/eplb needs a mixture-of-experts model with expert parallelism \(ep > 1\)/);
  });
});

describe('tandem generate --eplb', () => {
  const generate = (...extra: string[]) =>
    runTs('lib/cli/main.ts', [
      'generate',
      ...['--model', 'dummy:tiny-moe', '--prompt', 'experts', '--max-tokens', '10', '--device', 'cpu', '--json'],
      ...extra,
    ]);

  it('balances every step with --eplb-window 1 --eplb-period 1 and gives the tokens of the static placement', () => {
    const plain = generate('--ep', '2');
    expect(plain.status, plain.stderr).toBe(0);
    const r = generate('--ep', '2', '--eplb-window', '1', '--eplb-period', '1', '--eplb-min-gain', '0');
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as {
      tokenIds: number[];
      eplb: { policy: unknown; steps: number; decisions: number; applied: number };
    };
    expect(out.tokenIds).toEqual((JSON.parse(plain.stdout) as { tokenIds: number[] }).tokenIds);
    expect(out.eplb.policy).toEqual({ ...DEFAULT_EPLB_POLICY, windowSteps: 1, periodSteps: 1, minImbalanceGain: 0 });
    // One step per forward pass (the prompt, then each decoded token; the warm-up pass included), one decision each.
    expect(out.eplb.steps).toBeGreaterThanOrEqual(10);
    expect(out.eplb.decisions).toBe(out.eplb.steps);
    expect(JSON.parse(plain.stdout)).not.toHaveProperty('eplb');
  });

  it('refuses --eplb without --ep and bad --eplb-* values, exit status 2', () => {
    const noEp = generate('--eplb');
    expect(noEp.status).toBe(2);
    expect(noEp.stderr).toMatch(/--eplb balances experts over expert-parallel ranks: it needs --ep 2 or more/);
    const bad = generate('--ep', '2', '--eplb-min-gain', '1');
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--eplb-min-gain must be a number in 0\.\.0\.999999 \(got 1\)/);
    const zero = generate('--ep', '2', '--eplb-window', '0');
    expect(zero.status).toBe(2);
    expect(zero.stderr).toMatch(/--eplb-window must be a positive integer \(got 0\)/);
  });
});

describe('a worker with the pool eplb', () => {
  it('opens its engine with the balancer and reports its decisions with the expert load; /metrics counts them', async () => {
    const runOne = async (eplb: WorkerInit['eplb']) => {
      const messages: FromWorker[] = [];
      const controlPlane = new EmbeddedControlPlane(60_000, 120_000);
      const worker = await openWorker(
        {
          ...{ name: 'moe-0', pool: 'moe', role: 'aggregated', model: 'dummy:tiny-moe', device: 'cpu' },
          ...{ seed: 0, blockSize: 16, numBlocks: 32, threads: 2, expertParallelSize: 2, heartbeatMs: 20 },
          ...(eplb ? { eplb } : {}),
        },
        (m) => messages.push(m),
        controlPlane,
      );
      try {
        const prompt = Array.from({ length: 9 }, (_, i) => (i * 29 + 3) % 256);
        worker.handle({
          type: 'generate',
          requestId: 'r1',
          promptIds: prompt,
          sampling: { temperature: 0, maxTokens: 6, minTokens: 6 },
          prefill: null,
        });
        // Until a heartbeat after the request's end: its report holds every pass of it.
        await vi.waitFor(
          () => {
            const done = messages.findIndex((m) => m.type === 'tokens' && m.finishReason !== null);
            expect(done).toBeGreaterThanOrEqual(0);
            expect(messages.slice(done).some((m) => m.type === 'heartbeat')).toBe(true);
          },
          { timeout: 30_000, interval: 20 },
        );
      } finally {
        await worker.dispose();
        await controlPlane.close();
      }
      const reports = messages.flatMap((m) => (m.type === 'heartbeat' && m.expertLoad ? [m.expertLoad] : []));
      return reports.at(-1)!;
    };
    const balanced = await runOne({ windowSteps: 1, periodSteps: 1, redundantSlotsPerRank: 1, minImbalanceGain: 0 });
    // One decision per forward pass (prefill, then one per decoded token), whatever each decided.
    expect(balanced.eplb!.decisions).toBeGreaterThanOrEqual(6);
    expect(balanced.eplb!.applied).toBeLessThanOrEqual(balanced.eplb!.decisions);
    expect(await runOne(undefined)).not.toHaveProperty('eplb');

    const metrics = new ServeMetrics();
    metrics.expertLoad('moe-0', balanced);
    metrics.expertLoad('moe-0', {
      ...balanced,
      eplb: { decisions: balanced.eplb!.decisions + 3, applied: balanced.eplb!.applied + 1 },
    });
    const text = await metrics.text();
    const count = (applied: string) =>
      Number(
        text.match(
          new RegExp(`^tandem_moe_eplb_decisions_total\\{worker="moe-0",applied="${applied}"\\} (\\d+)$`, 'm'),
        )?.[1] ?? 0,
      );
    expect(count('true')).toBe(balanced.eplb!.applied + 1);
    expect(count('true') + count('false')).toBe(balanced.eplb!.decisions + 3);
  }, 60_000);
});

describe('the planner sees the expert load', () => {
  it("MetricsWindow carries each MoE worker's per-layer imbalance and the interval's tokens routed", async () => {
    const metrics = new ServeMetrics();
    let now = 0;
    const window = new MetricsWindow(
      () => metrics.plannerReadings(),
      () => ({}),
      () => now,
    );
    await window.start();
    metrics.expertLoad('decode-0', { imbalance: [1.5, 2], tokensRouted: 40 });
    now = 1000;
    const first = await window.next();
    expect(first.expertLoad).toEqual({ 'decode-0': { imbalance: [1.5, 2], tokensRouted: 40 } });
    metrics.expertLoad('decode-0', { imbalance: [1.25, 1.5], tokensRouted: 100 });
    now = 2000;
    expect((await window.next()).expertLoad).toEqual({ 'decode-0': { imbalance: [1.25, 1.5], tokensRouted: 60 } });
    // A restarted worker (a smaller cumulative count) counts from zero; a worker that left is gone.
    metrics.expertLoad('decode-0', { imbalance: [1, 1], tokensRouted: 8 });
    now = 3000;
    expect((await window.next()).expertLoad['decode-0']!.tokensRouted).toBe(8);
    metrics.dropWorker('decode-0');
    now = 4000;
    expect((await window.next()).expertLoad).toEqual({});
  });
});
