/**
 * The deployment graph: which model, where the frontend listens, and which pools of workers run it. Written
 * in YAML (`tandem serve -f graph.yaml`) or built in code (`defaultGraph` for `npm start`). Every error
 * names the file, line and column of the offending node and its path in the graph:
 *
 *   graph.yaml:7:5: pools[1].replicas: must be a positive integer
 *
 * A graph that loads is complete: every default is filled in, so the launcher never guesses.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { isMap, isScalar, isSeq, LineCounter, parseDocument, type Document, type Node } from 'yaml';
import { z } from 'zod';
import { ParallelLayoutError, TandemError } from '../errors.js';
import { loadModelConfig, type ModelConfig } from '../engine/model/config.js';
import { DUMMY_PREFIX, DUMMY_PRESETS, dummyConfig } from '../engine/model/dummy.js';
import { checkParallelConfig } from '../engine/parallel.js';
import { DEFAULT_EPLB_POLICY, type EplbPolicy } from '../moe/policy.js';
import { DEFAULT_MIGRATION_LIMIT } from '../frontend/migration.js';
import {
  DEFAULT_MAX_PREFILL_QUEUE,
  DEFAULT_MIN_REMOTE_PREFILL_TOKENS,
  type DisaggregationThresholds,
} from '../router/disagg.js';
import {
  DEFAULT_PREFILL_WEIGHT,
  DEFAULT_ROUTER_POLICY,
  DEFAULT_ROUTER_TEMPERATURE,
  ROUTER_POLICIES,
  type RouterConfig,
} from '../router/index.js';
import { KubernetesPlannerSchema, PlannerSpecSchema, type PlannerSpec } from '../planner/spec.js';

export const POOL_ROLES = ['prefill', 'decode', 'aggregated'] as const;
export type PoolRole = (typeof POOL_ROLES)[number];
export const SERVING_MODES = ['disagg', 'agg'] as const;
export type ServingMode = (typeof SERVING_MODES)[number];
export const DEVICES = ['cpu', 'cuda', 'auto'] as const;
export type DeviceKind = (typeof DEVICES)[number];

export const DEFAULT_FRONTEND_HOST = '127.0.0.1';
export const DEFAULT_FRONTEND_PORT = 8000;
export const DEFAULT_BLOCK_SIZE = 16;
/** The model `npm start` serves when none is named: seeded random weights, fast enough for a CPU. */
export const DEFAULT_MODEL = 'dummy:tiny';
/**
 * KV cache share of GPU memory for each of the two workers of `defaultGraph` when they share one GPU; two
 * engines taking a single-tenant share each would run the GPU out of memory.
 */
export const SHARED_GPU_KV_CACHE_FRACTION = 0.4;

export interface EngineOptions {
  /** Tokens per KV block. */
  blockSize: number;
  /** KV blocks to allocate; exclusive with kvCacheFraction. Neither: the engine decides. */
  numBlocks?: number;
  /** Share of device memory (GPU) for the KV cache, in (0, 1]; exclusive with numBlocks. */
  kvCacheFraction?: number;
  /** Most tokens in one forward batch. */
  maxBatchTokens?: number;
  /** Most sequences decoding at once. */
  maxSequences?: number;
  /** CPU engine threads. */
  threads?: number;
}

