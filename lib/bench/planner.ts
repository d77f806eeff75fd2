/**
 * bench:planner: a traffic shift served by fixed pools and by the planner, on the same number of CPU workers.
 *
 * The trace (trace.ts `phasedTrace`, seeded): phase 1, long prompts and short answers (prefill-bound); phase 2,
 * short prompts and long answers (decode-bound). Each variant is a deployment of dummy:tiny on CPU workers
 * started by the launcher in this process: fixed pools (prefill + decode workers as given, planner off) or the
 * planner on (mode load, local connector, the graph's correction knobs) from the same split, with the budget the
 * workers it starts (so it moves workers, it cannot add any). Prompts of 512 tokens or more are always prefilled
 * by the prefill pool (strict disaggregation: no spill to the decode workers when it is saturated), shorter ones
 * by the decode worker (the default threshold). The same requests, at the same times, go to each
 * (open loop, one load generator process each, load.ts), to all variants at the same time: this runs on shared
 * CPUs, and the machine's other load then falls on every variant alike (they share the machine with each other
 * too, as they would share it with that load). Reported per variant and phase: SLO attainment of
 * TTFT and of ITL (a request's mean time per output token after the first, as bench:serve counts it), both,
 * their p50 / p90, the planner's moves (when, which way, how long they took) and requests lost (failed or never
 * answered: must be 0).
 */
import { cpus } from 'node:os';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { BadArgumentError } from '../errors.js';
import { defaultGraph, type DeploymentGraph } from '../deploy/graph.js';
import { startDeployment, type Deployment } from '../deploy/launcher.js';
import type { PlannerAction } from '../planner/runtime.js';
import type { PlannerSpec } from '../planner/spec.js';
import { packageVersion } from '../version.js';
import {
  axisFor,
  ChartUnavailableError,
  colourScheme,
  panels,
  PANEL_WIDTH,
  writeChart,
  type ChartSpec,
} from './chart.js';
import { LoadProcess } from './load.js';
import { PromptFactory } from './prompts.js';
import { benchTokenizer, requestBody } from './serve.js';
import { distribution, tpotMs, type Distribution, type RequestTiming, type Slo } from './stats.js';
import { formatTable, percent, sig } from './table.js';
import { phasedTrace, type PhasedTrace, type TracePhase } from './trace.js';
import { workloadRequests, workloadShape, type WorkloadSpec } from './workload.js';

export const BENCH_PLANNER_MODEL = 'dummy:tiny';
/** Prefill queue per prefill worker before decode workers prefill long prompts themselves: never, here. */
const STRICT_MAX_PREFILL_QUEUE = 1_000_000;
/** Seconds of trace per point of the chart's latency lines. */
const CHART_BUCKET_S = 2;

/** One deployment to run the trace against. */
export interface PlannerVariant {
  label: string;
  prefill: number;
  decode: number;
  planner: boolean;
}

/** The planner's knobs in the variants that have it on (graph `planner`, mode load). */
export interface BenchPlannerKnobs {
  intervalS: number;
  scaleUpAfterS: number;
  scaleDownAfterS: number;
  cooldownS: number;
}

export interface BenchPlannerConfig {
  seed: number;
  phases: TracePhase[];
  /** The requests' SLO, and the planner's SLAs. */
  slo: Slo;
  variants: PlannerVariant[];
  knobs: BenchPlannerKnobs;
  /** CPU threads of each worker's engine. */
  threads: number;
  /** Requests sent one at a time before the trace, not counted. */
  warmup: number;
  timeoutMs: number;
  /** Workers' logs to stderr. */
  verbose: boolean;
}

export interface PhaseResult {
  phase: string;
  requests: number;
  completed: number;
  /** Failed, or never sent an answer. */
  lost: number;
  ttftAttainment: number;
  itlAttainment: number;
  attainment: number;
  ttftMs: Distribution | null;
  /** Per request: mean ms per output token after the first. */
  tpotMs: Distribution | null;
}

export interface VariantResult {
  variant: PlannerVariant;
  phases: PhaseResult[];
  total: PhaseResult;
  /** The planner's actions, `atS` from the start of the trace. */
  actions: (PlannerAction & { atS: number })[];
  moves: number;
  /** Serving replicas per pool, sampled each second of the trace. */
  pools: { atS: number; prefill: number; decode: number }[];
  /** Per request: when it was sent (s from the trace's start), its phase, TTFT and TPOT. */
  requests: { atS: number; phase: number; ttftMs: number | null; tpotMs: number | null; error: string | null }[];
  errors: { message: string; count: number }[];
}

