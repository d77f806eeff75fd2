import { describe, expect, it } from 'vitest';
import { axisFor, logTicks, renderSvg, scaleFor, spansDecades } from '../../lib/bench/chart.js';
import { chartRuns, comparisonTable, targetTable } from '../../lib/bench/report.js';
import { goodputChart, latencyChart } from '../../lib/bench/serve-charts.js';
import type { PointResult, TargetResult } from '../../lib/bench/serve.js';
import { runStats, type RequestTiming } from '../../lib/bench/stats.js';
import { formatTable, plain, ratio, sig } from '../../lib/bench/table.js';

// The tables and charts of bench serve on synthetic results: the numbers printed are the ones measured, the
// ratios are against the first target, and the charts follow the standard of lib/bench/chart.ts.
const slo = { ttftMs: 2000, itlMs: 25 };

function point(rate: number, ttft: number, gap: number): PointResult {
  const requests: RequestTiming[] = Array.from({ length: 4 }, (_, i) => ({
    index: i,
    scheduledMs: i * 100,
    sentMs: i * 100,
    ttftMs: ttft,
    itlMs: [gap, gap, gap],
    e2eMs: ttft + 3 * gap,
    outputTokens: 4,
    usage: true,
    cachedTokens: null,
    promptTokens: 10,
    error: null,
  }));
  return {
    load: { kind: 'rate', value: rate, label: `rate ${rate}/s`, offeredRate: rate },
    stats: runStats(requests, [10, 10, 10, 10], slo),
    promptTokensOff: 0,
    sendLagMs: null,
    errors: [],
    requests,
  };
}

const target = (label: string, points: PointResult[]): TargetResult => ({
  label,
  kind: 'deploy',
  source: `${label}.yaml`,
  url: 'http://127.0.0.1:1',
  model: 'dummy:tiny',
  graph: null,
  points,
  stopped: null,
});

describe('tables', () => {
  it('numbers: three significant digits, plain rates, ratios', () => {
    expect([sig(0.012345), sig(1.2345), sig(123.45), sig(12345.6), sig(null), sig(0)]).toEqual([
      '0.0123',
      '1.23',
      '123',
      '12346',
      '-',
      '0',
    ]);
    expect([plain(8), plain(0.5), plain(12.34), plain(1250)]).toEqual(['8', '0.5', '12.3', '1250']);
    expect([ratio(3, 2), ratio(1, 0), ratio(null, 2)]).toEqual(['1.5x', '-', '-']);
    expect(formatTable(['a', 'bb'], [['xyz', '1']])).toBe('a    bb\n---  --\nxyz   1');
  });

  it("a target's table has a row per point with the measured percentiles", () => {
    const table = targetTable(target('agg', [point(1, 100, 20), point(2, 3000, 20)]));
    expect(table).toMatch(/^agg: dummy:tiny at http:\/\/127\.0\.0\.1:1 \(agg\.yaml\)$/m);
    // The last columns: SLO met, cache hit (none reported here).
    expect(table).toMatch(/^rate 1\/s\s+4\/4\s.*\s100 \/ 100 \/ 100\s+20\.0 \/ 20\.0 \/ 20\.0\s.*\s100%\s+-$/m);
    expect(table).toMatch(/^rate 2\/s\s+4\/4\s.*\s0%\s+-$/m);
  });

  it('side by side: every metric of every target, ratios to the first, skipped points marked', () => {
    const a = target('agg', [point(1, 100, 20), point(2, 200, 20)]);
    const b = target('disagg', [point(1, 50, 10)]);
    b.stopped = 'under the floor';
    const table = comparisonTable([a, b]);
    expect(table.split('\n')[0]).toMatch(/^load\s+metric\s+agg\s+disagg\s+disagg \/ agg$/);
    expect(table).toMatch(/^rate 1\/s\s+goodput req\/s\s+8\.70\s+10\.5\s+1\.21x$/m);
    expect(table).toMatch(/^\s+TTFT p50 ms\s+100\s+50\.0\s+0\.5x$/m);
    expect(table).toMatch(/^\s+ITL p99 ms\s+20\.0\s+10\.0\s+0\.5x$/m);
    expect(table).toMatch(/^\s+TTFT p90 ms\s+100\s+50\.0\s+0\.5x$/m);
    expect(table).toMatch(/^\s+prefix cache hit\s+-\s+-\s*$/m);
    expect(table).toMatch(/^rate 2\/s\s+goodput req\/s\s+\S+\s+skipped\s+-$/m);
    expect(table).toMatch(/^best\s+max goodput req\/s\s+8\.70 \(rate 1\/s\)\s+10\.5 \(rate 1\/s\)\s+1\.21x$/m);
  });
});

describe('charts', () => {
  it('a log axis where values span a decade, with 1-2-5 ticks; linear otherwise', () => {
    expect(spansDecades([3, 40])).toBe(true);
    expect(spansDecades([3, 29])).toBe(false);
    expect(spansDecades([0, 100])).toBe(false);
    expect(scaleFor([1, 100], { base: 2 })).toEqual({ type: 'log', base: 2 });
    expect(scaleFor([5, 20])).toMatchObject({ type: 'linear' });
    expect(logTicks(3, 400)).toEqual([2, 5, 10, 20, 50, 100, 200, 500, 1000]);
    expect(axisFor('x', 't', [1, 2, 4, 8, 16], { ticks: [1, 2, 4, 8, 16] }).axis).toMatchObject({
      values: [1, 2, 4, 8, 16],
    });
  });

  it('goodput and latency charts render with whole legend labels, units and the SLO', async () => {
    const report = {
      targets: [target('agg-1gpu', [point(1, 100, 20), point(16, 900, 30)]), target('disagg-1gpu', [point(1, 80, 10)])],
    };
    const runs = chartRuns(report as never);
    expect(runs.map((r) => [r.deployment, r.x])).toEqual([
      ['agg-1gpu', 1],
      ['agg-1gpu', 16],
      ['disagg-1gpu', 1],
    ]);
    const ctx = { load: 'rate' as const, slo, minAttainment: 0.5, subtitle: 'dummy:tiny' };
    const goodput = await renderSvg(goodputChart(runs, ctx));
    for (const text of [
      'agg-1gpu',
      'disagg-1gpu',
      'goodput (met the SLO)',
      'throughput (all completed)',
      'request rate (req/s)',
    ])
      expect(goodput).toContain(text);
    const latency = await renderSvg(latencyChart(runs, ctx));
    for (const text of ['TTFT (ms)', 'ITL (ms)', 'p50', 'p90', 'p99', 'dashed: the SLO, 2000 ms'])
      expect(latency).toContain(text);
    // Two deployments, two distinct colours (Tableau 10's first two).
    expect(goodput).toContain('#4c78a8');
    expect(goodput).toContain('#f58518');
  });
});
