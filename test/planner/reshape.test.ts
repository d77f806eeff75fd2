/**
 * Re-shaping a pool while serving (issue 27): the rule (lib/planner/reshape.ts) on a synthetic profile where the
 * layout that wins depends on the traffic, and the Planner acting on it with a streak and the cool-down.
 *
 * The profile: a TP 2 decode step is barely faster than a TP 1 step (x1.05: the all-reduce eats the gain), so
 * per device two TP 1 replicas decode more, except where a TP 1 step cannot meet the ITL at all: at 8000 tokens
 * of context one TP 1 step takes ~6.7 ms, one TP 2 step ~6.4 ms, and the ITL SLA is 6.5 ms.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import {
  judgeReshape,
  Planner,
  RESHAPE_MARGIN,
  Reshaper,
  type LoadDecision,
  type LoadSample,
  type Parallelism,
} from '../../lib/planner/index.js';
import { planJson } from '../../lib/cli/plan.js';
import { seeded, stepCost, syntheticLayout, syntheticProfile } from './synthetic.js';

const profile = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 1.8, decodeSpeedup: 1.05 })]);
const SLA = { ttftMs: 2000, itlMs: 6.5 };
const tp = (n: number): Parallelism => ({ tp: n, pp: 1, ep: 1 });
/** Long prompts: TP 1 cannot meet the ITL, TP 2 can. */
const LONG: LoadSample = { rate: 1, isl: 8000, osl: 256 };
/** Short prompts: two TP 1 replicas serve ~9.7 req/s, one TP 2 ~6.1 req/s (neither serves 10). */
const SHORT: LoadSample = { rate: 10, isl: 256, osl: 256 };

