import { describe, expect, it, vi } from 'vitest';
import {
  PlannerActionError,
  poolLayout,
  replicaLayout,
  type PlannerConnector,
  type PoolLayout,
} from '../../lib/planner/connectors/index.js';
import { ReshapeUnsupportedError } from '../../lib/planner/errors.js';
import { layoutName, type Parallelism } from '../../lib/planner/profile.js';
import { MetricsWindow } from '../../lib/planner/observe.js';
import { PlannerRuntime } from '../../lib/planner/runtime.js';
import type { Pool } from '../../lib/planner/load-correction.js';
import { METRIC_NAMES, ServeMetrics, type PlannerReadings } from '../../lib/frontend/metrics.js';
import { sample } from '../helpers/serve.js';
import { parseGraph } from '../../lib/deploy/graph.js';
import { correctionOptions } from '../../lib/planner/spec.js';
import { syntheticLayout, syntheticProfile } from './synthetic.js';

// The planner runtime without processes: what it observes (ServeMetrics differenced per interval), what it
// decides and how it brings a connector's pools there, one action at a time; a failed action leaves the planner
// counting from the pools as they are.

/** A connector over counters; `fail` makes the named actions reject. */
class FakeConnector implements PlannerConnector {
  readonly kind = 'fake';
  readonly calls: string[] = [];
  constructor(
    readonly pools: Record<Pool, number>,
    private readonly fail: ReadonlySet<string> = new Set(),
  ) {}
  replicas() {
    return { ...this.pools };
  }
  private async act(what: string, change: () => void): Promise<string> {
    this.calls.push(what);
    await new Promise((r) => setTimeout(r, 1));
    if (this.fail.has(what.split(' ')[0]!)) throw new Error(`${what} refused`);
    change();
    return `w${this.calls.length}`;
  }
  addReplica(pool: Pool) {
    return this.act(`add ${pool}`, () => this.pools[pool]++);
  }
  removeReplica(pool: Pool) {
    return this.act(`remove ${pool}`, () => this.pools[pool]--);
  }
  moveReplica(from: Pool, to: Pool) {
    return this.act(`move ${from} ${to}`, () => {
      this.pools[from]--;
      this.pools[to]++;
    });
  }
  /** The layout each pool's replicas run. */
  readonly shapes: Record<Pool, Parallelism> = { prefill: { tp: 1, pp: 1, ep: 1 }, decode: { tp: 1, pp: 1, ep: 1 } };
  layouts(): Record<Pool, PoolLayout> {
    const of = (pool: Pool) =>
      poolLayout(Array.from({ length: this.pools[pool] }, (_, i) => replicaLayout(`${pool}-${i}`, this.shapes[pool])));
    return { prefill: of('prefill'), decode: of('decode') };
  }
  async reshapePool(pool: Pool, parallelism: Parallelism, replicas: number) {
    if (this.fail.has('reshape')) {
      this.calls.push(`reshape ${pool}`);
      throw new ReshapeUnsupportedError(`the fake connector does not re-shape ${pool}`);
    }
    return [
      await this.act(`reshape ${pool} ${layoutName(parallelism)} x${replicas}`, () => {
        this.shapes[pool] = parallelism;
        this.pools[pool] = replicas;
      }),
    ];
  }
}

/** Readings that grow by `perTick` finished requests of the given shape each time they are read. */
function growingReadings(perTick: { requests: number; isl: number; osl: number; ttftS: number; itlS: number }) {
  const r: PlannerReadings = {
    finished: 0,
    inputTokens: 0,
    outputTokens: 0,
    ttftSeconds: { sum: 0, count: 0 },
    itlSeconds: { sum: 0, count: 0 },
    queued: 0,
    prefillQueue: 0,
  };
  return async (): Promise<PlannerReadings> => {
    const n = perTick.requests;
    r.finished += n;
    r.inputTokens += n * perTick.isl;
    r.outputTokens += n * perTick.osl;
    r.ttftSeconds = { sum: r.ttftSeconds.sum + n * perTick.ttftS, count: r.ttftSeconds.count + n };
    r.itlSeconds = { sum: r.itlSeconds.sum + n * perTick.itlS, count: r.itlSeconds.count + n };
    return structuredClone(r);
  };
}

