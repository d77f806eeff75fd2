/**
 * `tandem bench serve` (npm run bench:serve): goodput of OpenAI-compatible servers under SLOs, deployments
 * compared in one run.
 *
 * For each target in turn (a deployment graph it starts with the launcher and stops after, the embedded
 * default deployment, or a server already running at a URL): a few warm-up requests (not counted), then the
 * sweep, point by point (rates, concurrencies or trace time scales, in increasing load), each point the same
 * seeded workload for every target. A target's sweep stops at the first point whose SLO attainment falls under
 * the floor. Timing is done by the load generator in its own process (load.ts), so that a deployment started
 * in this process shares no event loop with it.
 */
import { existsSync, statSync } from 'node:fs';
import { basename, extname } from 'node:path';
import { capabilities } from '../capabilities/index.js';
import { BadArgumentError, TandemError } from '../errors.js';
import { dummyConfig, dummyTokenizer, isDummyModel } from '../engine/model/dummy.js';
import { byteTextTokenizer, loadTokenizer, type TextTokenizer } from '../engine/tokenizer.js';
import { defaultGraph, loadGraph, type DeploymentGraph, type ServingMode } from '../deploy/graph.js';
import { startDeployment, type Deployment } from '../deploy/launcher.js';
import { packageVersion } from '../version.js';
import { arrivalTimesMs, formatLengthSpec, seededSource, type ArrivalSpec } from './distributions.js';
import { LoadProcess, type LoadProgress, type LoadRequest, type LoadTarget } from './load.js';
import { PromptFactory, type PromptApi } from './prompts.js';
import { distribution, runStats, type Distribution, type RequestTiming, type RunStats, type Slo } from './stats.js';
import { percent, plain, sig } from './table.js';
import {
  workloadRequests,
  workloadShape,
  type WorkloadRequest,
  type WorkloadShape,
  type WorkloadSpec,
} from './workload.js';

/** Bound on starting a deployment to measure (its workers loading the model included). */
export const DEPLOYMENT_START_TIMEOUT_MS = 600_000;

/** The loads of a sweep, in increasing order once resolved. */
export type LoadSweep =
  | { kind: 'rate'; arrival: ArrivalSpec; rates: number[] }
  | { kind: 'concurrency'; values: number[] }
  | { kind: 'trace'; timeScales: number[] };

/** What to benchmark. */
export type TargetSpec =
  | { kind: 'url'; url: string }
  | { kind: 'deploy'; file: string }
  | { kind: 'default'; model: string; mode: ServingMode };

export interface BenchServeConfig {
  targets: TargetSpec[];
  /** Names of the targets in tables and charts; default from each (file name, host:port, mode). */
  labels?: string[];
  /** The model id to request; default: what each target serves (/v1/models, or the graph's model). */
  model?: string;
  /** Where the tokenizer comes from (a model directory or dummy:<preset>); default: the model. */
  tokenizer?: string;
  apiKey?: string;
  api: PromptApi;
  sweep: LoadSweep;
  workload: WorkloadSpec;
  /** The trace file, for the report. */
  traceFile?: string;
  slo: Slo;
  /** A sweep stops after a point whose attainment is below this, in [0, 1]. */
  minAttainment: number;
  /** Requests sent one at a time before the sweep, not counted. */
  warmup: number;
  timeoutMs: number;
  temperature: number;
  /** Send ignore_eos and min_tokens so that every request generates its whole output length. */
  forceLength: boolean;
  /** Fields merged into every request body. */
  extraBody: Record<string, unknown>;
  /** Workers' logs of started deployments go to stderr (else only when a start fails). */
  verbose: boolean;
  /** Seed of dummy weights in started deployments. */
  weightSeed: number;
}

/** Where a run's lines go: results (stdout) and the live progress line (stderr). */
export interface BenchUi {
  log(line: string): void;
  progress(line: string): void;
  /** The progress line is finished with (clear it). */
  progressDone(): void;
}

export interface LoadPoint {
  kind: LoadSweep['kind'];
  /** Rate (req/s), concurrency, or trace time scale. */
  value: number;
  label: string;
  /** Requests per second the schedule offers (open loop); null in a closed loop. */
  offeredRate: number | null;
}

export interface PointResult {
  load: LoadPoint;
  stats: RunStats;
  /** Requests whose prompt tokens, as the server counted them, differ from the workload's. */
  promptTokensOff: number;
  /** How late requests were sent against their schedule (open loop), ms. */
  sendLagMs: Distribution | null;
  /** Failures by message, most frequent first. */
  errors: { message: string; count: number }[];
  requests: RequestTiming[];
}

