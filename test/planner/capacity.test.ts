import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  MAX_PREFILL_UTILIZATION,
  planCapacity,
  UnmeetablePlanError,
  type CapacityRequest,
} from '../../lib/planner/index.js';
import { BadArgumentError } from '../../lib/errors.js';
import { planOrNull as plan, prefillCost, stepCost, syntheticLayout, syntheticProfile } from './synthetic.js';

const profile = syntheticProfile();
const base: CapacityRequest = { rate: 10, isl: 1024, osl: 256, ttftMs: 500, itlMs: 30, gpus: 64 };

function unmeetable(request: Partial<CapacityRequest>, p = profile): string {
  try {
    planCapacity(p, { ...base, ...request });
  } catch (error) {
    expect(error).toBeInstanceOf(UnmeetablePlanError);
    expect((error as UnmeetablePlanError).code).toBe('TANDEM_PLAN_UNMEETABLE');
    return (error as Error).message;
  }
  throw new Error('planned');
}

describe('planCapacity: the arithmetic', () => {
  it('prefill: replicas from the throughput per replica at the TTFT SLA (M/D/1 wait)', () => {
    const plan = planCapacity(profile, base);
    const s = prefillCost(1024);
    const x = (500 - s) / s;
    const rho = Math.min(MAX_PREFILL_UTILIZATION, (2 * x) / (1 + 2 * x));
    expect(plan.prefill.prefillMs).toBeCloseTo(s, 9);
    expect(plan.prefill.utilization).toBeCloseTo(rho, 9);
    expect(plan.prefill.ratePerReplica).toBeCloseTo(rho / (s / 1000), 9);
    expect(plan.prefill.replicas).toBe(Math.ceil(10 / (rho / (s / 1000))));
    // The queueing wait at that utilisation brings TTFT to the SLA, no further.
    const wait = (rho * s) / (2 * (1 - rho));
    expect(s + wait).toBeLessThanOrEqual(500 + 1e-9);
  });

  it("decode: the largest measured batch that meets the ITL, replicas by Little's law", () => {
    const plan = planCapacity(profile, base);
    const ctx = 1024 + 128;
    const d = plan.decode;
    expect(d.context).toBe(ctx);
    expect(d.stepMs).toBeLessThanOrEqual(30);
    // One more sequence would miss the ITL (stepCost is linear in batch between measured batches).
    expect(d.itlBatch).toBeLessThan(256);
    expect(planCapacity(profile, { ...base, itlMs: d.stepMs - 1e-6 }).decode.batch).toBeLessThan(d.batch);
    expect(d.batch).toBe(Math.min(d.itlBatch, d.kvBatch, 256));
    expect(d.kvBatch).toBe(Math.floor(200_000 / (Math.ceil(1280 / 16) * 16)));
    expect(d.replicas).toBe(Math.ceil((10 * 256 * d.stepMs) / 1000 / d.batch));
    expect(plan.status).toBe('ok');
    expect(plan.gpusUsed).toBe(plan.prefill.replicas + plan.decode.replicas);
  });

  it('the KV pool bounds the batch', () => {
    const small = syntheticProfile([syntheticLayout({ kvCapacityTokens: 4 * 1280 })]);
    const d = planCapacity(small, { ...base, itlMs: 1000 }).decode;
    expect(d.kvBatch).toBe(4);
    expect(d.batch).toBe(4);
  });

  it('per pool, the layout that needs the fewest GPUs', () => {
    // TP 2 at 2.5x the speed of TP 1: fewer GPUs for the same load.
    const two = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 2.5 })]);
    const plan = planCapacity(two, { ...base, rate: 100 });
    const tp1 = planCapacity(syntheticProfile([syntheticLayout()]), { ...base, rate: 100 });
    expect(plan.prefill.parallelism.tp).toBe(2);
    expect(plan.prefill.gpus).toBeLessThan(tp1.prefill.gpus);
    expect(plan.prefill.gpus).toBe(plan.prefill.replicas * 2);
    // At 1.2x the speed, TP 2 costs more GPUs: TP 1 is chosen.
    const slow = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 1.2 })]);
    expect(planCapacity(slow, { ...base, rate: 100 }).prefill.parallelism.tp).toBe(1);
  });

  it('over budget: the best effort, within the budget, and what it serves', () => {
    const need = planCapacity(profile, { ...base, rate: 200 });
    const plan = planCapacity(profile, { ...base, rate: 200, gpus: 6 });
    expect(plan.status).toBe('over-budget');
    expect(plan.gpusNeeded).toBe(need.gpusNeeded);
    expect(plan.gpusUsed).toBe(6);
    expect(plan.prefill.replicasNeeded).toBe(need.prefill.replicas);
    expect(plan.prefill.replicas).toBeGreaterThanOrEqual(1);
    expect(plan.decode.replicas).toBeGreaterThanOrEqual(1);
    expect(plan.servableRate).toBeLessThan(200);
    expect(plan.servableRate).toBeCloseTo(
      Math.min(plan.prefill.replicas * plan.prefill.ratePerReplica, plan.decode.replicas * plan.decode.ratePerReplica),
      9,
    );
  });

  it('over budget, layouts are chosen for the budget: a TP 2 pool gives way where it does not fit', () => {
    const two = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 2.5 })]);
    const need = planCapacity(two, { ...base, rate: 100 });
    expect([need.prefill.gpusPerReplica, need.decode.gpusPerReplica]).toEqual([2, 2]);
    const plan = planCapacity(two, { ...base, rate: 100, gpus: 3 });
    expect(plan.status).toBe('over-budget');
    expect(plan.gpusUsed).toBeLessThanOrEqual(3);
    expect(plan.prefill.gpusPerReplica + plan.decode.gpusPerReplica).toBeLessThanOrEqual(3);
    // The pair chosen serves at least what any other pair that fits serves.
    const tp1 = planCapacity(syntheticProfile([syntheticLayout()]), { ...base, rate: 100, gpus: 3 });
    expect(plan.servableRate).toBeGreaterThanOrEqual(tp1.servableRate);
    expect(plan.gpusNeeded).toBe(need.gpusNeeded);
  });

  it('SLAs no size meets, and a budget below one replica of each pool: UnmeetablePlanError saying why', () => {
    expect(unmeetable({ ttftMs: prefillCost(1024) - 1 })).toBe(
      `no prefill replica meets the SLA: one prompt of 1024 tokens alone takes ${+prefillCost(1024).toPrecision(3)} ms on tp1, over the TTFT SLA of ${+(prefillCost(1024) - 1).toPrecision(3)} ms`,
    );
    expect(unmeetable({ itlMs: stepCost(1, 1152) - 0.01 })).toMatch(
      /^no decode replica meets the SLA: one decode step at 1152 tokens of context takes .* ms on tp1, over the ITL SLA of/,
    );
    const tiny = syntheticProfile([syntheticLayout({ kvCapacityTokens: 1000 })]);
    expect(unmeetable({}, tiny)).toBe(
      'no decode replica meets the SLA: one request of 1280 tokens does not fit the KV cache of a tp1 replica (1000 tokens)',
    );
    expect(unmeetable({ isl: 40000 })).toMatch(/a prompt of 40000 tokens is over the model's 32768/);
    expect(unmeetable({ rate: 500, gpus: 1 })).toBe(
      'a budget of 1 GPUs cannot hold 1 tp1 prefill and 1 tp1 decode replicas (2 GPUs)',
    );
  });

  it('bad numbers: BadArgumentError', () => {
    for (const bad of [{ rate: 0 }, { isl: 1.5 }, { osl: -1 }, { ttftMs: NaN }, { gpus: 0 }, { minReplicas: 0 }])
      expect(() => planCapacity(profile, { ...base, ...bad })).toThrow(BadArgumentError);
  });
});