export interface PoolSpec {
  /** Unique in the graph; names the pool's processes (`<name>-<replica>`) and prefixes their logs. */
  name: string;
  role: PoolRole;
  replicas: number;
  /**
   * GPUs of one replica: 0 on CPU, else its ranks, max(tensorParallelSize, expertParallelSize) x pipelineParallelSize
   * (the default), or 1: every tensor-parallel rank on one GPU (the GPU engine's local communicator; ranks on several
   * GPUs need the NCCL communicator, which the GPU engine does not have yet, so today a GPU pool of several ranks
   * sets 1).
   */
  gpusPerReplica: number;
  /**
   * Tensor parallel ranks of one replica (lib/engine/parallel.ts): each holds heads / tp of every layer. On CPU
   * the ranks are native threads of the worker; it must divide the model's heads (see checkParallelConfig).
   */
  tensorParallelSize: number;
  /** Pipeline stages of one replica: each runs a contiguous share of the layers. At most the model's layers. */
  pipelineParallelSize: number;
  /**
   * Expert parallel ranks of one replica of an MoE model (lib/engine/parallel.ts): each holds experts / ep whole
   * experts; they are the tensor-parallel ranks, so tensorParallelSize is 1 or equal to it. Default 1.
   */
  expertParallelSize: number;
  /**
   * Online expert load balancing (lib/moe's EplbPolicy) of an MoE pool with expertParallelSize > 1, on the CPU
   * engine: `eplb: {}` takes DEFAULT_EPLB_POLICY; any of windowSteps, periodSteps, redundantSlotsPerRank,
   * minImbalanceGain overrides it. Absent: the static placement.
   */
  eplb?: EplbPolicy;
  /** `auto`: CUDA where the pool has GPUs and the machine has them, else CPU. */
  device: DeviceKind;
  /**
   * GPU indices this pool uses, replica r taking gpuIds[r * gpusPerReplica ...] (pools may share a GPU).
   * Absent: the launcher hands out free GPUs in order.
   */
  gpuIds?: number[];
  engine: EngineOptions;
}

export interface FrontendSpec {
  host: string;
  /** The first frontend's port; replica i listens on port + i (0: each picks a free port), unless `ports`. */
  port: number;
  /** HTTP frontends (default 1), each with its own router; any of them serves any request. */
  replicas: number;
  /** One port per replica, in order, instead of port, port + 1, ... (see `frontendPorts`). */
  ports?: number[];
  /**
   * Times a request whose decode (or aggregated) worker dies mid-stream is re-issued to another worker, with
   * the output already streamed (lib/frontend/migration.ts). Default DEFAULT_MIGRATION_LIMIT (3); 0 turns it off.
   */
  migrationLimit: number;
  /**
   * The environment variable that holds the API key clients must send (`Authorization: Bearer <key>`). The
   * key itself never goes in the graph file: files get committed, copied and shared. Absent: no key, unless
   * `tandem start --api-key` or TANDEM_API_KEY gives one.
   */
  apiKeyEnv?: string;
}

export interface DeploymentGraph {
  /** A model directory (absolute once loaded from a file) or `dummy:<preset>`. */
  model: string;
  mode: ServingMode;
  frontend: FrontendSpec;
  pools: PoolSpec[];
  disaggregation: DisaggregationThresholds;
  /** How the router picks workers (README, "Routing policies"); `tandem serve --router-policy` overrides policy. */
  router: RouterConfig;
  /**
   * The planner (README, "Planning capacity"): off by default (fixed pools). A profile path is absolute once
   * loaded from a file.
   */
  planner: PlannerSpec;
}

/** Where one problem of a graph is: `source:line:column: path: message`. */
export interface GraphIssue {
  source: string;
  line: number;
  column: number;
  /** Path in the graph, `pools[1].replicas`; empty for the whole document. */
  path: string;
  message: string;
}

/** The graph does not parse or does not validate; `issues` lists every problem found, in document order. */
export class GraphError extends TandemError {
  constructor(readonly issues: readonly GraphIssue[]) {
    super(
      'TANDEM_BAD_GRAPH',
      issues.map((i) => `${i.source}:${i.line}:${i.column}: ${i.path ? `${i.path}: ` : ''}${i.message}`).join('\n'),
    );
  }
}

// ---- schema ------------------------------------------------------------------------------------------------