export interface TargetResult {
  label: string;
  kind: TargetSpec['kind'];
  /** The URL, graph file or default graph. */
  source: string;
  url: string;
  model: string;
  /** The deployment graph started, when one was. */
  graph: DeploymentGraph | null;
  points: PointResult[];
  /** Why the sweep ended before its last point; null when it ran them all. */
  stopped: string | null;
}

export interface BenchServeReport {
  tool: 'tandem bench serve';
  version: string;
  startedAt: string;
  seconds: number;
  host: { platform: string; cpu: string; cores: number; gpus: string[] };
  settings: {
    api: PromptApi;
    sweep: LoadSweep;
    slo: Slo;
    minAttainment: number;
    warmup: number;
    timeoutMs: number;
    temperature: number;
    forceLength: boolean;
    extraBody: Record<string, unknown>;
    tokenizer: string;
  };
  workload: {
    seed: number;
    requestsPerPoint: number;
    isl: string;
    osl: string;
    arrival: ArrivalSpec | null;
    sharedPrefix: WorkloadSpec['sharedPrefix'] | null;
    trace: { file: string; lines: number; blockTokens: number; spanS: number } | null;
    /** Prompt tokens as made (BOS and chat template included), over the requests of a point. */
    inputTokens: Distribution | null;
    outputTokens: Distribution | null;
  };
  targets: TargetResult[];
}

/** A target that could not be benchmarked (its deployment did not start, its server did not answer). */
export class BenchTargetError extends TandemError {
  constructor(message: string) {
    super('TANDEM_BENCH_TARGET', message);
  }
}

