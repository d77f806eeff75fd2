/**
 * The command line of bench serve, shared by `tandem bench serve ...` and `npm run bench:serve -- ...`: its
 * options (BENCH_SERVE_HELP), their checks (a wrong one is a UsageError, one line, exit status 2), and the run:
 * tables on stdout, the live progress line on stderr, the JSON report and the charts in files.
 */
import { parseArgs } from 'node:util';
import { choiceOption, numberOption, UsageError } from '../cli/args.js';
import { DEFAULT_MODEL, SERVING_MODES } from '../deploy/graph.js';
import { ARRIVAL_KINDS, parseLengthSpec, type ArrivalSpec, type LengthSpec } from './distributions.js';
import { PROMPT_APIS } from './prompts.js';
import { describeRun, formatReport, writeReportJson, writeServeCharts } from './report.js';
import { benchServe, type BenchServeConfig, type BenchUi, type LoadSweep, type TargetSpec } from './serve.js';
import { DEFAULT_SLO } from './stats.js';
import { loadTrace, MOONCAKE_BLOCK_TOKENS } from './trace.js';
import type { SharedPrefixSpec } from './workload.js';

export const BENCH_SERVE_HELP = `Usage: tandem bench serve [options]     (or: npm run bench:serve -- [options])

Goodput of an OpenAI-compatible server under SLOs, over a sweep of loads; deployments compared in one run.

What to measure (default: start the embedded deployment of \`tandem start\`, dummy:tiny on this machine):
  --url URL[,URL...]        servers already running (Tandem, vLLM, SGLang, ...): http://127.0.0.1:8000
  --deploy A.yaml[,B.yaml]  deployment graphs, each started in turn on a free loopback port, then stopped
  --mode disagg|agg         the embedded deployment's mode (default disagg)
  --label NAME[,NAME...]    names of the targets in tables and charts
  --model ID                model id to request (default: what the server lists at /v1/models; the graph's)
  --tokenizer DIR|dummy:P   the model's tokenizer, for prompts of exact length (default: the model)
  --api-key KEY             Authorization: Bearer KEY (default $TANDEM_API_KEY, else $OPENAI_API_KEY)
  --api completions|chat    endpoint (default completions)

Load (a list sweeps it, in increasing load):
  --rate R[,R...]           open loop, requests per second (default 1,2,4,8,16,32)
  --arrival poisson|constant|gamma   arrival process (default poisson)
  --burstiness B            gamma's shape: 1 is Poisson, < 1 burstier, > 1 more regular (implies gamma)
  --concurrency C[,C...]    closed loop instead: C clients, each sending its next request when one ends
  --num-requests N          requests per point (default 100)
  --warmup N                requests sent one at a time before the sweep, not counted (default 2)

Workload (seeded: every target and every point gets the same lengths and arrivals):
  --isl SPEC, --osl SPEC    prompt / output tokens: N, uniform:MIN:MAX or normal:MEAN:STD (default 512, 128)
  --prefixes N --prefix-len L [--prefix-share S]
                            N shared prefixes of L tokens; a share S of requests (default 1) starts with one
  --trace FILE.jsonl        replay a Mooncake trace (timestamp ms, input_length, output_length, hash_ids)
  --trace-time-scale X[,X]  multiply its timestamps (0.5: twice the rate; default 1)
  --trace-block-size N      tokens per hash id (default ${MOONCAKE_BLOCK_TOKENS}, Mooncake's)
  --seed N                  workload seed (default 0; a running server that cached an earlier run's
                            prompts needs another)
  --temperature T           sampling temperature (default 0)
  --no-force-length         do not send ignore_eos and min_tokens (for servers that refuse them; outputs
                            may then end early at EOS)
  --extra-body JSON         fields merged into every request body

SLO and sweep:
  --slo-ttft-ms MS          time to first token objective (default ${DEFAULT_SLO.ttftMs})
  --slo-itl-ms MS           inter-token objective, a request's mean gap (TPOT) (default ${DEFAULT_SLO.itlMs})
  --min-attainment F        stop a sweep after a point with fewer than F of its requests within the SLO,
                            0..1 (default 0.5; 0 runs every point)
  --timeout-s S             bound on one request (default 600)

Output:
  --json FILE               the report, every request's timings included (default bench-results/serve.json);
                            charts beside it: FILE-goodput.svg, FILE-latency.svg
  --no-charts               no SVG charts
  --verbose                 started deployments' logs on stderr
  --quick                   a short sweep for CI: ISL 640, OSL 32, 32 requests at 8, 32 and 128 req/s
  -h, --help                this help`;

const OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  quick: { type: 'boolean' },
  url: { type: 'string' },
  deploy: { type: 'string' },
  mode: { type: 'string' },
  label: { type: 'string' },
  model: { type: 'string' },
  tokenizer: { type: 'string' },
  'api-key': { type: 'string' },
  api: { type: 'string' },
  rate: { type: 'string' },
  arrival: { type: 'string' },
  burstiness: { type: 'string' },
  concurrency: { type: 'string' },
  'num-requests': { type: 'string' },
  warmup: { type: 'string' },
  isl: { type: 'string' },
  osl: { type: 'string' },
  prefixes: { type: 'string' },
  'prefix-len': { type: 'string' },
  'prefix-share': { type: 'string' },
  trace: { type: 'string' },
  'trace-time-scale': { type: 'string' },
  'trace-block-size': { type: 'string' },
  seed: { type: 'string' },
  temperature: { type: 'string' },
  'no-force-length': { type: 'boolean' },
  'extra-body': { type: 'string' },
  'slo-ttft-ms': { type: 'string' },
  'slo-itl-ms': { type: 'string' },
  'min-attainment': { type: 'string' },
  'timeout-s': { type: 'string' },
  json: { type: 'string' },
  'no-charts': { type: 'boolean' },
  verbose: { type: 'boolean' },
} as const;

type Values = ReturnType<typeof parseArgs<{ options: typeof OPTIONS }>>['values'];

/** The settings of --quick: a sweep that takes seconds on a 2-core CPU with dummy:tiny. */
// ISL 640 is over the default deployment's 512-token threshold for remote prefill: the quick run goes through
// the prefill worker and the KV transfer.
export const QUICK = { isl: '640', osl: '32', numRequests: 32, rates: [8, 32, 128], warmup: 2 } as const;

export interface BenchServeCommand {
  help: boolean;
  config: BenchServeConfig;
  json: string;
  charts: boolean;
}

const NUMBER = /^-?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i;

/** `--rate -1` as `--rate=-1`: a negative number is a value (refused later by its range), not an option. */
function joinNumbers(argv: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i]!.startsWith('--') && !argv[i]!.includes('=') ? argv[i]!.slice(2) : undefined;
    const spec = name === undefined ? undefined : (OPTIONS as Record<string, { type: string }>)[name];
    if (spec?.type === 'string' && NUMBER.test(argv[i + 1] ?? '')) out.push(`${argv[i]}=${argv[++i]}`);
    else out.push(argv[i]!);
  }
  return out;
}