describe('judgeReshape: when a pool runs another layout', () => {
  it('long contexts: 2 x tp1 miss the ITL at any batch, 1 x tp2 meets it on the same 2 devices', () => {
    expect(stepCost(1, 8128)).toBeGreaterThan(SLA.itlMs);
    expect(stepCost(1, 8128) / 1.05).toBeLessThan(SLA.itlMs);
    const v = judgeReshape(profile, 'decode', { parallelism: tp(1), replicas: 2 }, LONG, SLA);
    expect(v.current).toMatchObject({ layout: 'tp1', replicas: 2, gpus: 2, servableRate: 0 });
    expect(v.current.reason).toMatch(/^one decode step at 8128 tokens of context takes 6.73 ms on tp1, over the ITL/);
    expect(v.candidates).toHaveLength(1);
    expect(v.target).toMatchObject({ layout: 'tp2', parallelism: tp(2), replicas: 1, gpus: 2, gpusPerReplica: 2 });
    expect(v.target!.servableRate).toBeGreaterThan(0);
    expect(v.reason).toMatch(/^2 x tp1 serve 0 req\/s of 1 req\/s; 1 x tp2 serves 0\.61 req\/s on 2 of its 2 devices$/);
    // The pool's 3 devices hold one TP 2 replica: never more devices than the pool has.
    const three = judgeReshape(profile, 'decode', { parallelism: tp(1), replicas: 3 }, LONG, SLA);
    expect(three.target).toMatchObject({ layout: 'tp2', replicas: 1, gpus: 2 });
  });

  it('and back: short contexts at a rate 1 x tp2 does not serve, 2 x tp1 serve more than 1.25x as much', () => {
    const v = judgeReshape(profile, 'decode', { parallelism: tp(2), replicas: 1 }, SHORT, SLA);
    expect(v.current.servableRate).toBeLessThan(SHORT.rate);
    expect(v.target).toMatchObject({ layout: 'tp1', replicas: 2, gpus: 2 });
    expect(v.target!.servableRate).toBeGreaterThanOrEqual((1 + RESHAPE_MARGIN) * v.current.servableRate);
  });

  it('a layout that serves the load is kept, however much more another would serve', () => {
    const served = judgeReshape(profile, 'decode', { parallelism: tp(2), replicas: 1 }, { ...SHORT, rate: 5 }, SLA);
    expect(served.target).toBeUndefined();
    expect(served.reason).toMatch(/^1 x tp2 serves 6\.06 req\/s within the SLA, the load is 5 req\/s: kept$/);
    // A quiet pool is kept whatever its layout.
    expect(
      judgeReshape(profile, 'decode', { parallelism: tp(1), replicas: 2 }, { ...LONG, rate: 0 }, SLA).target,
    ).toBeUndefined();
  });

  it('within the margin, or below minReplicas, or a layout the profile lacks: kept', () => {
    const ratio = (() => {
      const v = judgeReshape(profile, 'decode', { parallelism: tp(2), replicas: 1 }, SHORT, SLA);
      return v.target!.servableRate / v.current.servableRate;
    })();
    const wide = judgeReshape(profile, 'decode', { parallelism: tp(2), replicas: 1 }, SHORT, { ...SLA, margin: ratio });
    expect(wide.target).toBeUndefined();
    expect(wide.reason).toMatch(/is not [\d.]+x as much: kept$/);
    // Two replicas at least: one TP 2 replica would be one.
    expect(
      judgeReshape(profile, 'decode', { parallelism: tp(1), replicas: 2 }, LONG, { ...SLA, minReplicas: 2 }).candidates,
    ).toEqual([]);
    const unknown = judgeReshape(profile, 'decode', { parallelism: tp(4), replicas: 1 }, LONG, SLA);
    expect(unknown.target).toBeUndefined();
    expect(unknown.reason).toBe('the decode pool runs tp4, a layout the profile does not have: not re-shaped');
    expect(() =>
      judgeReshape(profile, 'decode', { parallelism: tp(1), replicas: 2 }, LONG, { ...SLA, margin: -1 }),
    ).toThrow(BadArgumentError);
  });

  it('property: a re-shape keeps the devices, needs the pool short of the load, wins by the margin, and never comes straight back', () => {
    const load = fc.record({
      rate: fc.double({ min: 0, max: 40, noNaN: true }),
      isl: fc.integer({ min: 1, max: 12_000 }),
      osl: fc.integer({ min: 1, max: 2000 }),
    });
    fc.assert(
      fc.property(
        load,
        fc.constantFrom(1, 2),
        fc.integer({ min: 1, max: 6 }),
        fc.constantFrom<'prefill' | 'decode'>('prefill', 'decode'),
        fc.double({ min: 1, max: 50, noNaN: true }),
        (l, size, replicas, pool, itlMs) => {
          const slas = { ttftMs: 300, itlMs };
          const v = judgeReshape(profile, pool, { parallelism: tp(size), replicas }, l, slas);
          for (const c of v.candidates) {
            expect(c.gpus).toBeLessThanOrEqual(v.current.gpus);
            expect(c.replicas).toBeGreaterThanOrEqual(1);
          }
          if (!v.target) return;
          expect(v.current.servableRate).toBeLessThan(l.rate);
          expect(v.target.servableRate).toBeGreaterThanOrEqual((1 + RESHAPE_MARGIN) * v.current.servableRate);
          expect(v.target.servableRate).toBeGreaterThan(0);
          // From the target, at the same load: the old layout is never the winner.
          const back = judgeReshape(
            profile,
            pool,
            { parallelism: v.target.parallelism, replicas: v.target.replicas },
            l,
            slas,
          );
          expect(back.target?.layout).not.toBe(v.current.layout);
        },
      ),
      { numRuns: 400, seed: 27 },
    );
  });
});