/** `http://host:port`, `http://host:port/v1` or with a trailing slash: the server's root. */
export function serverRoot(url: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new BadArgumentError(`--url must be an http(s) URL such as http://127.0.0.1:8000 (got '${url}')`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:')
    throw new BadArgumentError(`--url must be an http(s) URL (got '${url}')`);
  return `${parsed.origin}${parsed.pathname.replace(/\/+$/, '').replace(/\/v1$/, '')}`;
}

/** The tokenizer of `source`: a dummy model's byte tokenizer, or a directory's tokenizer.json. */
export function benchTokenizer(source: string): TextTokenizer {
  if (isDummyModel(source)) return byteTextTokenizer(dummyTokenizer(dummyConfig(source)));
  if (existsSync(source) && statSync(source).isDirectory()) return loadTokenizer(source);
  throw new BadArgumentError(
    `cannot find the tokenizer of model '${source}': pass --tokenizer DIR (a directory with tokenizer.json, ` +
      'e.g. the Hugging Face checkpoint the server loads) or dummy:<preset>',
  );
}

/** The id of the first model a server lists at /v1/models. */
export async function servedModel(root: string, apiKey: string | undefined): Promise<string> {
  let res: Response;
  try {
    res = await fetch(`${root}/v1/models`, {
      headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {},
      signal: AbortSignal.timeout(10_000),
    });
  } catch (error) {
    const e = error as Error;
    throw new BenchTargetError(
      `cannot reach ${root}/v1/models: ${e.cause instanceof Error ? e.cause.message : e.message}`,
    );
  }
  if (!res.ok) throw new BenchTargetError(`${root}/v1/models answered HTTP ${res.status} (is --api-key right?)`);
  const body = (await res.json().catch(() => ({}))) as { data?: { id?: unknown }[] };
  const id = body.data?.[0]?.id;
  if (typeof id !== 'string') throw new BenchTargetError(`${root}/v1/models lists no model (pass --model)`);
  return id;
}

/** The JSON body of one request. */
export function requestBody(
  config: Pick<BenchServeConfig, 'api' | 'temperature' | 'forceLength' | 'extraBody'>,
  model: string,
  request: Pick<WorkloadRequest, 'text' | 'outputTokens'>,
): string {
  const body: Record<string, unknown> = {
    model,
    ...(config.api === 'chat' ? { messages: [{ role: 'user', content: request.text }] } : { prompt: request.text }),
    max_tokens: request.outputTokens,
    temperature: config.temperature,
    stream: true,
    stream_options: { include_usage: true },
    ...(config.forceLength ? { ignore_eos: true, min_tokens: request.outputTokens } : {}),
    ...config.extraBody,
  };
  return JSON.stringify(body);
}

/** The points of a sweep in increasing load. */
export function sweepPoints(sweep: LoadSweep, shape: WorkloadShape): LoadPoint[] {
  if (sweep.kind === 'rate')
    return [...new Set(sweep.rates)]
      .sort((a, b) => a - b)
      .map((rate) => ({ kind: 'rate', value: rate, label: `rate ${plain(rate)}/s`, offeredRate: rate }));
  if (sweep.kind === 'concurrency')
    return [...new Set(sweep.values)]
      .sort((a, b) => a - b)
      .map((c) => ({ kind: 'concurrency', value: c, label: `concurrency ${c}`, offeredRate: null }));
  const spanS = shape.traceTimesMs![shape.count - 1]! / 1000;
  return [...new Set(sweep.timeScales)]
    .sort((a, b) => b - a)
    .map((scale) => ({
      kind: 'trace',
      value: scale,
      label: `trace x${plain(scale)}`,
      offeredRate: spanS > 0 ? (shape.count - 1) / (spanS * scale) : null,
    }));
}

/** When each request of a point is sent (ms from its start); undefined in a closed loop. */
function sendTimes(point: LoadPoint, shape: WorkloadShape): Float64Array | undefined {
  if (point.kind === 'rate') return arrivalTimesMs(shape.unitIntervals!, point.value);
  if (point.kind === 'trace') return shape.traceTimesMs!.map((t) => t * point.value);
  return undefined;
}

function defaultLabel(target: TargetSpec): string {
  if (target.kind === 'deploy') return basename(target.file, extname(target.file));
  if (target.kind === 'default') return target.mode;
  return new URL(serverRoot(target.url)).host;
}

/** The model a target serves, known before it starts (graphs) or asked of it (URLs). */
async function targetModel(
  target: TargetSpec,
  graph: DeploymentGraph | null,
  config: BenchServeConfig,
): Promise<string> {
  if (config.model) return config.model;
  if (target.kind === 'url' || !graph) return servedModel(serverRoot((target as { url: string }).url), config.apiKey);
  return graph.model;
}

/** A running server to measure: started here (and stopped by `stop`), or already there. */
interface LiveTarget {
  root: string;
  stop(): Promise<void>;
}

async function bringUp(
  target: TargetSpec,
  graph: DeploymentGraph | null,
  config: BenchServeConfig,
  ui: BenchUi,
): Promise<LiveTarget> {
  if (target.kind === 'url' || !graph)
    return { root: serverRoot((target as { url: string }).url), stop: async () => {} };
  // Our own deployment, on loopback, on a free port, without an API key.
  const g: DeploymentGraph = structuredClone(graph);
  g.frontend = { host: '127.0.0.1', port: 0, replicas: 1, migrationLimit: graph.frontend.migrationLimit };
  const lines: string[] = [];
  const log = (line: string) => {
    if (config.verbose) process.stderr.write(`${line}\n`);
    lines.push(line);
    if (lines.length > 200) lines.shift();
  };
  let deployment: Deployment;
  try {
    // Dummy weights of the large presets take minutes to generate: a benchmark waits longer than `tandem start`.
    deployment = await startDeployment(g, {
      log,
      seed: config.weightSeed,
      startTimeoutMs: DEPLOYMENT_START_TIMEOUT_MS,
    });
  } catch (error) {
    const tail = config.verbose ? '' : `\n${lines.slice(-20).join('\n')}`;
    throw new BenchTargetError(
      `the deployment ${defaultLabel(target)} did not start: ${(error as Error).message}${tail}`,
    );
  }
  ui.log(
    `started ${defaultLabel(target)}: ${graph.mode}, ` +
      graph.pools.map((p) => `${p.name} (${p.role} x${p.replicas} on ${p.device})`).join(', ') +
      ` at ${deployment.frontend.url}`,
  );
  return { root: deployment.frontend.url, stop: () => deployment.stop({ drainMs: 1000 }) };
}

function errorCounts(timings: readonly RequestTiming[]): { message: string; count: number }[] {
  const counts = new Map<string, number>();
  for (const t of timings) if (t.error !== null) counts.set(t.error, (counts.get(t.error) ?? 0) + 1);
  return [...counts].map(([message, count]) => ({ message, count })).sort((a, b) => b.count - a.count);
}

function progressText(label: string, point: LoadPoint, total: number, p: LoadProgress): string {
  return (
    `[${label}] ${point.label}: ${p.done}/${total} done, ${p.inFlight} in flight` +
    (p.failed ? `, ${p.failed} failed` : '') +
    `, ${(p.elapsedMs / 1000).toFixed(1)} s`
  );
}

/** One line of a point's results, printed as the sweep goes. */
export function pointLine(label: string, r: PointResult): string {
  const s = r.stats;
  return (
    `[${label}] ${r.load.label}: goodput ${sig(s.goodput)} req/s, attainment ${percent(s.attainment)}, ` +
    `${s.completed}/${s.sent} ok, TTFT p99 ${sig(s.ttftMs?.p99)} ms, ITL p99 ${sig(s.itlMs?.p99)} ms, ` +
    `${sig(s.outputTokenThroughput)} output tok/s`
  );
}

/** Runs the benchmark; every target is stopped before it returns or throws. */
export async function benchServe(config: BenchServeConfig, ui: BenchUi): Promise<BenchServeReport> {
  const started = performance.now();
  const startedAt = new Date().toISOString();
  if (config.targets.length === 0) throw new BadArgumentError('nothing to benchmark: give --url or --deploy');
  if (config.labels && config.labels.length !== config.targets.length)
    throw new BadArgumentError(`--label names ${config.labels.length} targets; there are ${config.targets.length}`);
  const caps = await capabilities();
  const gpus = caps.cuda.available ? caps.cuda.devices.length : 0;

  // Every graph is read before anything starts: a broken second file fails now, not after the first run.
  const graphs = config.targets.map((t) =>
    t.kind === 'deploy'
      ? loadGraph(t.file)
      : t.kind === 'default'
        ? defaultGraph({ gpus, model: t.model, mode: t.mode, port: 0 })
        : null,
  );
  const graphModels = new Set(graphs.filter((g) => g !== null).map((g) => g.model));
  if (graphModels.size > 1)
    throw new BadArgumentError(
      `the deployments serve different models (${[...graphModels].join(', ')}): a comparison runs one model`,
    );
  const labels = config.labels ?? config.targets.map(defaultLabel);
  if (new Set(labels).size !== labels.length)
    throw new BadArgumentError(
      `two targets are both called '${labels.find((l, i) => labels.indexOf(l) !== i)}': name them with --label`,
    );

  const tokenizerSource = config.tokenizer ?? (await targetModel(config.targets[0]!, graphs[0]!, config));
  const factory = new PromptFactory(benchTokenizer(tokenizerSource), config.api);
  const shape = workloadShape(config.workload);
  const points = sweepPoints(config.sweep, shape);
  // Prompts per point, made once and sent to every target.
  const prompts = new Map<number, WorkloadRequest[]>();
  const promptsOf = (i: number) => {
    let p = prompts.get(i);
    if (!p) {
      p = workloadRequests(config.workload, shape, factory, i);
      prompts.set(i, p);
    }
    return p;
  };
  const first = promptsOf(0);
  const short = first.filter((r) => r.promptTokens !== shape.inputLengths[r.index]);
  if (short.length)
    ui.log(
      `note: ${short.length} of ${first.length} prompts could not be made at their length (e.g. ` +
        `${shape.inputLengths[short[0]!.index]} asked, ${short[0]!.promptTokens} made: the chat template or shared ` +
        `prefix alone is longer)`,
    );

  const results: TargetResult[] = [];
  const load = new LoadProcess();
  try {
    for (let t = 0; t < config.targets.length; t++) {
      const target = config.targets[t]!;
      const label = labels[t]!;
      const graph = graphs[t]!;
      const live = await bringUp(target, graph, config, ui);
      try {
        const model = await targetModel(target, graph, config);
        const endpoint: LoadTarget = {
          endpointUrl: `${live.root}/v1/${config.api === 'chat' ? 'chat/completions' : 'completions'}`,
          api: config.api,
          ...(config.apiKey ? { apiKey: config.apiKey } : {}),
        };
        const result: TargetResult = {
          label,
          kind: target.kind,
          source: target.kind === 'url' ? target.url : target.kind === 'deploy' ? target.file : 'default graph',
          url: live.root,
          model,
          graph,
          points: [],
          stopped: null,
        };
        results.push(result);
        await warmUp(load, endpoint, config, factory, shape, model, label, ui);
        for (let i = 0; i < points.length; i++) {
          const point = points[i]!;
          const requests = promptsOf(i);
          const at = sendTimes(point, shape);
          const bodies: LoadRequest[] = requests.map((r) => ({
            index: r.index,
            body: requestBody(config, model, r),
            ...(at ? { atMs: at[r.index]! } : {}),
          }));
          const timings = await load.run(endpoint, bodies, {
            ...(point.kind === 'concurrency' ? { concurrency: point.value } : {}),
            timeoutMs: config.timeoutMs,
            onProgress: (p) => ui.progress(progressText(label, point, bodies.length, p)),
          });
          ui.progressDone();
          const made = Int32Array.from(requests, (r) => r.promptTokens);
          const r: PointResult = {
            load: point,
            stats: runStats(timings, made, config.slo),
            promptTokensOff: timings.filter((x) => x.promptTokens !== null && x.promptTokens !== made[x.index]).length,
            sendLagMs: distribution(timings.flatMap((x) => (x.scheduledMs === null ? [] : [x.sentMs - x.scheduledMs]))),
            errors: errorCounts(timings),
            requests: timings,
          };
          result.points.push(r);
          ui.log(pointLine(label, r));
          if (r.errors.length)
            ui.log(`[${label}]   most frequent error (${r.errors[0]!.count}x): ${r.errors[0]!.message}`);
          if (r.stats.attainment < config.minAttainment && i < points.length - 1) {
            result.stopped =
              `attainment ${percent(r.stats.attainment)} at ${point.label} is under the floor ` +
              `${percent(config.minAttainment)}: higher loads skipped`;
            ui.log(`[${label}] ${result.stopped}`);
            break;
          }
        }
      } finally {
        await live.stop();
      }
    }
  } finally {
    ui.progressDone();
    await load.dispose();
  }

  const isl = Int32Array.from(first, (r) => r.promptTokens);
  return {
    tool: 'tandem bench serve',
    version: packageVersion,
    startedAt,
    seconds: (performance.now() - started) / 1000,
    host: {
      platform: `${caps.node.platform}-${caps.node.arch}, Node ${caps.node.version}`,
      cpu: caps.cpu.model,
      cores: caps.cpu.cores,
      gpus: caps.cuda.devices.map((d) => d.name),
    },
    settings: {
      api: config.api,
      sweep: config.sweep,
      slo: config.slo,
      minAttainment: config.minAttainment,
      warmup: config.warmup,
      timeoutMs: config.timeoutMs,
      temperature: config.temperature,
      forceLength: config.forceLength,
      extraBody: config.extraBody,
      tokenizer: tokenizerSource,
    },
    workload: {
      seed: config.workload.seed,
      requestsPerPoint: shape.count,
      isl: config.workload.trace ? 'trace' : formatLengthSpec(config.workload.isl),
      osl: config.workload.trace ? 'trace' : formatLengthSpec(config.workload.osl),
      arrival: config.sweep.kind === 'rate' ? config.sweep.arrival : null,
      sharedPrefix: config.workload.sharedPrefix ?? null,
      trace: config.workload.trace
        ? {
            file: config.traceFile ?? '',
            lines: config.workload.trace.requests.length,
            blockTokens: config.workload.trace.blockTokens,
            spanS: shape.traceTimesMs![shape.count - 1]! / 1000,
          }
        : null,
      inputTokens: distribution(isl),
      outputTokens: distribution(shape.outputLengths),
    },
    targets: results,
  };
}

/** A few requests one at a time, not counted; a target that fails them all is not worth a sweep. */
async function warmUp(
  load: LoadProcess,
  endpoint: LoadTarget,
  config: BenchServeConfig,
  factory: PromptFactory,
  shape: WorkloadShape,
  model: string,
  label: string,
  ui: BenchUi,
): Promise<void> {
  if (config.warmup <= 0) return;
  const source = seededSource(config.workload.seed, 'warm-up');
  const bodies: LoadRequest[] = Array.from({ length: config.warmup }, (_, i) => {
    const k = i % shape.count;
    const p = factory.fit(shape.inputLengths[k]!, source);
    return { index: i, body: requestBody(config, model, { text: p.text, outputTokens: shape.outputLengths[k]! }) };
  });
  const timings = await load.run(endpoint, bodies, {
    concurrency: 1,
    timeoutMs: config.timeoutMs,
    onProgress: (p) => ui.progress(`[${label}] warm-up: ${p.done}/${bodies.length} done`),
  });
  ui.progressDone();
  const failed = timings.filter((t) => t.error !== null);
  if (failed.length === timings.length)
    throw new BenchTargetError(`[${label}] every warm-up request failed: ${failed[0]!.error}`);
}