const err = (message: string) => ({ error: message });
const POSITIVE_INT = 'must be a positive integer';
const NON_NEGATIVE_INT = 'must be an integer >= 0';
const positiveInt = () => z.number(err(POSITIVE_INT)).int(err(POSITIVE_INT)).min(1, err(POSITIVE_INT));
const PORT = 'must be an integer in 0..65535';
const port = () => z.number(err(PORT)).int(err(PORT)).min(0, err(PORT)).max(65535, err(PORT));
const nonNegativeInt = () => z.number(err(NON_NEGATIVE_INT)).int(err(NON_NEGATIVE_INT)).min(0, err(NON_NEGATIVE_INT));
const oneOf = <const T extends readonly [string, ...string[]]>(values: T) =>
  z.enum(values, err(`must be one of ${values.join(', ')}`));
const MAPPING = 'must be a mapping';
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
const POOL_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$/;

const EngineOptionsSchema = z.strictObject(
  {
    blockSize: positiveInt().default(DEFAULT_BLOCK_SIZE),
    numBlocks: positiveInt().optional(),
    kvCacheFraction: z
      .number(err('must be a number in (0, 1]'))
      .gt(0, err('must be a number in (0, 1]'))
      .max(1, err('must be a number in (0, 1]'))
      .optional(),
    maxBatchTokens: positiveInt().optional(),
    maxSequences: positiveInt().optional(),
    threads: positiveInt().optional(),
  },
  err(MAPPING),
);

const PoolSchema = z.strictObject(
  {
    name: z
      .string(err('must be a string'))
      .regex(POOL_NAME, err('must be 1 to 63 letters, digits, - or _, starting with a letter or digit')),
    role: oneOf(POOL_ROLES),
    replicas: positiveInt().default(1),
    gpusPerReplica: nonNegativeInt().optional(),
    tensorParallelSize: positiveInt().default(1),
    pipelineParallelSize: positiveInt().default(1),
    expertParallelSize: positiveInt().default(1),
    eplb: z
      .strictObject(
        {
          windowSteps: positiveInt().default(DEFAULT_EPLB_POLICY.windowSteps),
          periodSteps: positiveInt().default(DEFAULT_EPLB_POLICY.periodSteps),
          redundantSlotsPerRank: nonNegativeInt().default(DEFAULT_EPLB_POLICY.redundantSlotsPerRank),
          minImbalanceGain: z
            .number(err('must be a number in [0, 1)'))
            .min(0, err('must be a number in [0, 1)'))
            .lt(1, err('must be a number in [0, 1)'))
            .default(DEFAULT_EPLB_POLICY.minImbalanceGain),
        },
        err(MAPPING),
      )
      .optional(),
    device: oneOf(DEVICES).default('auto'),
    gpuIds: z.array(nonNegativeInt(), err('must be a list of GPU indices')).optional(),
    engine: EngineOptionsSchema.prefault({}),
  },
  err(MAPPING),
);

const GraphSchema = z.strictObject(
  {
    model: z
      .string(err('must be a string: a model directory or dummy:<preset>'))
      .min(1, err('must be a model directory or dummy:<preset>')),
    mode: oneOf(SERVING_MODES).default('disagg'),
    frontend: z
      .strictObject(
        {
          host: z.string(err('must be a string')).min(1, err('must not be empty')).default(DEFAULT_FRONTEND_HOST),
          port: port().optional(),
          replicas: positiveInt().default(1),
          ports: z.array(port(), err('must be a list of ports')).optional(),
          migrationLimit: nonNegativeInt().default(DEFAULT_MIGRATION_LIMIT),
          apiKeyEnv: z
            .string(err('must be the name of an environment variable'))
            .regex(ENV_NAME, err('must be the name of an environment variable (letters, digits, _)'))
            .optional(),
        },
        err(MAPPING),
      )
      .prefault({}),
    pools: z.array(PoolSchema, err('must be a list of pools')).min(1, err('must list at least one pool')),
    disaggregation: z
      .strictObject(
        {
          minRemotePrefillTokens: positiveInt().default(DEFAULT_MIN_REMOTE_PREFILL_TOKENS),
          maxPrefillQueue: positiveInt().default(DEFAULT_MAX_PREFILL_QUEUE),
        },
        err(MAPPING),
      )
      .prefault({}),
    router: z
      .strictObject(
        {
          policy: oneOf(ROUTER_POLICIES).default(DEFAULT_ROUTER_POLICY),
          prefillWeight: z
            .number(err('must be a number >= 0'))
            .min(0, err('must be a number >= 0'))
            .default(DEFAULT_PREFILL_WEIGHT),
          temperature: z
            .number(err('must be a number >= 0 (0: always the cheapest worker)'))
            .min(0, err('must be a number >= 0 (0: always the cheapest worker)'))
            .default(DEFAULT_ROUTER_TEMPERATURE),
        },
        err(MAPPING),
      )
      .prefault({}),
    planner: PlannerSpecSchema.prefault({}),
  },
  err('a deployment graph must be a mapping with model and pools'),
);

