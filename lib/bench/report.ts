/**
 * bench serve's outputs: the tables (one per target, and the targets side by side with ratios), the JSON
 * report (every request's timings included) and the charts.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { ChartUnavailableError, writeChart } from './chart.js';
import { goodputChart, latencyChart, type ChartRun, type ServeChartContext } from './serve-charts.js';
import type { BenchServeReport, PointResult, TargetResult } from './serve.js';
import type { Distribution } from './stats.js';
import { formatTable, percent, ratio, sig } from './table.js';

const triple = (d: Distribution | null, scale = 1) =>
  d ? `${sig(d.p50 * scale)} / ${sig(d.p90 * scale)} / ${sig(d.p99 * scale)}` : '-';

/** What the run measured, in a line or two. */
export function describeRun(report: BenchServeReport): string {
  const w = report.workload;
  const s = report.settings;
  const sweep =
    s.sweep.kind === 'rate'
      ? `${s.sweep.arrival.kind}${s.sweep.arrival.kind === 'gamma' ? ` (burstiness ${s.sweep.arrival.burstiness})` : ''} arrivals at ${s.sweep.rates.join(', ')} req/s`
      : s.sweep.kind === 'concurrency'
        ? `closed loop at concurrency ${s.sweep.values.join(', ')}`
        : `trace ${w.trace!.file} (${w.trace!.lines} lines, ${sig(w.trace!.spanS)} s) at time scale ${s.sweep.timeScales.join(', ')}`;
  const lengths = w.trace
    ? `lengths from the trace (input p50 ${sig(w.inputTokens?.p50)}, output p50 ${sig(w.outputTokens?.p50)})`
    : `ISL ${w.isl}, OSL ${w.osl}`;
  const prefix = w.sharedPrefix
    ? `; ${w.sharedPrefix.count} shared prefixes of ${w.sharedPrefix.tokens} tokens, ${percent(w.sharedPrefix.share)} of requests`
    : '';
  return (
    `${w.requestsPerPoint} requests per point, ${lengths} tokens${prefix}; ${sweep}; ${s.api} API, streaming` +
    `${s.forceLength ? ', output length forced (ignore_eos, min_tokens)' : ''}; seed ${w.seed}\n` +
    `SLO: TTFT <= ${s.slo.ttftMs} ms and TPOT <= ${s.slo.itlMs} ms per request; a sweep stops under ` +
    `${percent(s.minAttainment)} attainment; tokenizer ${s.tokenizer}`
  );
}

/** One target's table: a row per point. */
export function targetTable(t: TargetResult): string {
  const header = [
    'load',
    'ok/sent',
    'req/s',
    'out tok/s',
    'TTFT ms p50 / p90 / p99',
    'ITL ms p50 / p90 / p99',
    'TPOT ms p50 / p99',
    'E2E s p50 / p99',
    'goodput req/s',
    'SLO met',
    'cache hit',
  ];
  const rows = t.points.map((p) => {
    const s = p.stats;
    return [
      p.load.label,
      `${s.completed}/${s.sent}`,
      sig(s.requestThroughput),
      sig(s.outputTokenThroughput),
      triple(s.ttftMs),
      triple(s.itlMs),
      s.tpotMs ? `${sig(s.tpotMs.p50)} / ${sig(s.tpotMs.p99)}` : '-',
      s.e2eMs ? `${sig(s.e2eMs.p50 / 1000)} / ${sig(s.e2eMs.p99 / 1000)}` : '-',
      sig(s.goodput),
      percent(s.attainment),
      s.cacheHitRate === null ? '-' : percent(s.cacheHitRate),
    ];
  });
  const notes: string[] = [];
  for (const p of t.points) {
    if (p.promptTokensOff)
      notes.push(
        `${p.load.label}: the server counted other prompt lengths than the workload's for ${p.promptTokensOff} requests (another tokenizer? pass --tokenizer)`,
      );
    if (p.sendLagMs && p.sendLagMs.p99 > 50)
      notes.push(
        `${p.load.label}: requests left up to ${sig(p.sendLagMs.p99)} ms (p99) after their schedule (the load generator could not keep up)`,
      );
  }
  if (t.stopped) notes.push(t.stopped);
  return [
    `${t.label}: ${t.model} at ${t.url}${t.kind === 'url' ? '' : ` (${t.source})`}`,
    formatTable(header, rows),
    ...notes.map((n) => `  note: ${n}`),
  ].join('\n');
}

interface Metric {
  name: string;
  value: (p: PointResult) => number | null | undefined;
  format: (x: number | null | undefined) => string;
  /** Whether the ratio column means something for it. */
  ratio: boolean;
}