/** node's parseArgs error, worded as the tandem command line words its own. */
function argumentError(error: Error): string {
  const code = (error as { code?: string }).code;
  const option = /'(--?[\w-]+)/.exec(error.message)?.[1];
  if (code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION') return `unknown option ${option}`;
  if (code === 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL')
    return `unexpected argument '${/'([^']*)'/.exec(error.message)?.[1]}'`;
  if (code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE')
    return /does not take an argument/.test(error.message) ? `${option} takes no value` : `${option} needs a value`;
  return error.message.split('\n')[0]!;
}

/** A comma-separated list of option values. */
function list(name: string, value: string): string[] {
  const items = value.split(',').map((s) => s.trim());
  if (items.some((s) => s === '')) throw new UsageError(`--${name} has an empty item (got '${value}')`);
  return items;
}

function numbers(name: string, value: string, options: { integer?: boolean; min?: number }): number[] {
  return list(name, value).map((v) => {
    const n = numberOption(name, v, options)!;
    if (!options.integer && n <= 0) throw new UsageError(`--${name} must be a number > 0 (got ${v})`);
    return n;
  });
}

function lengthSpec(name: string, value: string): LengthSpec {
  try {
    return parseLengthSpec(value, `--${name}`);
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

/** Parses bench serve's arguments (after `bench serve`). Throws UsageError. */
export function parseBenchServeArgs(argv: string[], env: NodeJS.ProcessEnv = process.env): BenchServeCommand {
  let values: Values;
  try {
    ({ values } = parseArgs({ args: joinNumbers(argv), options: OPTIONS, strict: true, allowPositionals: false }));
  } catch (error) {
    throw new UsageError(`${argumentError(error as Error)} (see tandem bench serve --help)`);
  }
  const quick = values.quick ?? false;
  const int = (name: keyof Values, min: number) =>
    numberOption(name, values[name] as string | undefined, { integer: true, min });
  const num = (name: keyof Values, min: number, max = Infinity) =>
    numberOption(name, values[name] as string | undefined, { min, max });
  const positive = (name: keyof Values) => {
    const n = num(name, 0);
    if (n === 0) throw new UsageError(`--${name} must be a number > 0 (got ${values[name]})`);
    return n;
  };

  // Targets.
  const targets: TargetSpec[] = [
    ...(values.deploy ? list('deploy', values.deploy).map((file) => ({ kind: 'deploy' as const, file })) : []),
    ...(values.url ? list('url', values.url).map((url) => ({ kind: 'url' as const, url })) : []),
  ];
  const mode = choiceOption('mode', values.mode, SERVING_MODES);
  if (mode && targets.length) throw new UsageError('--mode is for the embedded deployment, not with --url or --deploy');
  if (targets.length === 0)
    targets.push({ kind: 'default', model: values.model ?? DEFAULT_MODEL, mode: mode ?? 'disagg' });
  const labels = values.label ? list('label', values.label) : undefined;
  if (labels && labels.length !== targets.length)
    throw new UsageError(`--label names ${labels.length} targets; there are ${targets.length}`);

  // Load.
  const traceFile = values.trace;
  if (traceFile)
    for (const other of ['rate', 'concurrency', 'arrival', 'burstiness', 'isl', 'osl', 'prefixes'] as const)
      if (values[other] !== undefined) throw new UsageError(`--${other} does not go with --trace (the trace sets it)`);
  if (!traceFile && (values['trace-time-scale'] !== undefined || values['trace-block-size'] !== undefined))
    throw new UsageError('--trace-time-scale and --trace-block-size need --trace');
  if (values.rate !== undefined && values.concurrency !== undefined)
    throw new UsageError('--rate (open loop) and --concurrency (closed loop) exclude each other');
  const arrivalKind = choiceOption('arrival', values.arrival, ARRIVAL_KINDS);
  const burstiness = positive('burstiness');
  if (burstiness !== undefined && arrivalKind !== undefined && arrivalKind !== 'gamma')
    throw new UsageError(`--burstiness is gamma's shape; it does not go with --arrival ${arrivalKind}`);
  if (values.concurrency !== undefined && (arrivalKind || burstiness !== undefined))
    throw new UsageError('--arrival and --burstiness are for --rate (open loop), not --concurrency');
  const kind = arrivalKind ?? (burstiness !== undefined ? 'gamma' : 'poisson');
  const arrival: ArrivalSpec = { kind, burstiness: kind === 'gamma' ? (burstiness ?? 1) : 1 };
  let sweep: LoadSweep;
  if (traceFile)
    sweep = {
      kind: 'trace',
      timeScales: values['trace-time-scale'] ? numbers('trace-time-scale', values['trace-time-scale'], {}) : [1],
    };
  else if (values.concurrency !== undefined)
    sweep = { kind: 'concurrency', values: numbers('concurrency', values.concurrency, { integer: true, min: 1 }) };
  else
    sweep = {
      kind: 'rate',
      arrival,
      rates:
        values.rate !== undefined ? numbers('rate', values.rate, {}) : quick ? [...QUICK.rates] : [1, 2, 4, 8, 16, 32],
    };

  // Workload.
  const prefixes = int('prefixes', 1);
  const prefixLen = int('prefix-len', 1);
  const prefixShare = num('prefix-share', 0, 1);
  if ((prefixLen !== undefined || prefixShare !== undefined) && prefixes === undefined)
    throw new UsageError('--prefix-len and --prefix-share need --prefixes');
  if (prefixes !== undefined && prefixLen === undefined) throw new UsageError('--prefixes needs --prefix-len');
  const sharedPrefix: SharedPrefixSpec | undefined =
    prefixes !== undefined ? { count: prefixes, tokens: prefixLen!, share: prefixShare ?? 1 } : undefined;
  const trace = traceFile
    ? { requests: loadTrace(traceFile), blockTokens: int('trace-block-size', 1) ?? MOONCAKE_BLOCK_TOKENS }
    : undefined;
  const numRequests = int('num-requests', 1) ?? (trace ? trace.requests.length : quick ? QUICK.numRequests : 100);
  let extraBody: Record<string, unknown> = {};
  if (values['extra-body'] !== undefined) {
    try {
      extraBody = JSON.parse(values['extra-body']) as Record<string, unknown>;
    } catch (error) {
      throw new UsageError(`--extra-body is not JSON (${(error as Error).message})`);
    }
    if (extraBody === null || typeof extraBody !== 'object' || Array.isArray(extraBody))
      throw new UsageError('--extra-body must be a JSON object');
  }
  const apiKey = values['api-key'] ?? (env.TANDEM_API_KEY || env.OPENAI_API_KEY || undefined);
  if (apiKey === '') throw new UsageError('--api-key must not be empty');

  const config: BenchServeConfig = {
    targets,
    ...(labels ? { labels } : {}),
    ...(values.model !== undefined && targets[0]!.kind !== 'default' ? { model: values.model } : {}),
    ...(values.tokenizer !== undefined ? { tokenizer: values.tokenizer } : {}),
    ...(apiKey !== undefined ? { apiKey } : {}),
    api: choiceOption('api', values.api, PROMPT_APIS) ?? 'completions',
    sweep,
    workload: {
      seed: int('seed', 0) ?? 0,
      numRequests,
      isl: lengthSpec('isl', values.isl ?? (quick ? QUICK.isl : '512')),
      osl: lengthSpec('osl', values.osl ?? (quick ? QUICK.osl : '128')),
      arrival,
      ...(sharedPrefix ? { sharedPrefix } : {}),
      ...(trace ? { trace } : {}),
    },
    ...(traceFile ? { traceFile } : {}),
    slo: {
      ttftMs: positive('slo-ttft-ms') ?? DEFAULT_SLO.ttftMs,
      itlMs: positive('slo-itl-ms') ?? DEFAULT_SLO.itlMs,
    },
    minAttainment: num('min-attainment', 0, 1) ?? 0.5,
    warmup: int('warmup', 0) ?? (quick ? QUICK.warmup : 2),
    timeoutMs: (positive('timeout-s') ?? 600) * 1000,
    temperature: num('temperature', 0, 2) ?? 0,
    forceLength: !values['no-force-length'],
    extraBody,
    verbose: values.verbose ?? false,
    weightSeed: 0,
  };
  return {
    help: values.help ?? false,
    config,
    json: values.json ?? 'bench-results/serve.json',
    charts: !values['no-charts'],
  };
}

/**
 * The live progress line on stderr: rewritten in place on a terminal (at most 10 times a second), else a line
 * every 10 s, so that a log file gets a few lines rather than thousands.
 */
export class ProgressLine {
  private last = -Infinity;
  private shown = false;

  constructor(
    private readonly stream: NodeJS.WriteStream = process.stderr,
    private readonly tty = Boolean(stream.isTTY),
  ) {}

  update(text: string): void {
    const now = performance.now();
    if (now - this.last < (this.tty ? 100 : 10_000)) return;
    this.last = now;
    if (this.tty) {
      this.stream.write(`\r\x1b[2K${text.slice(0, (this.stream.columns || 120) - 1)}`);
      this.shown = true;
    } else this.stream.write(`${text}\n`);
  }

  done(): void {
    if (this.shown) this.stream.write('\r\x1b[2K');
    this.shown = false;
    this.last = -Infinity;
  }
}

/** `tandem bench serve` and `npm run bench:serve`: returns the exit status. */
export async function benchServeMain(argv: string[]): Promise<number> {
  const command = parseBenchServeArgs(argv);
  if (command.help) {
    console.log(BENCH_SERVE_HELP);
    return 0;
  }
  const progress = new ProgressLine();
  const ui: BenchUi = {
    log: (line) => {
      progress.done();
      console.log(line);
    },
    progress: (line) => progress.update(line),
    progressDone: () => progress.done(),
  };
  const report = await benchServe(command.config, ui);
  console.log(`\nbench serve: ${describeRun(report)}\n`);
  console.log(formatReport(report));
  writeReportJson(command.json, report);
  const stem = command.json.replace(/\.json$/, '');
  const charts = command.charts ? await writeServeCharts(stem, report) : [];
  console.log(
    `\nwrote ${command.json}` +
      (Array.isArray(charts) ? (charts.length ? `, ${charts.join(', ')}` : '') : ` (no charts: ${charts})`) +
      ` in ${report.seconds.toFixed(1)} s`,
  );
  return 0;
}