type PathKey = string | number;
/** A problem at a path; `key` set when it is about a mapping's key (unknown key) rather than its value. */
interface PathIssue {
  path: PathKey[];
  key?: string;
  message: string;
}

const KNOWN_KEYS: Record<string, readonly string[]> = {
  root: Object.keys(GraphSchema.shape),
  frontend: ['host', 'port', 'replicas', 'ports', 'migrationLimit', 'apiKeyEnv'],
  pool: Object.keys(PoolSchema.shape),
  engine: Object.keys(EngineOptionsSchema.shape),
  eplb: Object.keys(DEFAULT_EPLB_POLICY),
  disaggregation: ['minRemotePrefillTokens', 'maxPrefillQueue'],
  router: ['policy', 'prefillWeight', 'temperature'],
  planner: PlannerSpecSchema.in.keyof().options,
  'planner.kubernetes': KubernetesPlannerSchema.keyof().options,
};

function knownKeysAt(path: readonly PathKey[]): readonly string[] {
  if (path.length === 0) return KNOWN_KEYS.root!;
  if (path[0] === 'pools')
    return path.length >= 3 && (path[2] === 'engine' || path[2] === 'eplb') ? KNOWN_KEYS[path[2]]! : KNOWN_KEYS.pool!;
  if (path[0] === 'planner' && path[1] === 'kubernetes') return KNOWN_KEYS['planner.kubernetes']!;
  return KNOWN_KEYS[String(path[0])] ?? [];
}

function unknownKeyMessage(key: string, path: readonly PathKey[]): string {
  if (path.length === 1 && path[0] === 'frontend' && /^api[-_]?key$/i.test(key))
    return `unknown key '${key}': an API key does not belong in a graph file; put it in an environment variable and name that in apiKeyEnv`;
  const known = knownKeysAt(path);
  const near = known.find((k) => k.toLowerCase() === key.toLowerCase().replace(/[-_]/g, ''));
  return `unknown key '${key}'${near ? ` (did you mean '${near}'?)` : ` (known: ${known.join(', ')})`}`;
}

function valueAt(root: unknown, path: readonly PathKey[]): unknown {
  let v = root;
  for (const k of path) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<PathKey, unknown>)[k];
  }
  return v;
}

function schemaIssues(input: unknown): { graph?: z.output<typeof GraphSchema>; issues: PathIssue[] } {
  const result = GraphSchema.safeParse(input);
  if (result.success) return { graph: result.data, issues: [] };
  const issues: PathIssue[] = [];
  for (const issue of result.error.issues) {
    const path = issue.path.filter((k): k is PathKey => typeof k !== 'symbol');
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) issues.push({ path, key, message: unknownKeyMessage(key, path) });
    } else if (issue.code !== 'custom' && path.length > 0 && valueAt(input, path) === undefined) {
      issues.push({ path, message: 'is required' });
    } else {
      issues.push({ path, message: issue.message });
    }
  }
  return { issues };
}