const METRICS: Metric[] = [
  { name: 'goodput req/s', value: (p) => p.stats.goodput, format: sig, ratio: true },
  { name: 'SLO met', value: (p) => p.stats.attainment, format: (x) => (x == null ? '-' : percent(x)), ratio: false },
  { name: 'TTFT p50 ms', value: (p) => p.stats.ttftMs?.p50, format: sig, ratio: true },
  { name: 'TTFT p90 ms', value: (p) => p.stats.ttftMs?.p90, format: sig, ratio: true },
  { name: 'TTFT p99 ms', value: (p) => p.stats.ttftMs?.p99, format: sig, ratio: true },
  { name: 'ITL p50 ms', value: (p) => p.stats.itlMs?.p50, format: sig, ratio: true },
  { name: 'ITL p99 ms', value: (p) => p.stats.itlMs?.p99, format: sig, ratio: true },
  { name: 'output tok/s', value: (p) => p.stats.outputTokenThroughput, format: sig, ratio: true },
  {
    name: 'prefix cache hit',
    value: (p) => p.stats.cacheHitRate,
    format: (x) => (x == null ? '-' : percent(x)),
    ratio: false,
  },
];

/** The targets side by side, point by point, with each target's ratio to the first. */
export function comparisonTable(targets: TargetResult[]): string {
  const base = targets[0]!;
  const others = targets.slice(1);
  const header = ['load', 'metric', ...targets.map((t) => t.label), ...others.map((t) => `${t.label} / ${base.label}`)];
  const loads = [...new Map(targets.flatMap((t) => t.points.map((p) => [p.load.label, p.load] as const))).values()];
  const rows: string[][] = [];
  for (const load of loads) {
    const at = targets.map((t) => t.points.find((p) => p.load.label === load.label));
    METRICS.forEach((m, i) => {
      const values = at.map((p) => (p ? m.value(p) : undefined));
      rows.push([
        i === 0 ? load.label : '',
        m.name,
        ...values.map((v, k) => (at[k] ? m.format(v) : 'skipped')),
        ...values.slice(1).map((v) => (m.ratio ? ratio(v, values[0]) : '')),
      ]);
    });
  }
  const best = targets.map((t) =>
    t.points.reduce<PointResult | undefined>((b, p) => (!b || p.stats.goodput > b.stats.goodput ? p : b), undefined),
  );
  rows.push([
    'best',
    'max goodput req/s',
    ...best.map((p) => (p ? `${sig(p.stats.goodput)} (${p.load.label})` : '-')),
    ...best.slice(1).map((p) => ratio(p?.stats.goodput, best[0]?.stats.goodput)),
  ]);
  return formatTable(header, rows, ['left', 'left']);
}

/** Everything printed after the run. */
export function formatReport(report: BenchServeReport): string {
  const parts = report.targets.map(targetTable);
  if (report.targets.length > 1) parts.push(`side by side:\n${comparisonTable(report.targets)}`);
  return parts.join('\n\n');
}

/** The runs as the charts draw them. */
export function chartRuns(report: BenchServeReport): ChartRun[] {
  return report.targets.flatMap((t) =>
    t.points.map((p) => ({
      deployment: t.label,
      x: p.load.kind === 'concurrency' ? p.load.value : (p.load.offeredRate ?? p.load.value),
      goodput: p.stats.goodput,
      throughput: p.stats.requestThroughput,
      attainment: p.stats.attainment,
      ttftMs: p.stats.ttftMs,
      itlMs: p.stats.itlMs,
    })),
  );
}

/** Writes the JSON report. */
export function writeReportJson(file: string, report: BenchServeReport): void {
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, JSON.stringify(report, null, 1) + '\n');
}

/**
 * Writes `<stem>-goodput.svg` and `<stem>-latency.svg`; returns the files written, or the reason there are none
 * (vega not installed, nothing measured).
 */
export async function writeServeCharts(stem: string, report: BenchServeReport): Promise<string[] | string> {
  const runs = chartRuns(report);
  if (runs.length === 0) return 'nothing was measured';
  const w = report.workload;
  const ctx: ServeChartContext = {
    load: report.settings.sweep.kind,
    slo: report.settings.slo,
    minAttainment: report.settings.minAttainment,
    subtitle:
      `${report.targets[0]!.model}, ` +
      (w.trace ? `trace ${w.trace.file}` : `ISL ${w.isl}, OSL ${w.osl}`) +
      `, ${w.requestsPerPoint} requests per point, ${report.settings.api} API` +
      (report.host.gpus.length ? `; ${report.host.gpus.join(', ')}` : `; ${report.host.cores}-core CPU`),
  };
  const files = [`${stem}-goodput.svg`, `${stem}-latency.svg`];
  try {
    await writeChart(files[0]!, goodputChart(runs, ctx));
    await writeChart(files[1]!, latencyChart(runs, ctx));
  } catch (error) {
    if (error instanceof ChartUnavailableError) return error.message;
    throw error;
  }
  return files;
}
