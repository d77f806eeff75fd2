/**
 * The layout of each pool as a planner decision (issue 27): per pool, the layout and replica count that meet the
 * SLA with the fewest devices (a TP 2 replica counts 2), ties to the lower latency; every layout considered is in
 * `alternatives`.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  planCapacity,
  Planner,
  UnmeetablePlanError,
  type CapacityPlan,
  type CapacityRequest,
} from '../../lib/planner/index.js';
import { planOrNull as plan, prefillCost, syntheticLayout, syntheticProfile } from './synthetic.js';

const base: CapacityRequest = { rate: 20, isl: 1024, osl: 256, ttftMs: 500, itlMs: 30, gpus: 64 };

/** Devices the SLA needs in a pool: the fewest over the layouts that meet it. */
const neededDevices = (plan: CapacityPlan, pool: 'prefill' | 'decode') =>
  Math.min(...plan.alternatives[pool].flatMap((a) => (a.gpus === undefined ? [] : [a.gpus])));

describe('planCapacity: a layout per pool', () => {
  // TP 2 prefills 1.8x faster than TP 1, but decodes only 1.2x faster: two TP 1 replicas decode more per device.
  const mixed = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 1.8, decodeSpeedup: 1.2 })]);

  it('TP 2 wins prefill when only it meets the TTFT; TP 1 replicas win decode throughput per device', () => {
    const ttftMs = 50; // one 1024-token prompt: TP 1 ~64 ms, TP 2 ~35 ms
    expect(prefillCost(1024)).toBeGreaterThan(ttftMs);
    expect(prefillCost(1024) / 1.8).toBeLessThan(ttftMs);
    const plan = planCapacity(mixed, { ...base, ttftMs });
    expect(plan.status).toBe('ok');
    expect(plan.prefill.layout).toBe('tp2');
    expect(plan.prefill.gpus).toBe(plan.prefill.replicas * 2);
    expect(plan.decode.layout).toBe('tp1');
    expect(plan.decode.replicas).toBeGreaterThanOrEqual(2);

    const [p1, p2] = plan.alternatives.prefill;
    expect(p1).toMatchObject({ layout: 'tp1', chosen: false });
    expect(p1!.reason).toMatch(/^one prompt of 1024 tokens alone takes .* on tp1, over the TTFT SLA of 50 ms$/);
    expect(p2).toMatchObject({ layout: 'tp2', chosen: true, gpusPerReplica: 2, gpus: plan.prefill.gpus });
    const [d1, d2] = plan.alternatives.decode;
    expect(d1).toMatchObject({ layout: 'tp1', chosen: true, gpus: plan.decode.gpus });
    expect(d2).toMatchObject({ layout: 'tp2', chosen: false, gpusPerReplica: 2 });
    // Throughput per device at the ITL: TP 1's is higher, so it needs fewer devices for the same rate.
    expect(d1!.ratePerReplica! / 1).toBeGreaterThan(d2!.ratePerReplica! / 2);
    expect(d1!.gpus!).toBeLessThan(d2!.gpus!);
    expect(plan.gpusUsed).toBe(plan.prefill.gpus + plan.decode.gpus);

    // With a TTFT both meet and a rate one TP 1 replica serves, TP 1 prefill needs fewer devices and is chosen.
    const loose = planCapacity(mixed, { ...base, rate: 5, ttftMs: 500 });
    expect(loose.prefill.layout).toBe('tp1');
    expect(loose.prefill.gpus).toBe(1);
  });

  it('equal devices: the lower latency wins, wherever the layout is listed', () => {
    const tp1 = syntheticLayout();
    const tp2 = syntheticLayout({ tp: 2, speedup: 2 });
    const r1 = planCapacity(syntheticProfile([tp1]), base).prefill.ratePerReplica;
    const r2 = planCapacity(syntheticProfile([tp2]), base).prefill.ratePerReplica;
    // A rate for which TP 1 needs 2 replicas and TP 2 one: 2 devices each.
    const rate = 1.5 * r1;
    expect(rate).toBeLessThanOrEqual(r2);
    for (const order of [
      [tp1, tp2],
      [tp2, tp1],
    ]) {
      const plan = planCapacity(syntheticProfile(order), { ...base, rate });
      expect(plan.alternatives.prefill.map((a) => a.gpus)).toEqual([2, 2]);
      expect(plan.prefill.layout).toBe('tp2');
      expect(plan.prefill.replicas).toBe(1);
      expect(plan.prefill.prefillMs).toBeCloseTo(prefillCost(1024) / 2, 9);
    }
  });

  it("an SLA no layout meets: UnmeetablePlanError with each layout's reason", () => {
    const two = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 1.8 })]);
    let error: unknown;
    try {
      planCapacity(two, { ...base, ttftMs: 10 });
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(UnmeetablePlanError);
    expect((error as UnmeetablePlanError).code).toBe('TANDEM_PLAN_UNMEETABLE');
    expect((error as Error).message).toMatch(
      /^no prefill replica meets the SLA: one prompt of 1024 tokens alone takes .* on tp1, over the TTFT SLA of 10 ms; one prompt of 1024 tokens alone takes .* on tp2, over the TTFT SLA of 10 ms$/,
    );
  });

  it('the budget counts devices: a TP 2 pool that does not fit gives way', () => {
    const fast = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 2.5 })]);
    expect(planCapacity(fast, base).prefill.layout).toBe('tp2');
    const plan = planCapacity(fast, { ...base, rate: 100, gpus: 3 });
    expect(plan.gpusUsed).toBeLessThanOrEqual(3);
    expect(plan.prefill.gpus + plan.decode.gpus).toBe(plan.gpusUsed);
    for (const pool of ['prefill', 'decode'] as const)
      expect(plan.alternatives[pool].filter((a) => a.chosen).map((a) => a.layout)).toEqual([plan[pool].layout]);
  });
});