/** Checks that span fields (mode against roles, GPUs against device and TP), then fills the derived defaults. */
function semanticIssues(parsed: z.output<typeof GraphSchema>): { graph: DeploymentGraph; issues: PathIssue[] } {
  const issues: PathIssue[] = [];
  const model = parsed.model;
  if (model.startsWith(DUMMY_PREFIX)) {
    const preset = model.slice(DUMMY_PREFIX.length);
    if (!(DUMMY_PRESETS as readonly string[]).includes(preset))
      issues.push({
        path: ['model'],
        message: `unknown dummy preset '${preset}' (known: ${DUMMY_PRESETS.join(', ')})`,
      });
  }

  const seen = new Map<string, number>();
  const pools: PoolSpec[] = parsed.pools.map((p, i) => {
    const at = (...rest: PathKey[]): PathKey[] => ['pools', i, ...rest];
    const first = seen.get(p.name);
    if (first !== undefined)
      issues.push({ path: at('name'), message: `'${p.name}' is already the name of pools[${first}]` });
    else seen.set(p.name, i);

    // On CPU the ranks are threads of the worker (no GPUs); on GPUs, one GPU per rank, or every rank on one GPU
    // (gpusPerReplica 1: the GPU engine's local communicator).
    const ranks = Math.max(p.tensorParallelSize, p.expertParallelSize) * p.pipelineParallelSize;
    const gpusPerReplica = p.gpusPerReplica ?? (p.device === 'cpu' ? 0 : ranks);
    if (p.device === 'cpu' && gpusPerReplica > 0)
      issues.push({ path: at('gpusPerReplica'), message: 'must be 0 on device cpu' });
    if (gpusPerReplica === 0) {
      if (p.device === 'cuda')
        issues.push({ path: at('gpusPerReplica'), message: 'must be at least 1 on device cuda' });
    } else if (gpusPerReplica !== ranks && gpusPerReplica !== 1) {
      issues.push({
        path: at('gpusPerReplica'),
        message: `must equal ${p.expertParallelSize > 1 ? 'max(tensorParallelSize, expertParallelSize)' : 'tensorParallelSize'} x pipelineParallelSize (${ranks}): one GPU per rank, or 1: every rank on one GPU`,
      });
    }
    if (p.gpuIds !== undefined) {
      if (gpusPerReplica === 0) issues.push({ path: at('gpuIds'), message: 'a pool without GPUs takes no gpuIds' });
      else if (p.gpuIds.length !== p.replicas * gpusPerReplica)
        issues.push({
          path: at('gpuIds'),
          message: `must list replicas x gpusPerReplica = ${p.replicas * gpusPerReplica} GPU indices (got ${p.gpuIds.length})`,
        });
      else if (new Set(p.gpuIds).size !== p.gpuIds.length)
        issues.push({ path: at('gpuIds'), message: 'must not repeat a GPU within a pool' });
    }
    if (p.eplb !== undefined && p.expertParallelSize < 2)
      issues.push({
        path: at('eplb'),
        message: 'needs expertParallelSize > 1 (it balances the experts over the expert-parallel ranks)',
      });
    if (p.engine.numBlocks !== undefined && p.engine.kvCacheFraction !== undefined)
      issues.push({ path: at('engine', 'kvCacheFraction'), message: 'set numBlocks or kvCacheFraction, not both' });

    const engine: EngineOptions = { blockSize: p.engine.blockSize };
    for (const k of ['numBlocks', 'kvCacheFraction', 'maxBatchTokens', 'maxSequences', 'threads'] as const)
      if (p.engine[k] !== undefined) engine[k] = p.engine[k];
    const pool: PoolSpec = {
      name: p.name,
      role: p.role,
      replicas: p.replicas,
      gpusPerReplica,
      tensorParallelSize: p.tensorParallelSize,
      pipelineParallelSize: p.pipelineParallelSize,
      expertParallelSize: p.expertParallelSize,
      ...(p.eplb !== undefined && { eplb: { ...p.eplb } }),
      device: p.device,
      engine,
    };
    if (p.gpuIds !== undefined) pool.gpuIds = [...p.gpuIds];
    return pool;
  });

  const roles = new Set(pools.map((p) => p.role));
  if (parsed.mode === 'disagg') {
    const missing = (['prefill', 'decode'] as const).filter((r) => !roles.has(r));
    if (missing.length)
      issues.push({
        path: ['pools'],
        message: `mode disagg needs at least one prefill and one decode pool (no ${missing.join(' or ')} pool)`,
      });
  } else {
    if (!roles.has('aggregated') && !roles.has('decode'))
      issues.push({ path: ['pools'], message: 'mode agg needs an aggregated (or decode) pool' });
    pools.forEach((p, i) => {
      if (p.role === 'prefill')
        issues.push({ path: ['pools', i, 'role'], message: 'mode agg runs no prefill pools (use mode disagg)' });
    });
  }

  const f = parsed.frontend;
  const frontend: FrontendSpec = {
    host: f.host,
    port: f.ports?.[0] ?? f.port ?? DEFAULT_FRONTEND_PORT,
    replicas: f.replicas,
    migrationLimit: f.migrationLimit,
    ...(f.apiKeyEnv !== undefined ? { apiKeyEnv: f.apiKeyEnv } : {}),
  };
  if (f.ports !== undefined) {
    frontend.ports = [...f.ports];
    if (f.port !== undefined) issues.push({ path: ['frontend', 'ports'], message: 'set port or ports, not both' });
    else if (f.ports.length !== f.replicas)
      issues.push({
        path: ['frontend', 'ports'],
        message: `must list one port per replica (${f.replicas}; got ${f.ports.length})`,
      });
    else if (new Set(f.ports.filter((p) => p !== 0)).size !== f.ports.filter((p) => p !== 0).length)
      issues.push({ path: ['frontend', 'ports'], message: 'must not repeat a port (0 excepted)' });
  } else if (frontend.port !== 0 && frontend.port + f.replicas - 1 > 65535)
    issues.push({
      path: ['frontend', 'replicas'],
      message: `${f.replicas} frontends from port ${frontend.port} go past port 65535`,
    });

  const planner: PlannerSpec = { ...parsed.planner };
  if (planner.mode !== 'off') {
    if (parsed.mode !== 'disagg')
      issues.push({ path: ['planner', 'mode'], message: `planner mode ${planner.mode} needs mode disagg` });
    for (const role of ['prefill', 'decode'] as const) {
      const n = pools.filter((p) => p.role === role).length;
      if (n > 1)
        issues.push({
          path: ['pools'],
          message: `planner mode ${planner.mode} moves workers between one prefill and one decode pool (${n} ${role} pools)`,
        });
    }
  }

  return {
    graph: {
      model,
      mode: parsed.mode,
      frontend,
      pools,
      disaggregation: {
        minRemotePrefillTokens: parsed.disaggregation.minRemotePrefillTokens,
        maxPrefillQueue: parsed.disaggregation.maxPrefillQueue,
      },
      router: {
        policy: parsed.router.policy,
        prefillWeight: parsed.router.prefillWeight,
        temperature: parsed.router.temperature,
      },
      planner,
    },
    issues,
  };
}