export interface BenchPlannerReport {
  tool: 'bench:planner';
  version: string;
  startedAt: string;
  seconds: number;
  host: { cpu: string; cores: number };
  model: string;
  seed: number;
  phases: TracePhase[];
  slo: Slo;
  knobs: BenchPlannerKnobs;
  threads: number;
  variants: VariantResult[];
}

/** Whether a request met each part of the SLO (a failed one meets none). */
function verdicts(t: RequestTiming, slo: Slo): { ttft: boolean; itl: boolean } {
  if (t.error !== null || t.ttftMs === null) return { ttft: false, itl: false };
  const tpot = tpotMs(t);
  return { ttft: t.ttftMs <= slo.ttftMs, itl: tpot === null || tpot <= slo.itlMs };
}

/** Attainment and latencies of the requests `indices` of a run (timings by request index; missing: lost). */
export function phaseResult(
  phase: string,
  indices: readonly number[],
  byIndex: ReadonlyMap<number, RequestTiming>,
  slo: Slo,
): PhaseResult {
  let completed = 0;
  let ttftMet = 0;
  let itlMet = 0;
  let met = 0;
  const ttfts: number[] = [];
  const tpots: number[] = [];
  for (const i of indices) {
    const t = byIndex.get(i);
    if (!t || t.error !== null) continue;
    completed++;
    const v = verdicts(t, slo);
    ttftMet += v.ttft ? 1 : 0;
    itlMet += v.itl ? 1 : 0;
    met += v.ttft && v.itl ? 1 : 0;
    if (t.ttftMs !== null) ttfts.push(t.ttftMs);
    const tpot = tpotMs(t);
    if (tpot !== null) tpots.push(tpot);
  }
  const n = indices.length;
  return {
    phase,
    requests: n,
    completed,
    lost: n - completed,
    ttftAttainment: n ? ttftMet / n : 0,
    itlAttainment: n ? itlMet / n : 0,
    attainment: n ? met / n : 0,
    ttftMs: distribution(ttfts),
    tpotMs: distribution(tpots),
  };
}

/** The deployment graph of a variant: dummy:tiny on CPU workers, loopback, any free port. */
export function variantGraph(variant: PlannerVariant, config: Pick<BenchPlannerConfig, 'slo' | 'knobs' | 'threads'>) {
  const g: DeploymentGraph = defaultGraph({ gpus: 0, port: 0, model: BENCH_PLANNER_MODEL });
  for (const pool of g.pools) {
    pool.replicas = pool.role === 'prefill' ? variant.prefill : variant.decode;
    pool.engine = { ...pool.engine, threads: config.threads };
  }
  // Strict disaggregation for long prompts: a saturated prefill pool is not relieved by the decode workers
  // prefilling locally (conditional disaggregation would blur what the pools' sizes do).
  g.disaggregation = { ...g.disaggregation, maxPrefillQueue: STRICT_MAX_PREFILL_QUEUE };
  const planner: PlannerSpec = variant.planner
    ? {
        mode: 'load',
        ttftMs: config.slo.ttftMs,
        itlMs: config.slo.itlMs,
        intervalS: config.knobs.intervalS,
        minReplicas: 1,
        scaleUpAfterS: config.knobs.scaleUpAfterS,
        scaleDownAfterS: config.knobs.scaleDownAfterS,
        cooldownS: config.knobs.cooldownS,
        connector: 'local',
      }
    : { mode: 'off', intervalS: config.knobs.intervalS, minReplicas: 1 };
  g.planner = planner;
  return g;
}

export interface BenchPlannerUi {
  log(line: string): void;
  progress(line: string): void;
}

