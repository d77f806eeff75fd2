import { describe, expect, it } from 'vitest';
import {
  DEFAULT_SLO,
  distribution,
  median,
  meetsSlo,
  percentile,
  runStats,
  tpotMs,
  type RequestTiming,
} from '../../lib/bench/stats.js';

// Percentile and goodput arithmetic on synthetic timings, at the SLO's boundaries.

function timing(fields: Partial<RequestTiming> & { index: number }): RequestTiming {
  return {
    scheduledMs: null,
    sentMs: 0,
    ttftMs: 100,
    itlMs: [],
    e2eMs: 100,
    outputTokens: 1,
    usage: true,
    promptTokens: 10,
    cachedTokens: null,
    error: null,
    ...fields,
  };
}

/** A request of `tokens` tokens: first at `ttft`, then one every `gap` ms. */
function steady(index: number, sentMs: number, ttft: number, gap: number, tokens: number): RequestTiming {
  return timing({
    index,
    sentMs,
    ttftMs: ttft,
    itlMs: new Array(tokens - 1).fill(gap),
    e2eMs: ttft + gap * (tokens - 1),
    outputTokens: tokens,
  });
}

describe('percentiles', () => {
  it("interpolate linearly between closest ranks (numpy's default)", () => {
    const xs = [1, 2, 3, 4];
    expect(percentile(xs, 0)).toBe(1);
    expect(percentile(xs, 50)).toBe(2.5);
    expect(percentile(xs, 90)).toBeCloseTo(3.7, 12);
    expect(percentile(xs, 99)).toBeCloseTo(3.97, 12);
    expect(percentile(xs, 100)).toBe(4);
    expect(percentile([7], 99)).toBe(7);
    expect(percentile([], 50)).toBeNaN();
    // 1..100: p99 is 99.01, p90 90.1.
    const hundred = Array.from({ length: 100 }, (_, i) => i + 1);
    expect(percentile(hundred, 99)).toBeCloseTo(99.01, 12);
    expect(percentile(hundred, 90)).toBeCloseTo(90.1, 12);
  });

  it('distribution sorts its input and reports count, mean, extremes, p50 / p90 / p99', () => {
    expect(distribution([4, 1, 3, 2])).toEqual({
      count: 4,
      mean: 2.5,
      min: 1,
      p50: 2.5,
      p90: expect.closeTo(3.7, 12),
      p99: expect.closeTo(3.97, 12),
      max: 4,
    });
    expect(distribution([])).toBeNull();
  });
});