function validate(input: unknown): { graph?: DeploymentGraph; issues: PathIssue[] } {
  const schema = schemaIssues(input);
  if (!schema.graph) return { issues: schema.issues };
  return semanticIssues(schema.graph);
}

export function formatPath(path: readonly PathKey[]): string {
  let s = '';
  for (const k of path) s += typeof k === 'number' ? `[${k}]` : s ? `.${k}` : k;
  return s;
}

// ---- positions ---------------------------------------------------------------------------------------------

/** The source offset of an issue: the key for unknown keys, else the deepest node on its path that exists. */
function offsetOf(doc: Document, issue: PathIssue): number {
  let node: unknown = doc.contents;
  let offset = doc.contents?.range?.[0] ?? 0;
  const steps: PathKey[] = issue.key === undefined ? issue.path : [...issue.path, issue.key];
  for (let i = 0; i < steps.length; i++) {
    const step = steps[i]!;
    const isLast = i === steps.length - 1;
    if (isMap(node)) {
      const pair = node.items.find((p) => (isScalar(p.key) ? p.key.value : p.key) === step);
      if (!pair) break;
      if (isLast && issue.key !== undefined) return (pair.key as Node | null)?.range?.[0] ?? offset;
      const value = pair.value as Node | null;
      // A key with no value (`replicas:`) has a null value node: point at the key.
      offset = value?.range?.[0] ?? (pair.key as Node | null)?.range?.[0] ?? offset;
      node = value;
    } else if (isSeq(node) && typeof step === 'number') {
      const item = node.items[step] as Node | undefined;
      if (!item) break;
      offset = item.range?.[0] ?? offset;
      node = item;
    } else break;
  }
  return offset;
}