/** Runs the trace against every variant in turn. */
export async function benchPlanner(config: BenchPlannerConfig, ui: BenchPlannerUi): Promise<BenchPlannerReport> {
  if (config.variants.length === 0) throw new BadArgumentError('no variants to run');
  for (const v of config.variants)
    if (!(Number.isSafeInteger(v.prefill) && v.prefill >= 1 && Number.isSafeInteger(v.decode) && v.decode >= 1))
      throw new BadArgumentError(`variant ${v.label}: at least one prefill and one decode worker`);
  const started = performance.now();
  const startedAt = new Date().toISOString();
  const trace: PhasedTrace = phasedTrace(config.phases, config.seed);
  const workload: WorkloadSpec = {
    seed: config.seed,
    numRequests: trace.requests.length,
    isl: { kind: 'fixed', value: 1 },
    osl: { kind: 'fixed', value: 1 },
    arrival: { kind: 'poisson', burstiness: 1 },
    trace: { requests: trace.requests, blockTokens: 512 },
  };
  const shape = workloadShape(workload);
  const factory = new PromptFactory(benchTokenizer(BENCH_PLANNER_MODEL), 'completions');
  const prompts = workloadRequests(workload, shape, factory, 0);
  const bodyOptions = { api: 'completions' as const, temperature: 0, forceLength: true, extraBody: {} };
  const bodies = prompts.map((r) => ({
    index: r.index,
    body: requestBody(bodyOptions, BENCH_PLANNER_MODEL, r),
    atMs: shape.traceTimesMs![r.index]!,
  }));
  const phaseIndices = config.phases.map((_, p) => bodies.map((b) => b.index).filter((i) => trace.phaseOf[i] === p));
  const traceS = config.phases.reduce((s, p) => s + p.seconds, 0);
  ui.log(
    `trace: ${config.phases.map((p, i) => `${p.name} ${p.seconds} s, ISL ${p.isl} / OSL ${p.osl} at ${p.rate} req/s (${phaseIndices[i]!.length} requests)`).join('; then ')}`,
  );

  // Every variant is started, then all are sent the trace at the same time, each by its own load process: the
  // machine's other load (this bench runs on shared CPUs) then falls on every variant alike.
  const running: { variant: PlannerVariant; d: Deployment; load: LoadProcess }[] = [];
  const variants: VariantResult[] = [];
  try {
    for (const variant of config.variants) {
      const lines: string[] = [];
      const log = (line: string) => {
        lines.push(line);
        if (config.verbose) process.stderr.write(`[${variant.label}] ${line}\n`);
      };
      ui.progress(`${variant.label}: starting ${variant.prefill} prefill + ${variant.decode} decode CPU workers`);
      let d: Deployment;
      try {
        d = await startDeployment(variantGraph(variant, config), { log });
      } catch (error) {
        process.stderr.write(lines.join('\n') + '\n');
        throw error;
      }
      const load = new LoadProcess();
      running.push({ variant, d, load });
      // Warm-up: a few requests one at a time (JIT, first allocations); not counted.
      const warm = await load.run(
        endpointOf(d),
        bodies.slice(0, config.warmup).map((b) => ({ index: b.index, body: b.body })),
        { concurrency: 1, timeoutMs: config.timeoutMs },
      );
      if (warm.some((t) => t.error !== null))
        throw new BadArgumentError(`${variant.label}: warm-up failed: ${warm.find((t) => t.error)!.error}`);
    }
    const t0 = Date.now();
    const progress = new Map<string, string>();
    const runs = running.map(async ({ variant, d, load }) => {
      const pools: VariantResult['pools'] = [];
      const sample = () => {
        const current = d.planner?.status().replicas.current ?? {
          prefill: d.controlPlane.workers('prefill').length,
          decode: d.controlPlane.workers('decode').length,
        };
        pools.push({ atS: (Date.now() - t0) / 1000, ...current });
      };
      sample();
      const sampler = setInterval(sample, 1000);
      let timings: RequestTiming[];
      try {
        timings = await load.run(endpointOf(d), bodies, {
          timeoutMs: config.timeoutMs,
          onProgress: (p) => {
            const pool = pools[pools.length - 1]!;
            progress.set(
              variant.label,
              `${variant.label} done ${p.done} failed ${p.failed} ${pool.prefill}P+${pool.decode}D`,
            );
            ui.progress(`${(p.elapsedMs / 1000).toFixed(0)}/${traceS} s: ${[...progress.values()].join('; ')}`);
          },
        });
      } finally {
        clearInterval(sampler);
      }
      sample();
      // An action under way when the trace ends is waited for (bounded), so that it is counted.
      for (let i = 0; i < 600 && d.planner?.status().acting; i++) await new Promise((r) => setTimeout(r, 100));
      const byIndex = new Map(timings.map((t) => [t.index, t]));
      const actions = (d.planner?.status().actions ?? []).map((a) => ({ ...a, atS: (Date.parse(a.at) - t0) / 1000 }));
      const errors = new Map<string, number>();
      for (const t of timings) if (t.error) errors.set(t.error, (errors.get(t.error) ?? 0) + 1);
      const result: VariantResult = {
        variant,
        phases: config.phases.map((p, i) => phaseResult(p.name, phaseIndices[i]!, byIndex, config.slo)),
        total: phaseResult(
          'all',
          bodies.map((b) => b.index),
          byIndex,
          config.slo,
        ),
        actions,
        moves: actions.filter((a) => a.action === 'move' && a.outcome === 'done').length,
        pools,
        requests: bodies.map((b) => {
          const t = byIndex.get(b.index);
          return {
            atS: b.atMs / 1000,
            phase: trace.phaseOf[b.index]!,
            ttftMs: t?.ttftMs ?? null,
            tpotMs: t ? tpotMs(t) : null,
            error: t ? t.error : 'never sent',
          };
        }),
        errors: [...errors].map(([message, count]) => ({ message, count })).sort((a, b) => b.count - a.count),
      };
      return result;
    });
    for (const result of await Promise.all(runs)) {
      variants.push(result);
      ui.log(variantLine(result));
    }
  } finally {
    for (const { d, load } of running) {
      await load.dispose();
      await d.stop({ drainMs: 2000 });
    }
  }
  return {
    tool: 'bench:planner',
    version: packageVersion,
    startedAt,
    seconds: (performance.now() - started) / 1000,
    host: { cpu: cpus()[0]?.model ?? 'unknown', cores: cpus().length },
    model: BENCH_PLANNER_MODEL,
    seed: config.seed,
    phases: config.phases,
    slo: config.slo,
    knobs: config.knobs,
    threads: config.threads,
    variants,
  };
}