describe('a pool whose layout is fixed (serving: no re-shaping yet)', () => {
  const mixed = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 1.8, decodeSpeedup: 1.2 })]);
  const tp1 = { tp: 1, pp: 1, ep: 1 };

  it('is planned with its layout only; a layout the profile lacks is UnmeetablePlanError', () => {
    const free = planCapacity(mixed, { ...base, ttftMs: 50 });
    expect(free.prefill.layout).toBe('tp2');
    const fixed = planCapacity(mixed, { ...base, ttftMs: 500, layouts: { prefill: { tp: 2, pp: 1, ep: 1 } } });
    expect(fixed.prefill.layout).toBe('tp2');
    expect(fixed.alternatives.prefill.map((a) => a.layout)).toEqual(['tp2']);
    expect(fixed.alternatives.decode.map((a) => a.layout)).toEqual(['tp1', 'tp2']);
    // TP 1 cannot meet a 50 ms TTFT at 1024 tokens: fixed to it, the plan is unmeetable.
    expect(() => planCapacity(mixed, { ...base, ttftMs: 50, layouts: { prefill: tp1 } })).toThrow(
      /^no prefill replica meets the SLA: one prompt of 1024 tokens alone takes .* on tp1/,
    );
    expect(() => planCapacity(mixed, { ...base, layouts: { decode: { tp: 4, pp: 1, ep: 1 } } })).toThrow(
      new UnmeetablePlanError('the decode pool runs tp4, a layout the profile does not have (it has tp1, tp2)'),
    );
  });

  it("the Planner keeps the running pools' layouts in its plans", () => {
    const sla = { ttftMs: 500, itlMs: 30, maxGpus: 64 };
    const load = { rate: 20, isl: 1024, osl: 256 };
    const free = new Planner({ ...sla, profile: mixed, replicas: { prefill: 1, decode: 1 } }).planInterval(load, 0);
    expect(free.outputs.plan!.prefill.layout).toBe('tp2'); // a tie on devices, TP 2's lower latency
    const kept = new Planner({
      ...sla,
      profile: mixed,
      replicas: { prefill: 1, decode: 1 },
      layouts: { prefill: tp1, decode: tp1 },
    }).planInterval(load, 0);
    expect(kept.outputs.plan!.prefill.layout).toBe('tp1');
    expect(kept.outputs.plan!.decode.layout).toBe('tp1');
    expect(kept.outputs.replicas.prefill).toBe(kept.outputs.plan!.prefill.replicas);
  });
});

describe('planCapacity with several layouts: monotone, and within the budget', () => {
  const profiles = fc
    .record({
      noise: fc.double({ min: 0, max: 0.5, noNaN: true }),
      seed: fc.integer({ min: 0, max: 1e6 }),
      speedup: fc.double({ min: 1, max: 2.5, noNaN: true }),
      decodeSpeedup: fc.double({ min: 1, max: 2.5, noNaN: true }),
    })
    .map(({ noise, seed, speedup, decodeSpeedup }) =>
      syntheticProfile([
        syntheticLayout({ noise, seed }),
        syntheticLayout({ tp: 2, speedup, decodeSpeedup, noise, seed: seed + 1 }),
      ]),
    );
  const request = fc.record({
    rate: fc.double({ min: 0.01, max: 500, noNaN: true }),
    isl: fc.integer({ min: 1, max: 8000 }),
    osl: fc.integer({ min: 1, max: 4000 }),
    ttftMs: fc.constantFrom(200, 2000, 5000),
    itlMs: fc.constantFrom(20, 50, 100),
    gpus: fc.integer({ min: 2, max: 200 }),
  });
  const more = fc.oneof(fc.integer({ min: 1, max: 64 }), fc.integer({ min: 1, max: 4000 }));

  it('more input per request never means fewer prefill devices', () => {
    fc.assert(
      fc.property(profiles, request, more, (p, r, m) => {
        const a = plan(p, r);
        const b = plan(p, { ...r, isl: r.isl + m });
        if (!a || !b) return true;
        return neededDevices(b, 'prefill') >= neededDevices(a, 'prefill');
      }),
      { numRuns: 300 },
    );
  });

  it('more output per request never means fewer decode devices', () => {
    fc.assert(
      fc.property(profiles, request, more, (p, r, m) => {
        const a = plan(p, r);
        const b = plan(p, { ...r, osl: r.osl + m });
        if (!a || !b) return true;
        return neededDevices(b, 'decode') >= neededDevices(a, 'decode');
      }),
      { numRuns: 300 },
    );
  });

  it('the budget is respected; within it, each pool deploys its fewest devices', () => {
    fc.assert(
      fc.property(profiles, request, (p, r) => {
        const x = plan(p, r);
        if (!x) return true;
        expect(x.gpusUsed).toBeLessThanOrEqual(r.gpus);
        expect(x.prefill.gpus).toBe(x.prefill.replicas * x.prefill.gpusPerReplica);
        expect(x.decode.gpus).toBe(x.decode.replicas * x.decode.gpusPerReplica);
        expect(x.gpusNeeded).toBe(neededDevices(x, 'prefill') + neededDevices(x, 'decode'));
        if (x.status === 'ok') {
          expect(x.prefill.gpus).toBe(neededDevices(x, 'prefill'));
          expect(x.decode.gpus).toBe(neededDevices(x, 'decode'));
        }
        return true;
      }),
      { numRuns: 300 },
    );
  });
});