function positioned(doc: Document, lines: LineCounter, source: string, issues: PathIssue[]): GraphIssue[] {
  return issues
    .map((issue) => {
      const offset = offsetOf(doc, issue);
      const { line, col } = lines.linePos(offset);
      return { offset, source, line, column: col, path: formatPath(issue.path), message: issue.message };
    })
    .sort((a, b) => a.offset - b.offset)
    .map(({ offset: _offset, ...rest }) => rest);
}

export interface ParseGraphOptions {
  /**
   * Resolve a relative model directory against this directory and check that it exists (loadGraph passes
   * the graph file's directory). Without it the model is taken as written.
   */
  baseDir?: string;
}

/**
 * Each pool's tensor / pipeline / expert parallel sizes against the model (heads, kv heads, intermediate size,
 * layers, experts).
 * A model whose config does not load is left to the worker, which names the file.
 */
function parallelIssues(graph: DeploymentGraph): PathIssue[] {
  const parallel = graph.pools
    .map((p, i) => ({ p, i }))
    .filter(({ p }) => p.tensorParallelSize * p.pipelineParallelSize * p.expertParallelSize > 1 || p.eplb);
  if (parallel.length === 0) return [];
  let config: ModelConfig;
  try {
    config = graph.model.startsWith(DUMMY_PREFIX) ? dummyConfig(graph.model) : loadModelConfig(graph.model);
  } catch {
    return [];
  }
  const issues: PathIssue[] = [];
  for (const { p, i } of parallel) {
    try {
      checkParallelConfig(
        config,
        { tp: p.tensorParallelSize, pp: p.pipelineParallelSize, ep: p.expertParallelSize },
        '',
      );
    } catch (error) {
      if (!(error instanceof ParallelLayoutError)) throw error;
      const field = error.message.startsWith('pipeline')
        ? 'pipelineParallelSize'
        : error.message.startsWith('expert')
          ? 'expertParallelSize'
          : 'tensorParallelSize';
      issues.push({ path: ['pools', i, field], message: error.message });
    }
    const experts = config.moe?.numExperts ?? 0;
    if (p.eplb && experts > 0 && p.eplb.redundantSlotsPerRank > experts)
      issues.push({
        path: ['pools', i, 'eplb', 'redundantSlotsPerRank'],
        message: `must be at most the model's ${experts} experts (one replica of each per rank)`,
      });
  }
  return issues;
}