function endpointOf(d: Deployment) {
  return { endpointUrl: `${d.frontend.url}/v1/completions`, api: 'completions' as const };
}

function variantLine(r: VariantResult): string {
  return (
    `${r.variant.label}: ` +
    r.phases.map((p) => `${p.phase} ${percent(p.attainment)} met`).join(', ') +
    `; ${r.moves} moves; ${r.total.lost} lost`
  );
}

/** The results as tables: one row per variant and phase; then the planner's actions. */
export function formatPlannerReport(report: BenchPlannerReport): string {
  const rows = report.variants.flatMap((v) =>
    [...v.phases, v.total].map((p) => [
      v.variant.label,
      p.phase,
      String(p.requests),
      percent(p.ttftAttainment),
      percent(p.itlAttainment),
      percent(p.attainment),
      sig(p.ttftMs?.p50),
      sig(p.ttftMs?.p90),
      sig(p.tpotMs?.p50),
      sig(p.tpotMs?.p90),
      p.phase === 'all' ? String(v.moves) : '',
      String(p.lost),
    ]),
  );
  const table = formatTable(
    [
      'deployment',
      'phase',
      'requests',
      'TTFT met',
      'ITL met',
      'both met',
      'TTFT p50',
      'TTFT p90',
      'TPOT p50',
      'TPOT p90',
      'moves',
      'lost',
    ],
    rows,
    ['left', 'left', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'right'],
  );
  const actions = report.variants.flatMap((v) =>
    v.actions.map((a) => [
      v.variant.label,
      a.atS.toFixed(1),
      a.action === 'move' ? `move ${a.from} -> ${a.to}` : `${a.action} ${a.pool}`,
      a.worker ?? '',
      a.outcome,
      (a.ms / 1000).toFixed(1),
    ]),
  );
  const errors = report.variants.flatMap((v) => v.errors.map((e) => `${v.variant.label}: ${e.count} x ${e.message}`));
  return [
    `bench:planner, ${report.model} on CPU workers (${report.threads} thread each), ${report.host.cores}-core ${report.host.cpu}; ` +
      `SLO TTFT ${report.slo.ttftMs} ms, ITL ${report.slo.itlMs} ms; seed ${report.seed}; ${report.seconds.toFixed(0)} s`,
    `planner: mode load every ${report.knobs.intervalS} s, scale up after ${report.knobs.scaleUpAfterS} s of misses, cool-down ${report.knobs.cooldownS} s`,
    '',
    table,
    '',
    actions.length
      ? formatTable(['deployment', 'at s', 'action', 'worker', 'outcome', 'took s'], actions, [
          'left',
          'right',
          'left',
          'left',
          'left',
          'right',
        ])
      : 'no planner actions',
    ...(errors.length ? ['', 'errors:', ...errors] : []),
  ].join('\n');
}

