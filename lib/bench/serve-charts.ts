/**
 * bench serve's charts: goodput (and throughput, and SLO attainment) against the offered load, one line per
 * deployment; TTFT and ITL percentiles against the offered load, one panel each, the SLO drawn across.
 */
import { axisFor, colourScheme, PANEL_HEIGHT, PANEL_WIDTH, panels, type ChartSpec } from './chart.js';
import type { Slo } from './stats.js';

/** One run, as the charts need it. */
export interface ChartRun {
  deployment: string;
  /** The offered load: request rate (req/s) or concurrency. */
  x: number;
  goodput: number;
  throughput: number;
  attainment: number;
  ttftMs: { p50: number; p90: number; p99: number } | null;
  itlMs: { p50: number; p90: number; p99: number } | null;
}

export interface ServeChartContext {
  /** What x is. */
  load: 'rate' | 'concurrency' | 'trace';
  slo: Slo;
  minAttainment: number;
  /** One line about the workload, under the titles. */
  subtitle: string;
}

const X_TITLE = {
  rate: 'request rate (req/s)',
  concurrency: 'concurrency (requests in flight)',
  trace: 'offered rate (req/s, trace time-scaled)',
};

/** Lines of one kind (goodput, a percentile) drawn solid, dashed, dotted: the legend shows them as lines. */
const DASHES = [
  [1, 0],
  [7, 4],
  [2, 3],
];
const DASH_LEGEND = { symbolType: 'stroke', symbolSize: 700, symbolStrokeWidth: 2.5 };

function xAxis(runs: ChartRun[], load: ServeChartContext['load']): ChartSpec {
  const xs = [...new Set(runs.map((r) => r.x))].sort((a, b) => a - b);
  // The measured loads are the ticks, unless there are too many to read.
  return axisFor('x', X_TITLE[load], xs, { base: 2, zero: false, ...(xs.length <= 10 ? { ticks: xs } : {}) });
}

function colour(runs: ChartRun[]): ChartSpec {
  const names = [...new Set(runs.map((r) => r.deployment))];
  return {
    field: 'deployment',
    type: 'nominal',
    title: 'deployment',
    sort: names,
    scale: { scheme: colourScheme(names.length) },
  };
}

/** A horizontal dashed line at `y`; with `label`, labelled at its left end. */
function ruleAt(y: number, label?: string): ChartSpec[] {
  const data = { values: [{ y, label: label ?? '' }] };
  return [
    {
      data,
      mark: { type: 'rule', color: '#555', strokeDash: [6, 4], strokeWidth: 1.5 },
      encoding: { y: { field: 'y', type: 'quantitative' } },
    },
    ...(label
      ? [
          {
            data,
            mark: { type: 'text', align: 'left', baseline: 'bottom', dy: -3, color: '#333', fontSize: 12 },
            encoding: { y: { field: 'y', type: 'quantitative' }, x: { value: 4 }, text: { field: 'label' } },
          },
        ]
      : []),
  ];
}