/** Parses and validates a graph. `sourceName` is what error positions name (a file name). Throws GraphError. */
export function parseGraph(text: string, sourceName = 'graph.yaml', options: ParseGraphOptions = {}): DeploymentGraph {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: true });
  if (doc.errors.length) {
    throw new GraphError(
      doc.errors.map((e) => {
        const { line, col } = lines.linePos(e.pos[0]);
        return { source: sourceName, line, column: col, path: '', message: e.message.split('\n')[0]! };
      }),
    );
  }
  const { graph, issues } = validate(doc.toJS({ maxAliasCount: 100 }));
  if (graph && options.baseDir !== undefined && !graph.model.startsWith(DUMMY_PREFIX)) {
    const dir = isAbsolute(graph.model) ? graph.model : resolve(options.baseDir, graph.model);
    if (!existsSync(dir) || !statSync(dir).isDirectory())
      issues.push({ path: ['model'], message: `model directory ${dir} does not exist (or write dummy:<preset>)` });
    graph.model = dir;
  }
  if (graph) issues.push(...parallelIssues(graph));
  if (graph?.planner.profile !== undefined && options.baseDir !== undefined)
    graph.planner.profile = resolve(options.baseDir, graph.planner.profile);
  if (graph?.planner.kubernetes?.kubeconfig !== undefined && options.baseDir !== undefined)
    graph.planner.kubernetes.kubeconfig = resolve(options.baseDir, graph.planner.kubernetes.kubeconfig);
  if (issues.length || !graph) throw new GraphError(positioned(doc, lines, sourceName, issues));
  return graph;
}

/**
 * The port of each frontend replica: `ports` as the graph lists them, else port, port + 1, ...; port 0 gives
 * every replica 0 (each picks a free port).
 */
export function frontendPorts(frontend: FrontendSpec): number[] {
  if (frontend.ports) return [...frontend.ports];
  return Array.from({ length: frontend.replicas }, (_, i) => (frontend.port === 0 ? 0 : frontend.port + i));
}

/** Reads and validates a graph file; a relative model directory is relative to the file. Throws GraphError. */
export function loadGraph(path: string): DeploymentGraph {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    throw new GraphError([
      { source: path, line: 1, column: 1, path: '', message: `cannot read: ${(error as Error).message}` },
    ]);
  }
  return parseGraph(text, path, { baseDir: dirname(resolve(path)) });
}

export interface DefaultGraphOptions {
  /** Default `dummy:tiny`. */
  model?: string;
  /** GPUs on this machine. */
  gpus: number;
  /** Default 'disagg'; 'agg' serves with one aggregated worker. */
  mode?: ServingMode;
  /** Default 127.0.0.1:8000. */
  host?: string;
  port?: number;
}

/**
 * The embedded deployment of `npm start`: a frontend on 127.0.0.1:8000, one prefill and one decode worker.
 * Two GPUs or more: prefill on GPU 0, decode on GPU 1. One GPU: both on it, each with a KV share that leaves
 * room for the other. None: both on the CPU.
 */
export function defaultGraph(options: DefaultGraphOptions): DeploymentGraph {
  const { gpus } = options;
  if (!Number.isSafeInteger(gpus) || gpus < 0) throw new TypeError(`gpus must be an integer >= 0 (got ${gpus})`);
  const mode = options.mode ?? 'disagg';
  const pool = (name: string, role: PoolRole, gpu: number): Record<string, unknown> =>
    gpus === 0
      ? { name, role, device: 'cpu', gpusPerReplica: 0 }
      : {
          name,
          role,
          device: 'cuda',
          gpusPerReplica: 1,
          gpuIds: [gpu],
          engine: gpus === 1 && mode === 'disagg' ? { kvCacheFraction: SHARED_GPU_KV_CACHE_FRACTION } : {},
        };
  const input = {
    model: options.model ?? DEFAULT_MODEL,
    mode,
    frontend: { host: options.host ?? DEFAULT_FRONTEND_HOST, port: options.port ?? DEFAULT_FRONTEND_PORT },
    pools:
      mode === 'disagg'
        ? [pool('prefill', 'prefill', 0), pool('decode', 'decode', gpus >= 2 ? 1 : 0)]
        : [pool('aggregated', 'aggregated', 0)],
  };
  const { graph, issues } = validate(input);
  if (!graph || issues.length)
    throw new GraphError(
      issues.map((i) => ({
        source: 'default graph',
        line: 1,
        column: 1,
        path: formatPath(i.path),
        message: i.message,
      })),
    );
  return graph;
}