describe('planCapacity: monotone, and within the budget', () => {
  const noisyProfile = fc
    .record({ noise: fc.double({ min: 0, max: 0.9, noNaN: true }), seed: fc.integer({ min: 0, max: 1e6 }) })
    .map(({ noise, seed }) => syntheticProfile([syntheticLayout({ noise, seed })]));
  const request = fc.record({
    rate: fc.double({ min: 0.01, max: 500, noNaN: true }),
    isl: fc.integer({ min: 1, max: 8000 }),
    osl: fc.integer({ min: 1, max: 4000 }),
    ttftMs: fc.constantFrom(2000, 5000),
    itlMs: fc.constantFrom(50, 100),
    gpus: fc.integer({ min: 2, max: 200 }),
  });
  // Small steps find a noisy point between two lengths; large ones cross the whole profile.
  const longer = fc.oneof(fc.integer({ min: 1, max: 64 }), fc.integer({ min: 1, max: 4000 }));

  it('more input per request never means fewer prefill replicas', () => {
    fc.assert(
      fc.property(noisyProfile, request, longer, (p, r, more) => {
        const a = plan(p, r);
        const b = plan(p, { ...r, isl: r.isl + more });
        if (!a || !b) return true;
        return b.prefill.replicasNeeded >= a.prefill.replicasNeeded;
      }),
      { numRuns: 500 },
    );
  });

  it('more output per request never means fewer decode replicas', () => {
    fc.assert(
      fc.property(noisyProfile, request, longer, (p, r, more) => {
        const a = plan(p, r);
        const b = plan(p, { ...r, osl: r.osl + more });
        if (!a || !b) return true;
        return b.decode.replicasNeeded >= a.decode.replicasNeeded;
      }),
      { numRuns: 500 },
    );
  });

  it('a higher rate never means fewer replicas of either pool', () => {
    fc.assert(
      fc.property(noisyProfile, request, fc.double({ min: 1, max: 10, noNaN: true }), (p, r, factor) => {
        const a = plan(p, r);
        const b = plan(p, { ...r, rate: r.rate * factor });
        if (!a || !b) return true;
        const needed =
          b.prefill.replicasNeeded >= a.prefill.replicasNeeded && b.decode.replicasNeeded >= a.decode.replicasNeeded;
        // Deployed replicas too, while both plans meet the SLAs.
        const deployed =
          a.status !== 'ok' ||
          b.status !== 'ok' ||
          (b.prefill.replicas >= a.prefill.replicas && b.decode.replicas >= a.decode.replicas);
        return needed && deployed;
      }),
    );
  });

  it('the budget is respected; a plan that meets the SLAs deploys what they need and serves the rate', () => {
    fc.assert(
      fc.property(noisyProfile, request, (p, r) => {
        const x = plan(p, r);
        if (!x) return true;
        expect(x.gpusUsed).toBeLessThanOrEqual(r.gpus);
        expect(x.gpusUsed).toBe(x.prefill.gpus + x.decode.gpus);
        if (x.status === 'ok') {
          expect(x.prefill.replicas).toBe(x.prefill.replicasNeeded);
          expect(x.decode.replicas).toBe(x.decode.replicasNeeded);
          expect(x.servableRate).toBeGreaterThanOrEqual(r.rate * (1 - 1e-9));
        } else {
          expect(x.gpusNeeded).toBeGreaterThan(r.gpus);
          expect(x.servableRate).toBeLessThan(r.rate);
        }
        return true;
      }),
    );
  });
});