describe('MetricsWindow', () => {
  it("differences ServeMetrics' totals: rate, ISL, OSL, mean TTFT and ITL per interval; a quiet one keeps the lengths", async () => {
    const metrics = new ServeMetrics();
    let now = 0;
    const w = new MetricsWindow(
      () => metrics.plannerReadings(),
      () => ({ 'decode-0': 0.25 }),
      () => now,
    );
    metrics.requestStarted(); // counted before the window starts: not part of it
    metrics.firstToken('m', 9);
    metrics.tokens('m', 1000, 1000);
    metrics.requestFinished('m', 10, true);
    await w.start();
    for (const [ttft, itl] of [
      [0.1, 0.01],
      [0.3, 0.03],
    ]) {
      metrics.requestStarted();
      metrics.firstToken('m', ttft!);
      metrics.interToken('m', itl!);
      metrics.tokens('m', 100, 10);
      metrics.requestFinished('m', 1, true);
    }
    metrics.requestStarted(); // still waiting for its first token
    now = 2000;
    const a = await w.next();
    expect(a.seconds).toBe(2);
    expect(a.requests).toBe(2);
    expect(a.rate).toBe(1);
    expect(a.isl).toBe(100);
    expect(a.osl).toBe(10);
    expect(a.ttftMs).toBeCloseTo(200, 9);
    expect(a.itlMs).toBeCloseTo(20, 9);
    expect(a.queued).toBe(1);
    expect(a.kvUsage).toEqual({ 'decode-0': 0.25 });
    now = 3000;
    const b = await w.next();
    expect(b).toMatchObject({ seconds: 1, requests: 0, rate: 0, isl: 100, osl: 10, ttftMs: null, itlMs: null });
  });
});

