import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import {
  DecisionHistory,
  Planner,
  PlannerSpecSchema,
  planCapacity,
  UnmeetablePlanError,
  type Decision,
} from '../../lib/planner/index.js';
import { syntheticLayout, syntheticProfile } from './synthetic.js';

describe('DecisionHistory', () => {
  it('numbers and stamps decisions, keeps the newest `capacity`', () => {
    const h = new DecisionHistory<Decision<'x', number, number>>(3);
    for (let i = 0; i < 5; i++) h.record({ kind: 'x', inputs: i, outputs: i * 2, reason: `r${i}`, at: `t${i}` });
    expect(h.list().map((d) => [d.id, d.inputs, d.at])).toEqual([
      [3, 2, 't2'],
      [4, 3, 't3'],
      [5, 4, 't4'],
    ]);
    expect(h.total).toBe(5);
    expect(h.latest()!.outputs).toBe(8);
    expect(new DecisionHistory().record({ kind: 'y', inputs: 0, outputs: 0, reason: '' }).at).toMatch(
      /^\d{4}-\d\d-\d\dT/,
    );
    expect(() => new DecisionHistory(0)).toThrow(BadArgumentError);
  });
});

describe('Planner', () => {
  const profile = syntheticProfile();
  const sla = { ttftMs: 500, itlMs: 30, maxGpus: 64 };

  it('each interval: the forecast load planned, the decision with its inputs and outputs recorded', () => {
    const planner = new Planner({ ...sla, profile, replicas: { prefill: 1, decode: 1 } });
    planner.planInterval({ rate: 10, isl: 1024, osl: 256 }, 0);
    const d = planner.planInterval({ rate: 20, isl: 1024, osl: 256 }, 60_000);
    expect(d.kind).toBe('sla');
    expect(d.id).toBe(2);
    // Holt: level 15, trend 1.5.
    expect(d.inputs.forecast).toEqual({ rate: 16.5, isl: 1024, osl: 256 });
    expect(d.inputs.models.rate).toBe('holt(alpha=0.5, beta=0.3)');
    const expected = planCapacity(profile, { rate: 16.5, isl: 1024, osl: 256, ...sla, gpus: 64 });
    expect(d.outputs.plan).toEqual(expected);
    expect(d.outputs.replicas).toEqual({ prefill: expected.prefill.replicas, decode: expected.decode.replicas });
    expect(planner.replicas).toEqual(d.outputs.replicas);
    expect(planner.history.list()).toHaveLength(2);
  });

  it('an interval whose SLAs cannot be met keeps the replicas and says why', () => {
    const planner = new Planner({ ...sla, ttftMs: 1, profile, replicas: { prefill: 2, decode: 3 } });
    const d = planner.planInterval({ rate: 10, isl: 1024, osl: 256 }, 0);
    expect(d.outputs.plan).toBeNull();
    expect(d.reason).toMatch(/^no prefill replica meets the SLA: /);
    expect(planner.replicas).toEqual({ prefill: 2, decode: 3 });
  });

  it('a new plan starts a cool-down: the load-based correction does not undo it at once', () => {
    const planner = new Planner({ ...sla, cooldownMs: 10_000, profile, replicas: { prefill: 1, decode: 1 } });
    const planned = planner.planInterval({ rate: 10, isl: 1024, osl: 256 }, 0).outputs.replicas;
    for (let t = 1; t <= 9; t++) planner.observeLoad({ atMs: t * 1000, prefillTtftMs: [], decodeItlMs: [] });
    expect(planner.replicas).toEqual(planned);
    const later = planner.observeLoad({ atMs: 10_000, prefillTtftMs: [], decodeItlMs: [] });
    expect(later.outputs.action.kind).toBe('remove');
    expect(later.inputs.atMs).toBe(10_000);
    expect(planner.history.latest()).toBe(later);
  });

  it("the correction counts the planned layouts' GPUs: a TP 2 replica does not fit one free GPU", () => {
    const two = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 2.5 })]);
    const load = { rate: 100, isl: 1024, osl: 256 };
    const planned = planCapacity(two, { ...load, ...sla, gpus: 64 });
    expect(planned.prefill.gpusPerReplica).toBe(2);
    const maxGpus = planned.gpusUsed + 1;
    const planner = new Planner({ ...sla, maxGpus, cooldownMs: 0, profile: two, replicas: { prefill: 1, decode: 1 } });
    expect(planner.planInterval(load, 0).outputs.plan!.prefill.replicas).toBe(planned.prefill.replicas);
    let last;
    for (let t = 1; t <= 3; t++) last = planner.observeLoad({ atMs: t, prefillTtftMs: [900, 900], decodeItlMs: [20] });
    expect(last!.outputs.action.kind).toBe('hold');
    expect(last!.reason).toMatch(/^prefill misses its TTFT 500 ms but the GPU budget \(\d+\) is full/);
    expect(planner.replicas.prefill).toBe(planned.prefill.replicas);
  });

  it('mode load: no profile, no planInterval', () => {
    const planner = new Planner({ ...sla, replicas: { prefill: 1, decode: 1 } });
    expect(() => planner.planInterval({ rate: 1, isl: 1, osl: 1 }, 0)).toThrow(UnmeetablePlanError);
  });
});

describe("the graph's planner section", () => {
  it('defaults: off, 60 s, one replica', () => {
    expect(PlannerSpecSchema.parse({})).toEqual({ mode: 'off', intervalS: 60, minReplicas: 1 });
    expect(PlannerSpecSchema.parse({ mode: 'sla', ttftMs: 500, itlMs: 50, maxGpus: 8, profile: 'p.json' })).toEqual({
      mode: 'sla',
      ttftMs: 500,
      itlMs: 50,
      intervalS: 60,
      minReplicas: 1,
      maxGpus: 8,
      profile: 'p.json',
    });
  });

  it('every problem with its path', () => {
    const issues = (value: unknown) =>
      PlannerSpecSchema.safeParse(value).error!.issues.map((i) => `${i.path.join('.')}: ${i.message}`);
    expect(issues({ mode: 'fast' })).toEqual(['mode: must be one of off, load, sla']);
    expect(issues({ mode: 'load' })).toEqual([
      'ttftMs: is required when mode is load',
      'itlMs: is required when mode is load',
    ]);
    expect(issues({ mode: 'sla', ttftMs: 1, itlMs: 1 })).toEqual([
      'profile: is required when mode is sla (write one with tandem profile)',
    ]);
    expect(issues({ ttftMs: -1, minReplicas: 0.5, bogus: 1 })).toEqual([
      'ttftMs: must be a positive number of milliseconds',
      'minReplicas: must be a positive integer',
      ': Unrecognized key: "bogus"',
    ]);
  });
});
