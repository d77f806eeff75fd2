/**
 * npm run bench:planner [-- --quick] [--out reports/planner.json] [--chart reports/planner.svg]
 *                       [--trace-out reports/planner-trace.jsonl] [--seed N] [--both-splits] [--verbose]
 * npm run bench:planner -- --replot reports/planner.json [--chart FILE]   (the chart again, from a report)
 *
 * A traffic shift (long prompts / short answers, then short prompts / long answers) served by fixed pools and
 * by the planner on the same number of CPU workers (lib/bench/planner.ts): SLO attainment per phase, moves,
 * requests lost. `--quick` runs each phase 40 s instead of 90 (under 3 minutes on 2 cores). The fixed pools
 * are the split the planner starts from (1 prefill + 2 decode); `--both-splits` adds 2 prefill + 1 decode. All variants are sent the trace at the same time (see lib/bench/planner.ts). The trace is written as Mooncake JSONL, so `bench:serve --trace` can replay it.
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';
import { TandemError } from '../lib/errors.js';
import {
  benchPlanner,
  formatPlannerReport,
  writePlannerChart,
  writePlannerJson,
  type BenchPlannerConfig,
  type BenchPlannerReport,
} from '../lib/bench/planner.js';
import { phasedTrace, traceToJsonl } from '../lib/bench/trace.js';

const { values } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    out: { type: 'string', default: 'reports/planner.json' },
    chart: { type: 'string', default: 'reports/planner.svg' },
    'trace-out': { type: 'string', default: 'reports/planner-trace.jsonl' },
    seed: { type: 'string', default: '1' },
    verbose: { type: 'boolean', default: false },
    /** Also fixed pools of the other split (2 prefill + 1 decode). */
    'both-splits': { type: 'boolean', default: false },
    /** Only draws the chart again from a report written before. */
    replot: { type: 'string' },
  },
});
const quick = values.quick!;
const phaseS = quick ? 40 : 90;

const config: BenchPlannerConfig = {
  seed: Number(values.seed),
  phases: [
    { name: 'long prompts', isl: 1024, osl: 8, rate: 2.5, seconds: phaseS },
    { name: 'long answers', isl: 32, osl: 768, rate: 2.5, seconds: phaseS },
  ],
  slo: { ttftMs: 1000, itlMs: 10 },
  variants: [
    { label: 'fixed 1P+2D', prefill: 1, decode: 2, planner: false },
    // Three deployments at once (9 workers) overload a 2-core machine: workers miss heartbeats and are taken
    // for dead (docs/measurements.md). The other split is for machines with the cores for it.
    ...(values['both-splits'] ? [{ label: 'fixed 2P+1D', prefill: 2, decode: 1, planner: false }] : []),
    { label: 'planner from 1P+2D', prefill: 1, decode: 2, planner: true },
  ],
  knobs: { intervalS: 2, scaleUpAfterS: 4, scaleDownAfterS: 3600, cooldownS: 10 },
  threads: 1,
  warmup: 3,
  timeoutMs: 120_000,
  verbose: values.verbose!,
};

if (values.replot !== undefined) {
  const report = JSON.parse(readFileSync(values.replot, 'utf8')) as BenchPlannerReport;
  console.log(await writePlannerChart(values.chart!, report));
  process.exit(0);
}

try {
  const traceFile = values['trace-out']!;
  mkdirSync(dirname(traceFile), { recursive: true });
  writeFileSync(traceFile, traceToJsonl(phasedTrace(config.phases, config.seed).requests));
  const report = await benchPlanner(config, {
    log: (line) => process.stdout.write(`\r\x1b[K${line}\n`),
    progress: (line) => process.stderr.isTTY && process.stderr.write(`\r\x1b[K${line}`),
  });
  process.stderr.write('\r\x1b[K');
  console.log(`\n${formatPlannerReport(report)}\n`);
  writePlannerJson(values.out!, report);
  const chart = await writePlannerChart(values.chart!, report);
  console.log(`wrote ${values.out}, ${traceFile}${chart === values.chart ? `, ${chart}` : ` (no chart: ${chart})`}`);
  const lost = report.variants.reduce((n, v) => n + v.total.lost, 0);
  if (lost > 0) {
    console.error(`bench:planner: ${lost} requests lost`);
    process.exitCode = 1;
  }
} catch (error) {
  if (!(error instanceof TandemError)) throw error;
  console.error(`bench:planner: ${error.message}`);
  process.exitCode = 1;
}