describe('PlannerRuntime', () => {
  it('mode sla: a plan from the profile each interval, the pools brought to it one action at a time', async () => {
    const connector = new FakeConnector({ prefill: 1, decode: 1 });
    const metrics = new ServeMetrics();
    let now = 0;
    const log: string[] = [];
    const runtime = new PlannerRuntime({
      mode: 'sla',
      ttftMs: 500,
      itlMs: 30,
      intervalS: 60,
      minReplicas: 1,
      maxGpus: 16,
      profile: syntheticProfile(),
      connector,
      window: () =>
        new MetricsWindow(
          growingReadings({ requests: 60 * 20, isl: 1024, osl: 256, ttftS: 0.1, itlS: 0.01 }),
          () => ({}),
          () => now,
        ),
      metrics,
      log: (l) => log.push(l),
      now: () => now,
    });
    await runtime.start();
    now = 60_000;
    const decision = await runtime.tick();
    expect(decision?.kind).toBe('sla');
    if (decision?.kind !== 'sla') return;
    expect(decision.inputs.observed).toEqual({ rate: 20, isl: 1024, osl: 256 });
    const want = decision.outputs.replicas;
    expect(want.prefill + want.decode).toBeGreaterThan(2);
    await vi.waitFor(() => expect(runtime.status().acting).toBe(false));
    expect(connector.replicas()).toEqual(want);
    // Both pools grew: adds only, one per missing replica.
    expect(connector.calls.every((c) => c.startsWith('add'))).toBe(true);
    expect(connector.calls).toHaveLength(want.prefill + want.decode - 2);
    const text = await metrics.text();
    expect(sample(text, `${METRIC_NAMES.plannerDecisions}{kind="sla",action="plan"}`)).toBe(1);
    expect(sample(text, `${METRIC_NAMES.plannerDesiredReplicas}{pool="decode"}`)).toBe(want.decode);
    expect(sample(text, `${METRIC_NAMES.plannerReplicas}{pool="decode"}`)).toBe(want.decode);
    expect(sample(text, `${METRIC_NAMES.plannerActions}{action="add",outcome="done"}`)).toBe(connector.calls.length);
    expect(log.some((l) => l.startsWith('decision #1 sla plan:') && l.includes('"rate":20'))).toBe(true);
    // Between intervals: load-based corrections.
    now = 65_000;
    expect((await runtime.tick())?.kind).toBe('load');
    await runtime.stop();
  });

  it('a failed action is recorded and the planner counts from the pools as they are', async () => {
    const connector = new FakeConnector({ prefill: 1, decode: 2 }, new Set(['move']));
    const metrics = new ServeMetrics();
    let now = 0;
    const runtime = new PlannerRuntime({
      mode: 'load',
      ttftMs: 50,
      itlMs: 1000,
      intervalS: 1,
      minReplicas: 1,
      maxGpus: 3,
      connector,
      // TTFT 200 ms: prefill misses; ITL 10 ms: decode well inside.
      window: () =>
        new MetricsWindow(
          growingReadings({ requests: 5, isl: 64, osl: 8, ttftS: 0.2, itlS: 0.01 }),
          () => ({}),
          () => now,
        ),
      metrics,
      correction: { scaleUpAfter: 2, scaleDownAfter: 100, cooldownMs: 0 },
      now: () => now,
    });
    await runtime.start();
    now = 1000;
    const first = await runtime.tick();
    expect(first?.kind === 'load' && first.outputs.action.kind).toBe('hold'); // one miss: not yet
    now = 2000;
    const second = await runtime.tick();
    expect(second?.kind === 'load' && second.outputs.action).toEqual({ kind: 'move', from: 'decode', to: 'prefill' });
    await vi.waitFor(() => expect(runtime.status().acting).toBe(false));
    const status = runtime.status();
    expect(status.actions).toMatchObject([
      {
        decision: second!.id,
        action: 'move',
        from: 'decode',
        to: 'prefill',
        outcome: 'failed',
        error: 'move decode prefill refused',
      },
    ]);
    expect(status.replicas).toEqual({ current: { prefill: 1, decode: 2 }, desired: { prefill: 1, decode: 2 } });
    expect(sample(await metrics.text(), `${METRIC_NAMES.plannerActions}{action="move",outcome="failed"}`)).toBe(1);
    await runtime.stop();
  });

  /**
   * Mode load every second for two simulated minutes against a noisy TTFT (around 1.3 x the SLA, now and then
   * under it), the correction knobs from a graph. Returns the decision (= second) of each action.
   */
  async function noisyRun(knobs: string): Promise<number[]> {
    const planner = parseGraph(
      `model: dummy:tiny\npools:\n  - {name: prefill, role: prefill, device: cpu}\n  - {name: decode, role: decode, device: cpu}\n` +
        `planner:\n  mode: load\n  ttftMs: 100\n  itlMs: 50\n  intervalS: 1\n  maxGpus: 64\n${knobs}`,
    ).planner;
    const connector = new FakeConnector({ prefill: 1, decode: 1 });
    let now = 0;
    let seed = 7;
    const random = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    const readings: PlannerReadings = {
      finished: 0,
      inputTokens: 0,
      outputTokens: 0,
      ttftSeconds: { sum: 0, count: 0 },
      itlSeconds: { sum: 0, count: 0 },
      queued: 0,
      prefillQueue: 0,
    };
    const runtime = new PlannerRuntime({
      mode: planner.mode as 'load',
      ttftMs: planner.ttftMs!,
      itlMs: planner.itlMs!,
      intervalS: planner.intervalS,
      minReplicas: planner.minReplicas,
      maxGpus: planner.maxGpus!,
      connector,
      window: () =>
        new MetricsWindow(
          async () => {
            // One request a tick: TTFT 0.13 s +- 0.06 s (the SLA is 0.1 s); ITL 20 ms (neither here nor there).
            readings.finished++;
            readings.ttftSeconds = {
              sum: readings.ttftSeconds.sum + 0.13 + 0.06 * (2 * random() - 1),
              count: readings.ttftSeconds.count + 1,
            };
            readings.itlSeconds = { sum: readings.itlSeconds.sum + 0.02, count: readings.itlSeconds.count + 1 };
            return structuredClone(readings);
          },
          () => ({}),
          () => now,
        ),
      correction: correctionOptions(planner),
      now: () => now,
    });
    await runtime.start();
    for (let t = 1; t <= 120; t++) {
      now = t * 1000;
      await runtime.tick();
      await vi.waitFor(() => expect(runtime.status().acting).toBe(false));
    }
    await runtime.stop();
    // Mode load decides once a tick, so a decision's id is the tick (second) it was made in.
    return runtime.status().actions!.map((a) => a.decision);
  }

  it("the graph's cool-down and scale-up knobs are respected against a noisy load: no change inside the cool-down", async () => {
    const decisionsAt = await noisyRun('  scaleUpAfterS: 2\n  cooldownS: 30\n');
    // Decision ids are one per tick (1 s apart): actions at least 30 ticks apart.
    expect(decisionsAt.length).toBeGreaterThanOrEqual(2);
    expect(decisionsAt.length).toBeLessThanOrEqual(4);
    for (let i = 1; i < decisionsAt.length; i++)
      expect(decisionsAt[i]! - decisionsAt[i - 1]!, JSON.stringify(decisionsAt)).toBeGreaterThanOrEqual(30);
    // The same load with no cool-down and a one-second streak adds replicas far more often (the knobs bite).
    const eager = await noisyRun('  scaleUpAfterS: 1\n  cooldownS: 0\n');
    expect(eager.length).toBeGreaterThan(3 * decisionsAt.length);
  });

  it('a connector that can change outside the planner is read again each tick; an unchanged one keeps the streaks', async () => {
    class Refreshing extends FakeConnector {
      refreshes = 0;
      external?: Record<Pool, number>;
      async refresh() {
        this.refreshes++;
        if (this.external) Object.assign(this.pools, this.external);
        this.external = undefined;
      }
    }
    const connector = new Refreshing({ prefill: 1, decode: 1 });
    let now = 0;
    const log: string[] = [];
    const runtime = new PlannerRuntime({
      mode: 'load',
      ttftMs: 50,
      itlMs: 1000,
      intervalS: 1,
      minReplicas: 1,
      maxGpus: 8,
      connector,
      window: () =>
        new MetricsWindow(
          growingReadings({ requests: 5, isl: 64, osl: 8, ttftS: 0.2, itlS: 0.3 }),
          () => ({}),
          () => now,
        ),
      correction: { scaleUpAfter: 2, scaleDownAfter: 100, cooldownMs: 0 },
      log: (l) => log.push(l),
      now: () => now,
    });
    await runtime.start();
    now = 1000;
    expect((await runtime.tick())?.kind).toBe('load'); // one miss
    now = 2000;
    const second = await runtime.tick(); // the second miss in a row: the streak survived the refresh
    expect(second?.kind === 'load' && second.outputs.action).toEqual({ kind: 'add', pool: 'prefill' });
    await vi.waitFor(() => expect(runtime.status().acting).toBe(false));
    expect(connector.refreshes).toBe(2);
    // Someone scales decode to 3 by hand: the next tick counts from there.
    connector.external = { prefill: 2, decode: 3 };
    now = 3000;
    await runtime.tick();
    expect(runtime.status().replicas.desired).toEqual({ prefill: 2, decode: 3 });
    expect(log).toContain('pools changed outside the planner: prefill 2, decode 3');
    await runtime.stop();
  });

  describe('re-shaping (reshape on, the profile: TP 1 misses the ITL at long contexts, TP 2 meets it)', () => {
    const profile = syntheticProfile([
      syntheticLayout(),
      syntheticLayout({ tp: 2, speedup: 1.8, decodeSpeedup: 1.05 }),
    ]);
    const longPrompts = () => growingReadings({ requests: 1, isl: 8000, osl: 256, ttftS: 1.4, itlS: 0.005 });
    const runtimeOf = (connector: FakeConnector, metrics?: ServeMetrics, log?: string[]) => {
      let now = 0;
      const runtime = new PlannerRuntime({
        mode: 'load',
        ttftMs: 2000,
        itlMs: 6.5,
        intervalS: 1,
        minReplicas: 1,
        maxGpus: 3,
        profile,
        reshape: true,
        connector,
        window: () =>
          new MetricsWindow(
            longPrompts(),
            () => ({}),
            () => now,
          ),
        ...(metrics ? { metrics } : {}),
        correction: { cooldownMs: 30_000 },
        ...(log ? { log: (l: string) => log.push(l) } : {}),
        now: () => now,
      });
      return { runtime, at: (ms: number) => (now = ms) };
    };

    it('the connector re-shapes decode 2 x tp1 -> 1 x tp2; /planner shows the layouts, /metrics the action', async () => {
      const connector = new FakeConnector({ prefill: 1, decode: 2 });
      const metrics = new ServeMetrics();
      const log: string[] = [];
      const { runtime, at } = runtimeOf(connector, metrics, log);
      const before = runtime.status();
      expect(before.reshape).toBe(true);
      expect(before.layouts.current.decode).toEqual({
        layout: 'tp1',
        parallelism: { tp: 1, pp: 1, ep: 1 },
        replicas: [
          { name: 'decode-0', layout: 'tp1', parallelism: { tp: 1, pp: 1, ep: 1 } },
          { name: 'decode-1', layout: 'tp1', parallelism: { tp: 1, pp: 1, ep: 1 } },
        ],
      });
      expect(before.layouts.desired!.decode).toEqual({
        layout: 'tp1',
        parallelism: { tp: 1, pp: 1, ep: 1 },
        gpusPerReplica: 1,
      });
      await runtime.start();
      let third;
      for (const t of [1000, 2000, 3000]) {
        at(t);
        third = await runtime.tick();
      }
      expect(third?.kind === 'load' && third.outputs.action).toEqual({
        kind: 'reshape',
        pool: 'decode',
        from: 'tp1',
        to: 'tp2',
        replicas: 1,
      });
      expect(third!.inputs).toMatchObject({
        load: { rate: 1, isl: 8000, osl: 256 },
        layouts: { decode: { layout: 'tp1' } },
      });
      await vi.waitFor(() => expect(runtime.status().acting).toBe(false));
      expect(connector.calls).toEqual(['reshape decode tp2 x1']);
      const status = runtime.status();
      expect(status.replicas).toEqual({ current: { prefill: 1, decode: 1 }, desired: { prefill: 1, decode: 1 } });
      expect(status.layouts.current.decode.layout).toBe('tp2');
      expect(status.layouts.desired!.decode).toMatchObject({ layout: 'tp2', gpusPerReplica: 2 });
      expect(status.actions!.at(-1)).toMatchObject({
        action: 'reshape',
        pool: 'decode',
        layouts: { from: 'tp1', to: 'tp2' },
        workers: ['w1'],
        outcome: 'done',
      });
      const text = await metrics.text();
      expect(sample(text, `${METRIC_NAMES.plannerDecisions}{kind="load",action="reshape"}`)).toBe(1);
      expect(sample(text, `${METRIC_NAMES.plannerActions}{action="reshape",outcome="done"}`)).toBe(1);
      expect(log.some((l) => l.includes('decode 1 tp2;'))).toBe(true);
      expect(log).toContain('action for decision #3: reshape decode tp1 -> tp2 done (w1) in 0 ms');
      await runtime.stop();
    });

    it('a re-shape that fails half-way: the desired layout and replicas stay, and the next tick carries it on', async () => {
      const tp1 = { tp: 1, pp: 1, ep: 1 };
      const tp2 = { tp: 2, pp: 1, ep: 1 };
      class HalfWay extends FakeConnector {
        mixed = false;
        override layouts(): Record<Pool, PoolLayout> {
          if (!this.mixed) return super.layouts();
          const decode = [
            replicaLayout('decode-4', tp2),
            replicaLayout('decode-2', tp1),
            replicaLayout('decode-3', tp1),
          ];
          return { prefill: super.layouts().prefill, decode: poolLayout(decode) };
        }
        override async reshapePool(pool: Pool, parallelism: Parallelism, replicas: number) {
          this.calls.push(`reshape ${pool} ${layoutName(parallelism)} x${replicas}`);
          if (this.calls.length === 1) {
            // One TP 2 replica started and two TP 1 retired; the second TP 2 did not start.
            this.mixed = true;
            this.pools.decode = 3;
            throw new PlannerActionError('re-shaping decode to tp2: a tp2 replica did not start');
          }
          this.mixed = false;
          this.shapes[pool] = parallelism;
          this.pools[pool] = replicas;
          return ['decode-5'];
        }
      }
      const connector = new HalfWay({ prefill: 1, decode: 4 });
      let now = 0;
      const runtime = new PlannerRuntime({
        mode: 'load',
        ttftMs: 2000,
        itlMs: 6.5,
        intervalS: 1,
        minReplicas: 1,
        maxGpus: 5,
        profile,
        reshape: true,
        connector,
        window: () =>
          new MetricsWindow(
            longPrompts(),
            () => ({}),
            () => now,
          ),
        correction: { cooldownMs: 30_000 },
        now: () => now,
      });
      await runtime.start();
      for (const t of [1000, 2000, 3000]) {
        now = t;
        await runtime.tick();
      }
      await vi.waitFor(() => expect(runtime.status().acting).toBe(false));
      let status = runtime.status();
      expect(status.actions!.at(-1)).toMatchObject({ action: 'reshape', outcome: 'failed' });
      expect(status.layouts.current.decode.layout).toBe('mixed');
      expect(status.layouts.desired!.decode!.layout).toBe('tp2');
      expect(status.replicas.desired!.decode).toBe(2);
      now = 4000;
      await runtime.tick();
      await vi.waitFor(() => expect(runtime.status().acting).toBe(false));
      status = runtime.status();
      expect(connector.calls).toEqual(['reshape decode tp2 x2', 'reshape decode tp2 x2']);
      expect(status.actions!.at(-1)).toMatchObject({ action: 'reshape', outcome: 'done', workers: ['decode-5'] });
      expect(status.layouts.current.decode).toMatchObject({ layout: 'tp2', parallelism: tp2 });
      expect(status.replicas).toEqual({ current: { prefill: 1, decode: 2 }, desired: { prefill: 1, decode: 2 } });
      await runtime.stop();
    });

    it('a connector that cannot re-shape: the action fails, the planner takes the layouts back from it', async () => {
      const connector = new FakeConnector({ prefill: 1, decode: 2 }, new Set(['reshape']));
      const { runtime, at } = runtimeOf(connector);
      await runtime.start();
      for (const t of [1000, 2000, 3000]) {
        at(t);
        await runtime.tick();
      }
      await vi.waitFor(() => expect(runtime.status().acting).toBe(false));
      const status = runtime.status();
      expect(status.actions!.at(-1)).toMatchObject({
        action: 'reshape',
        outcome: 'failed',
        error: 'the fake connector does not re-shape decode',
      });
      expect(status.layouts.desired!.decode!.layout).toBe('tp1');
      expect(status.replicas.desired).toEqual({ prefill: 1, decode: 2 });
      expect(connector.calls).toEqual(['reshape decode']);
      await runtime.stop();
    });
  });
});