/** Goodput and throughput (req/s) against the load, and SLO attainment (%) against the load. */
export function goodputChart(runs: ChartRun[], ctx: ServeChartContext): ChartSpec {
  const kinds = ['goodput (met the SLO)', 'throughput (all completed)'];
  const rows = runs.flatMap((r) => [
    { deployment: r.deployment, x: r.x, line: kinds[0], value: r.goodput },
    { deployment: r.deployment, x: r.x, line: kinds[1], value: r.throughput },
  ]);
  // Open loop: the offered rate, which goodput meets while the deployment keeps up.
  const offered = ctx.load === 'concurrency' ? [] : [...new Set(runs.map((r) => r.x))].sort((a, b) => a - b);
  const y = axisFor(
    'value',
    'requests per second',
    [...rows.map((r) => r.value), ...offered].filter((v) => v > 0),
  );
  const x = xAxis(runs, ctx.load);
  const goodput: ChartSpec = {
    width: PANEL_WIDTH,
    height: PANEL_HEIGHT,
    title: 'Goodput and throughput',
    layer: [
      ...(offered.length > 1
        ? [
            {
              data: { values: offered.map((v) => ({ x: v, value: v })) },
              mark: { type: 'line', color: '#aaa', strokeDash: [2, 4], strokeWidth: 1.5 },
              encoding: { x, y },
            },
            {
              data: { values: [{ x: offered.at(-1), value: offered.at(-1), label: 'offered' }] },
              mark: { type: 'text', align: 'right', baseline: 'bottom', dx: -4, dy: -2, color: '#777', fontSize: 12 },
              encoding: { x, y, text: { field: 'label' } },
            },
          ]
        : []),
      {
        data: { values: rows },
        mark: { type: 'line', point: true },
        encoding: {
          x,
          y,
          color: colour(runs),
          strokeDash: {
            field: 'line',
            type: 'nominal',
            title: 'line',
            sort: kinds,
            scale: { domain: kinds, range: DASHES.slice(0, 2) },
            legend: DASH_LEGEND,
          },
        },
      },
    ],
  };
  const attainment: ChartSpec = {
    width: PANEL_WIDTH,
    height: PANEL_HEIGHT,
    title: `SLO attainment (TTFT <= ${ctx.slo.ttftMs} ms, TPOT <= ${ctx.slo.itlMs} ms)`,
    layer: [
      {
        data: { values: runs.map((r) => ({ deployment: r.deployment, x: r.x, percent: r.attainment * 100 })) },
        mark: { type: 'line', point: true },
        encoding: {
          x: xAxis(runs, ctx.load),
          y: {
            field: 'percent',
            type: 'quantitative',
            title: 'requests meeting the SLO (%)',
            scale: { domain: [0, 100] },
          },
          color: colour(runs),
        },
      },
      ...(ctx.minAttainment > 0 ? ruleAt(ctx.minAttainment * 100, `sweep floor ${ctx.minAttainment * 100}%`) : []),
    ],
  };
  return panels({ text: 'bench serve: goodput against load', subtitle: ctx.subtitle }, [goodput, attainment]);
}

/** TTFT and ITL p50 / p90 / p99 (ms) against the load, one panel each, with the SLO. */
export function latencyChart(runs: ChartRun[], ctx: ServeChartContext): ChartSpec {
  const percentiles = ['p50', 'p90', 'p99'] as const;
  const panel = (what: 'ttftMs' | 'itlMs', title: ChartSpec, axisTitle: string, slo: number) => {
    const rows = runs.flatMap((r) => {
      const d = r[what];
      return d ? percentiles.map((p) => ({ deployment: r.deployment, x: r.x, percentile: p, ms: d[p] })) : [];
    });
    return {
      width: PANEL_WIDTH,
      height: PANEL_HEIGHT,
      title,
      layer: [
        {
          data: { values: rows },
          mark: { type: 'line', point: true },
          encoding: {
            x: xAxis(runs, ctx.load),
            y: axisFor('ms', axisTitle, [...rows.map((r) => r.ms), slo]),
            color: colour(runs),
            strokeDash: {
              field: 'percentile',
              type: 'nominal',
              title: 'percentile',
              sort: percentiles,
              scale: { domain: percentiles, range: DASHES },
              legend: DASH_LEGEND,
            },
          },
        },
        ...ruleAt(slo),
      ],
    } as ChartSpec;
  };
  return panels({ text: 'bench serve: latency against load', subtitle: ctx.subtitle }, [
    panel(
      'ttftMs',
      { text: 'Time to first token (TTFT)', subtitle: `dashed: the SLO, ${ctx.slo.ttftMs} ms` },
      'TTFT (ms)',
      ctx.slo.ttftMs,
    ),
    panel(
      'itlMs',
      {
        text: 'Inter-token latency (ITL)',
        subtitle: `dashed: the SLO, ${ctx.slo.itlMs} ms on each request's mean (TPOT)`,
      },
      'ITL (ms)',
      ctx.slo.itlMs,
    ),
  ]);
}