/** A planner whose load correction always holds (latencies between half the SLA and the SLA). */
function reshapingPlanner(o: { decode: number; layout: number; cooldownMs?: number; maxGpus?: number }) {
  return new Planner({
    ...SLA,
    maxGpus: o.maxGpus ?? 3,
    profile,
    layouts: { prefill: tp(1), decode: tp(o.layout) },
    replicas: { prefill: 1, decode: o.decode },
    reshape: true,
    cooldownMs: o.cooldownMs ?? 30_000,
  });
}
const holding = (atMs: number, load: LoadSample) => ({
  atMs,
  prefillTtftMs: [0.7 * SLA.ttftMs],
  decodeItlMs: [0.7 * SLA.itlMs],
  load,
});
const devices = (d: LoadDecision) =>
  (['prefill', 'decode'] as const).reduce(
    (n, p) => n + d.outputs.replicas[p] * d.outputs.layouts[p]!.gpusPerReplica,
    0,
  );

describe('Planner: re-shaping with a streak and the cool-down', () => {
  it('re-shapes decode 2 x tp1 -> 1 x tp2 after 3 long-context observations; the decision says so with the layouts', () => {
    const planner = reshapingPlanner({ decode: 2, layout: 1 });
    const [a, b, c] = [0, 1000, 2000].map((t) => planner.observeLoad(holding(t, LONG)));
    expect(a!.outputs.action).toEqual({ kind: 'hold' });
    expect(a!.outputs.reshape!.decode).toMatchObject({ streak: 1, due: false, target: { layout: 'tp2' } });
    expect(b!.outputs.action).toEqual({ kind: 'hold' });
    expect(c!.outputs.action).toEqual({ kind: 'reshape', pool: 'decode', from: 'tp1', to: 'tp2', replicas: 1 });
    expect(c!.reason).toMatch(/^re-shape decode from 2 x tp1 to 1 x tp2 \(3 times in a row\): 2 x tp1 serve 0 req\/s/);
    expect(c!.inputs.layouts.decode).toEqual({ layout: 'tp1', parallelism: tp(1), gpusPerReplica: 1 });
    expect(c!.outputs.layouts.decode).toEqual({ layout: 'tp2', parallelism: tp(2), gpusPerReplica: 2 });
    expect(c!.outputs.replicas).toEqual({ prefill: 1, decode: 1 });
    expect(c!.outputs.pools.decode.coolingUntilMs).toBe(32_000);
    expect(planner.layouts.decode!.layout).toBe('tp2');
    // The prefill pool (one replica: no layout of two devices fits it) is judged and kept.
    expect(c!.outputs.reshape!.prefill!.candidates).toEqual([]);
    // Cooling down: short prompts at a high rate want tp1 back, not before 32 s.
    const later: LoadDecision[] = [];
    for (let t = 3000; t <= 40_000; t += 1000) later.push(planner.observeLoad(holding(t, SHORT)));
    const back = later.filter((d) => d.outputs.action.kind === 'reshape');
    expect(back.map((d) => d.outputs.action)).toEqual([
      { kind: 'reshape', pool: 'decode', from: 'tp2', to: 'tp1', replicas: 2 },
    ]);
    expect(back[0]!.inputs.atMs).toBe(32_000);
    for (const d of [a!, b!, c!, ...later]) expect(devices(d)).toBeLessThanOrEqual(3);
  });

  it('an add or a move resets the streak; a pool cooling down after one is not re-shaped until it ends', () => {
    const planner = reshapingPlanner({ decode: 2, layout: 1, maxGpus: 4 });
    // Decode misses its ITL 3 times: one replica added (the budget has room), which is a change; the re-shape
    // due at the same observation waits.
    let last!: LoadDecision;
    for (let t = 0; t <= 2000; t += 1000)
      last = planner.observeLoad({ atMs: t, prefillTtftMs: [1400], decodeItlMs: [9], load: LONG });
    expect(last.outputs.action).toEqual({ kind: 'add', pool: 'decode' });
    expect(last.outputs.reshape!.decode!.streak).toBe(3);
    const next = planner.observeLoad(holding(3000, LONG));
    expect(next.outputs.reshape!.decode!.streak).toBe(1);
    const decisions: LoadDecision[] = [];
    for (let t = 4000; t <= 40_000; t += 1000) decisions.push(planner.observeLoad(holding(t, LONG)));
    const reshapes = decisions.filter((d) => d.outputs.action.kind === 'reshape');
    // 3 x tp1 -> 1 x tp2 (3 devices hold one TP 2 replica), once the cool-down from the add (32 s) is over.
    expect(reshapes.map((d) => [d.inputs.atMs, d.outputs.action])).toEqual([
      [32_000, { kind: 'reshape', pool: 'decode', from: 'tp1', to: 'tp2', replicas: 1 }],
    ]);
  });

  it('no oscillation under a noisy load: a load that flips between the two regimes re-shapes once at most', () => {
    const planner = reshapingPlanner({ decode: 2, layout: 1, cooldownMs: 0 });
    const random = seeded(7);
    let reshapes = 0;
    let run = 0;
    let previous = false;
    for (let t = 0; t < 2000; t++) {
      // Never three of a kind in a row: the streak never completes.
      let long = random() < 0.5;
      run = long === previous ? run + 1 : 1;
      if (run > 2) {
        long = !long;
        run = 1;
      }
      previous = long;
      const base = long ? LONG : SHORT;
      const load = {
        ...base,
        rate: base.rate * (0.6 + 0.8 * random()),
        isl: Math.round(base.isl * (0.8 + 0.4 * random())),
      };
      if (planner.observeLoad(holding(t * 1000, load)).outputs.action.kind === 'reshape') reshapes++;
    }
    expect(reshapes).toBeLessThanOrEqual(1);
  });

  it('no oscillation under a noisy load: jitter around one regime re-shapes once, then holds', () => {
    for (const seed of [1, 2, 3]) {
      const planner = reshapingPlanner({ decode: 2, layout: 1, cooldownMs: 5000 });
      const random = seeded(seed);
      const actions: string[] = [];
      for (let t = 0; t < 1000; t++) {
        // Long prompts, rate and lengths jittered by up to +-40% and +-30%.
        const load = {
          rate: LONG.rate * (0.6 + 0.8 * random()),
          isl: Math.round(LONG.isl * (0.7 + 0.6 * random())),
          osl: Math.round(LONG.osl * (0.7 + 0.6 * random())),
        };
        const d = planner.observeLoad(holding(t * 1000, load));
        if (d.outputs.action.kind === 'reshape') actions.push(`${d.outputs.action.from}->${d.outputs.action.to}`);
      }
      expect(actions, `seed ${seed}`).toEqual(['tp1->tp2']);
    }
  });

  it('property: re-shapes of a pool are a cool-down apart, and the devices stay within the budget', () => {
    const loads = fc.array(
      fc.record({
        regime: fc.constantFrom(LONG, SHORT),
        jitter: fc.double({ min: 0.5, max: 1.5, noNaN: true }),
        steps: fc.integer({ min: 1, max: 8 }),
      }),
      { minLength: 1, maxLength: 30 },
    );
    fc.assert(
      fc.property(loads, fc.constantFrom(1, 2), (phases, layout) => {
        const planner = reshapingPlanner({ decode: layout === 1 ? 2 : 1, layout, cooldownMs: 10_000 });
        let t = 0;
        let lastReshape = -Infinity;
        for (const phase of phases)
          for (let i = 0; i < phase.steps; i++, t += 1000) {
            const load = { ...phase.regime, rate: phase.regime.rate * phase.jitter };
            const d = planner.observeLoad(holding(t, load));
            expect(devices(d)).toBeLessThanOrEqual(3);
            if (d.outputs.action.kind !== 'reshape') continue;
            expect(t - lastReshape).toBeGreaterThanOrEqual(10_000);
            lastReshape = t;
          }
      }),
      { numRuns: 200, seed: 27 },
    );
  });

  it('needs a profile and the layouts; without `reshape` a pool keeps its layout', () => {
    expect(
      () =>
        new Planner({
          ...SLA,
          maxGpus: 3,
          replicas: { prefill: 1, decode: 2 },
          layouts: { decode: tp(1) },
          reshape: true,
        }),
    ).toThrow(/re-shaping pools needs a profile/);
    expect(
      () => new Planner({ ...SLA, maxGpus: 3, profile, replicas: { prefill: 1, decode: 2 }, reshape: true }),
    ).toThrow(/needs the pools' layouts/);
    const off = new Planner({
      ...SLA,
      maxGpus: 3,
      profile,
      layouts: { decode: tp(1) },
      replicas: { prefill: 1, decode: 2 },
    });
    for (let t = 0; t < 10; t++) {
      const d = off.observeLoad(holding(t * 1000, LONG));
      expect(d.outputs.action.kind).toBe('hold');
      expect(d.outputs.reshape).toBeUndefined();
    }
    expect(off.layouts).toEqual({ decode: { layout: 'tp1', parallelism: tp(1), gpusPerReplica: 1 } });
  });

  it('the streak counts one winner: a different verdict starts it again; the judged load is the mean of the window', () => {
    const r = new Reshaper(profile, { ...SLA, after: 2, window: 1 });
    const pools = { decode: { parallelism: tp(1), replicas: 2 } };
    expect(r.observe(LONG, pools).decode).toMatchObject({ streak: 1, due: false });
    expect(r.observe({ ...LONG, rate: 0 }, pools).decode).toMatchObject({ streak: 0 });
    expect(r.observe(LONG, pools).decode).toMatchObject({ streak: 1 });
    expect(r.observe(LONG, pools).decode).toMatchObject({ streak: 2, due: true });
    const mean = new Reshaper(profile, { ...SLA, window: 2 });
    mean.observe(LONG, pools);
    expect(mean.observe(SHORT, pools).decode!.load).toEqual({ rate: 5.5, isl: 4128, osl: 256 });
    expect(() => new Reshaper(profile, { ...SLA, after: 0 })).toThrow(BadArgumentError);
  });

  it('back to the layout a pool left only when it wins with the lengths 25% shorter and longer too', () => {
    // Prompts of 6500 tokens: 2 x tp1 just meet the ITL (at 8125 they would not).
    const near = { rate: 1, isl: 6500, osl: 256 };
    const pools = { decode: { parallelism: tp(2), replicas: 1 } };
    expect(judgeReshape(profile, 'decode', pools.decode, near, SLA).target?.layout).toBe('tp1');
    const fresh = new Reshaper(profile, { ...SLA, window: 1 });
    expect(fresh.observe(near, pools).decode!.target?.layout).toBe('tp1');
    const left = new Reshaper(profile, { ...SLA, window: 1 });
    left.reshaped('decode', 'tp1');
    const v = left.observe(near, pools).decode!;
    expect(v.target).toBeUndefined();
    expect(v.reason).toMatch(
      /; but tp1 is the layout the pool left, and it comes back only when it wins with prompts and outputs 25% shorter and longer too: kept$/,
    );
    // Short prompts: tp1 wins across the band, so it comes back.
    expect(left.observe(SHORT, pools).decode!.target?.layout).toBe('tp1');
  });

  it("the live planner and tandem plan name layouts alike: an SLA plan keeps the pools' running layouts", () => {
    const planner = reshapingPlanner({ decode: 1, layout: 2, maxGpus: 8 });
    const d = planner.planInterval({ rate: 1, isl: 256, osl: 64 }, 0);
    expect(d.inputs.layouts.decode).toEqual({ layout: 'tp2', parallelism: tp(2), gpusPerReplica: 2 });
    const json = planJson(d.outputs.plan!);
    // tp2 is kept though tp1 would need fewer devices at this load: a pool changes layout by a re-shape only.
    expect(json.decode).toMatchObject(planner.layouts.decode!);
    expect(json.prefill).toMatchObject(planner.layouts.prefill!);
    expect(d.outputs.plan!.alternatives.decode.map((a) => a.layout)).toEqual(['tp2']);
  });
});
