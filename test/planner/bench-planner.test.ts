/**
 * bench:planner's parts that do not need a deployment: the two-phase trace generator (seeded, phases in order,
 * lengths and rates as asked, written as Mooncake JSONL that bench:serve reads back), the per-phase SLO
 * attainment arithmetic, and the graphs of the variants.
 */
import { describe, expect, it } from 'vitest';
import { phaseResult, variantGraph } from '../../lib/bench/planner.js';
import type { RequestTiming } from '../../lib/bench/stats.js';
import { parseTrace, phasedTrace, traceToJsonl, TraceFormatError, type TracePhase } from '../../lib/bench/trace.js';
import { parseGraph } from '../../lib/deploy/graph.js';
import { stringify } from 'yaml';

const PHASES: TracePhase[] = [
  { name: 'long prompts', isl: 1024, osl: 8, rate: 2, seconds: 200 },
  { name: 'long answers', isl: 32, osl: 768, rate: 3, seconds: 100 },
];

describe('phasedTrace: a seeded two-phase traffic shift', () => {
  it('the same seed gives the same trace; another seed another', () => {
    const a = phasedTrace(PHASES, 1);
    expect(phasedTrace(PHASES, 1)).toEqual(a);
    const b = phasedTrace(PHASES, 2);
    expect(b.requests.map((r) => r.timestampMs)).not.toEqual(a.requests.map((r) => r.timestampMs));
  });

  it('phase 1 then phase 2: arrival times, lengths within the jitter, counts near rate x seconds', () => {
    const { requests, phaseOf, phaseStartMs } = phasedTrace(PHASES, 7, 0.1);
    expect(phaseStartMs).toEqual([0, 200_000]);
    expect(requests.length).toBe(phaseOf.length);
    const first = requests.filter((_, i) => phaseOf[i] === 0);
    const second = requests.filter((_, i) => phaseOf[i] === 1);
    // Phase 0 comes first, wholly: every request of phase 0 before every one of phase 1.
    expect(phaseOf.indexOf(1)).toBe(first.length);
    for (const r of first) {
      expect(r.timestampMs).toBeGreaterThanOrEqual(0);
      expect(r.timestampMs).toBeLessThanOrEqual(200_000);
      expect(r.inputLength).toBeGreaterThanOrEqual(Math.round(1024 * 0.9));
      expect(r.inputLength).toBeLessThanOrEqual(Math.round(1024 * 1.1));
      expect(r.outputLength).toBeGreaterThanOrEqual(7);
      expect(r.outputLength).toBeLessThanOrEqual(9);
    }
    for (const r of second) {
      expect(r.timestampMs).toBeGreaterThanOrEqual(200_000);
      expect(r.timestampMs).toBeLessThanOrEqual(300_000);
      expect(r.inputLength).toBeLessThanOrEqual(35);
      expect(r.outputLength).toBeGreaterThanOrEqual(Math.round(768 * 0.9));
    }
    // Poisson counts: 400 and 300 expected, sd 20 and 17; 5 sd either way.
    expect(Math.abs(first.length - 400)).toBeLessThan(100);
    expect(Math.abs(second.length - 300)).toBeLessThan(87);
    // In arrival order, one line number each, no prompt block shared.
    for (let i = 1; i < requests.length; i++)
      expect(requests[i]!.timestampMs).toBeGreaterThanOrEqual(requests[i - 1]!.timestampMs);
    const ids = requests.flatMap((r) => r.hashIds);
    expect(new Set(ids).size).toBe(ids.length);
  });

  it('as Mooncake JSONL, bench:serve --trace reads back the same requests', () => {
    const { requests } = phasedTrace(PHASES, 3);
    expect(parseTrace(traceToJsonl(requests), 'planner-trace.jsonl')).toEqual(requests);
  });

  it('a phase without requests to make is refused, naming it', () => {
    expect(() => phasedTrace([{ ...PHASES[0]!, rate: 0 }], 1)).toThrow(TraceFormatError);
    expect(() => phasedTrace([{ ...PHASES[0]!, rate: 0 }], 1)).toThrow(/phase long prompts: rate must be > 0/);
    expect(() => phasedTrace([], 1)).toThrow(/no phases/);
  });
});

function timing(index: number, over: Partial<RequestTiming>): RequestTiming {
  return {
    index,
    scheduledMs: 0,
    sentMs: 0,
    ttftMs: 100,
    itlMs: [],
    e2eMs: 100 + 9 * 5,
    outputTokens: 10,
    usage: true,
    promptTokens: 10,
    cachedTokens: null,
    error: null,
    ...over,
  };
}

describe('phaseResult: SLO attainment of one phase', () => {
  it('counts TTFT and ITL apart and together; failed and missing requests are lost and meet nothing', () => {
    const slo = { ttftMs: 200, itlMs: 10 };
    const byIndex = new Map<number, RequestTiming>([
      [0, timing(0, {})], // both met (TPOT 5 ms)
      [1, timing(1, { ttftMs: 500, e2eMs: 500 + 45 })], // TTFT missed
      [2, timing(2, { e2eMs: 100 + 9 * 20 })], // ITL missed (TPOT 20 ms)
      [3, timing(3, { error: 'HTTP 500: boom', ttftMs: null })], // failed
      // 4: never answered
    ]);
    const r = phaseResult('p', [0, 1, 2, 3, 4], byIndex, slo);
    expect(r).toMatchObject({ phase: 'p', requests: 5, completed: 3, lost: 2 });
    expect(r.ttftAttainment).toBeCloseTo(2 / 5);
    expect(r.itlAttainment).toBeCloseTo(2 / 5);
    expect(r.attainment).toBeCloseTo(1 / 5);
    expect(r.ttftMs!.count).toBe(3);
    expect(r.tpotMs!.max).toBeCloseTo(20);
  });
});

describe('variantGraph', () => {
  const config = {
    slo: { ttftMs: 1000, itlMs: 10 },
    knobs: { intervalS: 2, scaleUpAfterS: 4, scaleDownAfterS: 3600, cooldownS: 10 },
    threads: 1,
  };
  it('fixed pools: the split asked, planner off; planner: mode load with the knobs; both valid graphs, strict disaggregation', () => {
    const fixed = variantGraph({ label: 'f', prefill: 2, decode: 1, planner: false }, config);
    expect(fixed.pools.map((p) => [p.role, p.replicas, p.device])).toEqual([
      ['prefill', 2, 'cpu'],
      ['decode', 1, 'cpu'],
    ]);
    expect(fixed.planner.mode).toBe('off');
    const planned = variantGraph({ label: 'p', prefill: 1, decode: 2, planner: true }, config);
    expect(planned.planner).toMatchObject({
      mode: 'load',
      ttftMs: 1000,
      itlMs: 10,
      intervalS: 2,
      scaleUpAfterS: 4,
      cooldownS: 10,
      connector: 'local',
    });
    for (const g of [fixed, planned]) {
      expect(g.disaggregation.maxPrefillQueue).toBeGreaterThan(1000);
      // What the launcher would load from a file: the graph validates as it is.
      expect(parseGraph(stringify(g)).planner).toEqual(g.planner);
    }
  });
});