describe('goodput under an SLO', () => {
  const slo = { ttftMs: 2000, itlMs: 25 };

  it('TPOT is (E2E - TTFT) / (tokens - 1); one-token requests have none', () => {
    expect(tpotMs(steady(0, 0, 100, 20, 11))).toBe(20);
    expect(tpotMs(timing({ index: 0, outputTokens: 1 }))).toBeNull();
    expect(tpotMs(timing({ index: 0, outputTokens: 5, error: 'HTTP 500: boom' }))).toBeNull();
  });

  it('a request meets the SLO with TTFT <= the TTFT objective and TPOT <= the ITL objective, boundaries included', () => {
    expect(DEFAULT_SLO).toEqual({ ttftMs: 2000, itlMs: 25 });
    expect(meetsSlo(steady(0, 0, 2000, 25, 11), slo)).toBe(true);
    expect(meetsSlo(steady(0, 0, 2000.001, 25, 11), slo)).toBe(false);
    expect(meetsSlo(steady(0, 0, 2000, 25.001, 11), slo)).toBe(false);
    // The mean gap is judged, not each gap: one 40 ms gap among 5 ms ones still meets 25 ms.
    const uneven = timing({ index: 0, ttftMs: 10, itlMs: [5, 5, 40, 5], e2eMs: 65, outputTokens: 5 });
    expect(tpotMs(uneven)).toBe(13.75);
    expect(meetsSlo(uneven, slo)).toBe(true);
    // One token: TTFT alone.
    expect(meetsSlo(timing({ index: 0, ttftMs: 1999, e2eMs: 1999 }), slo)).toBe(true);
    // Failed or textless: never.
    expect(meetsSlo(timing({ index: 0, error: 'timed out after 10 ms' }), slo)).toBe(false);
    expect(meetsSlo(timing({ index: 0, ttftMs: null }), slo)).toBe(false);
  });

  it('run statistics: duration from the first send to the last end; goodput and attainment', () => {
    const timings = [
      steady(0, 0, 100, 20, 11), // meets: ends at 300
      steady(1, 100, 2500, 10, 11), // TTFT too long: ends at 2700
      steady(2, 200, 100, 30, 11), // TPOT too long: ends at 600
      timing({ index: 3, sentMs: 300, ttftMs: null, e2eMs: 50, outputTokens: 0, error: 'HTTP 503: no worker' }),
      steady(4, 4000, 50, 5, 2), // meets: ends at 4055
    ];
    const s = runStats(timings, [10, 10, 10, 10, 10], slo);
    expect(s.durationS).toBeCloseTo(4.055, 12);
    expect({ sent: s.sent, completed: s.completed, failed: s.failed, sloMet: s.sloMet }).toEqual({
      sent: 5,
      completed: 4,
      failed: 1,
      sloMet: 2,
    });
    expect(s.goodput).toBeCloseTo(2 / 4.055, 12);
    expect(s.attainment).toBe(2 / 5);
    expect(s.requestThroughput).toBeCloseTo(4 / 4.055, 12);
    expect(s.outputTokenThroughput).toBeCloseTo((11 * 3 + 2) / 4.055, 12);
    expect(s.inputTokenThroughput).toBeCloseTo(40 / 4.055, 12);
    // TTFT over completed requests; ITL over every gap of every completed request.
    expect(s.ttftMs).toMatchObject({ count: 4, min: 50, max: 2500, p50: 100 });
    expect(s.itlMs).toMatchObject({ count: 31, min: 5, max: 30 });
    expect(s.itlMs!.p50).toBe(20);
    expect(s.tpotMs).toMatchObject({ count: 4, min: 5, max: 30 });
    expect(s.e2eMs!.max).toBe(2600);
  });

  it("input tokens: the server's count when it gave usage, else the workload's", () => {
    const timings = [
      timing({ index: 0, promptTokens: 12, e2eMs: 1000 }),
      timing({ index: 1, promptTokens: null, usage: false, e2eMs: 1000 }),
    ];
    expect(runStats(timings, [99, 30], slo).inputTokenThroughput).toBe(42);
  });

  it('cache hit rate: cached / prompt tokens of the completed requests that say; null when none does', () => {
    const timings = [
      timing({ index: 0, promptTokens: 100, cachedTokens: 80 }),
      timing({ index: 1, promptTokens: 100, cachedTokens: 0 }),
      timing({ index: 2, promptTokens: 300, cachedTokens: null }), // says nothing: not counted
      timing({ index: 3, promptTokens: 100, cachedTokens: 100, error: 'failed' }),
    ];
    expect(runStats(timings, [0, 0, 0, 0], slo).cacheHitRate).toBe(0.4);
    expect(runStats([timing({ index: 0 })], [10], slo).cacheHitRate).toBeNull();
  });

  it('an empty run is all zeros, not NaN', () => {
    const s = runStats([], [], slo);
    expect({ goodput: s.goodput, attainment: s.attainment, durationS: s.durationS, ttft: s.ttftMs }).toEqual({
      goodput: 0,
      attainment: 0,
      durationS: 0,
      ttft: null,
    });
  });
});

describe('median', () => {
  it('is the middle value of an odd count and the mean of the middle two of an even one, in any order', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([7])).toBe(7);
    expect(median([5, 5, 1, 9, 9, 1])).toBe(5);
    expect(median([])).toBeNaN();
  });
});