export function writePlannerJson(file: string, report: BenchPlannerReport): void {
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, JSON.stringify(report, null, 1) + '\n');
}

/**
 * The chart: TTFT and TPOT of each request against when it was sent, and the prefill pool's size, one colour per
 * deployment; the SLOs dashed, the phase change a grey rule.
 */
export function plannerChart(report: BenchPlannerReport): ChartSpec {
  const labels = report.variants.map((v) => v.variant.label);
  const colour = {
    field: 'deployment',
    type: 'nominal',
    title: 'deployment',
    sort: labels,
    scale: { domain: labels, scheme: colourScheme(labels.length) },
  };
  const phaseStarts = report.phases.slice(1).map((_, i) => ({
    atS: report.phases.slice(0, i + 1).reduce((s, p) => s + p.seconds, 0),
  }));
  const x = { field: 'atS', type: 'quantitative', title: 'time in the trace (s)' };
  const phaseRule = {
    data: { values: phaseStarts },
    mark: { type: 'rule', color: '#888', strokeWidth: 1.5 },
    encoding: { x: { field: 'atS', type: 'quantitative' } },
  };
  const sloRule = (ms: number) => ({
    data: { values: [{ ms }] },
    mark: { type: 'rule', strokeDash: [6, 4], color: '#444' },
    encoding: { y: { field: 'ms', type: 'quantitative' } },
  });
  // Requests by when they were sent, in buckets of CHART_BUCKET_S: each bucket's median.
  const latency = (what: 'ttftMs' | 'tpotMs', title: string, slo: number): ChartSpec => {
    const rows = report.variants.flatMap((v) => {
      const buckets = new Map<number, number[]>();
      for (const r of v.requests) {
        const ms = r[what];
        if (ms === null) continue;
        const at = Math.floor(r.atS / CHART_BUCKET_S) * CHART_BUCKET_S;
        buckets.set(at, [...(buckets.get(at) ?? []), ms]);
      }
      return [...buckets]
        .sort((a, b) => a[0] - b[0])
        .map(([atS, values]) => ({ deployment: v.variant.label, atS, ms: distribution(values)!.p50 }));
    });
    return {
      width: PANEL_WIDTH,
      height: 260,
      title: { text: title, subtitle: `median of the requests sent in each ${CHART_BUCKET_S} s` },
      layer: [
        {
          data: { values: rows },
          mark: { type: 'line', interpolate: 'step-after' },
          encoding: { x, y: axisFor('ms', `${title} (ms)`, [...rows.map((r) => r.ms), slo]), color: colour },
        },
        sloRule(slo),
        phaseRule,
      ],
    };
  };
  const poolRows = report.variants.flatMap((v) =>
    v.pools.map((p) => ({ deployment: v.variant.label, atS: p.atS, workers: p.prefill })),
  );
  const pools: ChartSpec = {
    width: PANEL_WIDTH,
    height: 260,
    title: 'prefill workers (the rest decode)',
    layer: [
      {
        data: { values: poolRows },
        mark: { type: 'line', interpolate: 'step-after' },
        encoding: {
          x,
          y: {
            field: 'workers',
            type: 'quantitative',
            title: 'prefill workers',
            scale: { zero: true },
            // whole workers only
            axis: {
              values: Array.from({ length: Math.max(...poolRows.map((r) => r.workers), 1) + 1 }, (_, i) => i),
              format: 'd',
            },
          },
          color: colour,
        },
      },
      phaseRule,
    ],
  };
  const p = report.phases;
  return panels(
    {
      text: 'bench:planner: a traffic shift, fixed pools against the planner',
      subtitle: `${report.model}, CPU workers; ${p.map((x) => `${x.name}: ISL ${x.isl} / OSL ${x.osl} at ${x.rate} req/s`).join(', then ')}; dashed: the SLO`,
    },
    [latency('ttftMs', 'TTFT', report.slo.ttftMs), latency('tpotMs', 'TPOT', report.slo.itlMs), pools],
    3,
  );
}

/** Writes the chart; returns the file, or why there is none (vega not installed). */
export async function writePlannerChart(file: string, report: BenchPlannerReport): Promise<string> {
  try {
    await writeChart(file, plannerChart(report));
    return file;
  } catch (error) {
    if (error instanceof ChartUnavailableError) return error.message;
    throw error;
  }
}
