/**
 * The launcher: starts a deployment graph on this machine. One process per worker (forked, supervised:
 * a crashed worker is reported and restarted), logs prefixed by process, the control plane in this process,
 * and in front of it the OpenAI-compatible frontends (`frontend.replicas`, one port each), each with its own
 * router behind request migration (migration.ts). `stop()` drains, then stops everything; no process
 * outlives it (and workers exit by themselves when the launcher dies).
 *
 * Several frontends share the workers. On the request plane a request's id carries its frontend
 * (`f<index>/<id>`, see `requestPlaneId`): a worker's message about a request reaches the router that sent it;
 * a message about no request (load, and whatever worker-wide events workers publish) reaches every router.
 * Load is shared best-effort: every router sees every worker's reported load (heartbeats, one control plane),
 * and counts only its own requests in flight.
 *
 * Start-up fails fast, before any weights load where it can: the model's config and tokenizer are read
 * first (a missing or malformed model is a ModelConfigError naming the path), then the frontends take their
 * ports (a busy port is a ListenError naming it), then the workers start; a worker that fails to start (its
 * `fatal` message, or an exit before it registered) fails the whole start with its error, without restarts.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { isIPv4 } from 'node:net';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { BadArgumentError, TandemError, TimeoutError } from '../errors.js';
import { dummyConfig, isDummyModel } from '../engine/model/dummy.js';
import { loadModelConfig } from '../engine/model/config.js';
import { modelTokenizer } from '../engine/tokenizer.js';
import { EmbeddedControlPlane, type ControlPlane } from '../control/control-plane.js';
import { DEFAULT_WORKER_TIMEOUT_MS, routingChoices } from '../control/control-plane.js';
import { ControlPlaneRelay, EtcdControlPlane, type EtcdControlPlaneOptions } from '../control/index.js';
import { frontendPorts, type DeploymentGraph, type PoolSpec } from './graph.js';
import { startFrontend, type RunningFrontend } from '../frontend/index.js';
import { ServeMetrics } from '../frontend/metrics.js';
import type { GenerationBackend } from '../frontend/backend.js';
import { MigratingBackend } from '../frontend/migration.js';
import type { FromWorker, ToWorker, WorkerInit } from '../worker/protocol.js';
import { Router } from '../router/router.js';
import { LoadEstimate } from '../router/index.js';
// ---- planner hooks (lib/planner: the runtime and its local connector) ----
import { LocalConnector, type LocalWorkers, type PlannerConnector } from '../planner/connectors/index.js';
import { MetricsWindow } from '../planner/observe.js';
import { loadProfile } from '../planner/profile.js';
import { PlannerRuntime, type PlannerRuntimeOptions, type PlannerStatus } from '../planner/runtime.js';
import type { Pool } from '../planner/load-correction.js';
import { correctionOptions, type PlannerSpec } from '../planner/spec.js';
import { ReshapeUnsupportedError } from '../planner/errors.js';
import { layoutName, type Parallelism } from '../planner/profile.js';
import { poolLayout, replicaLayout } from '../planner/connectors/index.js';
import { checkParallelConfig, rankCount } from '../engine/parallel.js';
// ---- end planner hooks ----

/** First delay before restarting a crashed worker; it doubles with each crash, up to RESTART_BACKOFF_MAX_MS. */
export const RESTART_BACKOFF_INITIAL_MS = 500;
export const RESTART_BACKOFF_MAX_MS = 10_000;
/**
 * A worker that had been registered this long when it crashed counts as having been healthy: its restart
 * delay starts over from RESTART_BACKOFF_INITIAL_MS (a crash a day must not cost 10 s of downtime each).
 */
export const RESTART_BACKOFF_RESET_MS = 60_000;
/** Default bound on a worker's start-up (loading the model included). */
export const DEFAULT_WORKER_START_TIMEOUT_MS = 120_000;

/** The delay before restart number `restarts + 1` of a worker. */
export function restartDelayMs(restarts: number): number {
  return Math.min(RESTART_BACKOFF_MAX_MS, RESTART_BACKOFF_INITIAL_MS * 2 ** Math.min(restarts, 5));
}

/** A worker failed to start (its error, or the signal or exit code it died of); the deployment did not start. */
export class WorkerStartError extends TandemError {
  constructor(
    readonly worker: string,
    message: string,
    code = 'TANDEM_WORKER_START_FAILED',
  ) {
    super(code, `worker ${worker} failed to start: ${message}`);
  }
}

/** The frontend cannot listen where the graph says (the port is taken, or needs privileges). */
export class ListenError extends TandemError {
  constructor(message: string) {
    super('TANDEM_LISTEN_FAILED', message);
  }
}

export interface DeploymentOptions {
  /** Where log lines go (default: stdout). */
  log?: (line: string) => void;
  heartbeatMs?: number;
  /**
   * A worker silent (no heartbeat) for this long is dropped and its requests migrate, though its process is still
   * there (default DEFAULT_WORKER_TIMEOUT_MS). A shorter silence (5 heartbeats, at least 3 s) only makes it suspect:
   * routers prefer the others and its requests go on. A worker whose process exits is dropped at once.
   */
  workerTimeoutMs?: number;
  /**
   * How long a worker sent SIGTERM lets its requests in flight finish before it exits (those still running then
   * migrate); meanwhile routers send it nothing new. Default DEFAULT_DRAIN_TIMEOUT_MS (30 s).
   */
  workerDrainTimeoutMs?: number;
  /** How long a decode worker waits for a remote prefill before serving the request itself (default 30 s). */
  remotePrefillTimeoutMs?: number;
  /** Seed of `dummy:` weights, the same in every worker. */
  seed?: number;
  /** Restart crashed workers (default true). */
  restart?: boolean;
  /** Worker start-up bound (loading the model included). Default DEFAULT_WORKER_START_TIMEOUT_MS. */
  startTimeoutMs?: number;
  /** Registered this long, a worker's restart backoff starts over. Default RESTART_BACKOFF_RESET_MS. */
  restartBackoffResetMs?: number;
  /** The clock (ms) the restart backoff reads; tests inject one. Default Date.now. */
  now?: () => number;
  /**
   * The API key clients must send as `Authorization: Bearer <key>` on /v1/*. Default: the environment
   * variable the graph names in `frontend.apiKeyEnv` (which must then be set), else none.
   */
  apiKey?: string;
  /**
   * etcd as the control plane (`tandem serve --control etcd://HOST:2379`): each worker process registers itself
   * there under its own lease and watches it for its peers, in `namespace` (one launcher per namespace). Default:
   * the embedded control plane in this process, which the workers reach over their IPC channel.
   */
  control?: EtcdControlPlaneOptions;
  /** The planner's tuning beyond the graph's section (tests make it react fast). */
  planner?: {
    correction?: PlannerRuntimeOptions['correction'];
    /** Bound on a worker's drain before the local connector stops it anyway or gives a move up. */
    drainTimeoutMs?: number;
  };
}

/** Loopback: reachable from this machine only. */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h === '::1' || (isIPv4(h) && h.startsWith('127.'));
}

/** The API key of a deployment: given, or read from the environment variable its graph names. */
export function apiKeyOf(graph: DeploymentGraph, options: Pick<DeploymentOptions, 'apiKey'>): string | undefined {
  if (options.apiKey !== undefined) {
    if (options.apiKey === '') throw new BadArgumentError('the API key must not be empty');
    return options.apiKey;
  }
  const name = graph.frontend.apiKeyEnv;
  if (name === undefined) return undefined;
  const key = process.env[name];
  // Fail closed: a graph that asks for a key never serves without one.
  if (!key) throw new BadArgumentError(`frontend.apiKeyEnv names ${name}, which is not set (or is empty)`);
  return key;
}

export interface Deployment {
  readonly graph: DeploymentGraph;
  /** The first frontend (frontends[0]). */
  readonly frontend: RunningFrontend;
  /** Every frontend, in the order of the graph's ports. */
  readonly frontends: readonly RunningFrontend[];
  readonly controlPlane: ControlPlane;
  /**
   * The request plane behind the first frontend (its router, behind request migration): requests reach the
   * workers through it unchecked.
   */
  readonly backend: GenerationBackend;
  /** The request plane behind each frontend, in the order of `frontends`. */
  readonly backends: readonly GenerationBackend[];
  /** Whether /v1/* asks for an API key. */
  readonly apiKeyRequired: boolean;
  /** Worker process ids by worker name (the current process of each). */
  pids(): Record<string, number>;
  /** Kills a worker process (tests of supervision and failover). */
  kill(name: string, signal?: NodeJS.Signals): void;
  /** Resolves when worker `name` has registered (again). */
  waitReady(name: string, timeoutMs?: number): Promise<void>;
  /** The planner at work (graph `planner.mode` load or sla); undefined when it is off. */
  readonly planner?: PlannerRuntime;
  /** The launcher's workers as the planner's local connector drives them (start, drain, stop, switch role). */
  readonly localWorkers: LocalWorkers;
  stop(options?: { drainMs?: number }): Promise<void>;
}

const here = dirname(fileURLToPath(import.meta.url));

/** The worker entry: the built JS next to this file, or the TypeScript source under tsx. */
function workerEntry(): { file: string; execArgv: string[] } {
  const js = join(here, '../worker/worker-main.js');
  if (existsSync(js)) return { file: js, execArgv: [] };
  return { file: join(here, '../worker/worker-main.ts'), execArgv: ['--import', 'tsx'] };
}

class WorkerProcess {
  child?: ChildProcess;
  /** A drain waits for the worker's `drained` (planner hooks). */
  onDrained?: () => void;
  /** Restarts since the worker was last healthy (they set the backoff). */
  restarts = 0;
  stopping = false;
  ready = false;
  /** When the current process registered (the launcher's clock). */
  readyAt?: number;
  /** Why the current process failed to start (its `fatal` message), if it did. */
  startError?: WorkerStartError;
  private readyWaiters: { resolve: () => void; reject: (error: Error) => void }[] = [];

  constructor(
    readonly name: string,
    /** The pool it serves in: changes when the planner switches its role. */
    public pool: string,
    readonly init: WorkerInit,
    private readonly onMessage: (m: FromWorker) => void,
    private readonly onExit: (code: number | null, signal: NodeJS.Signals | null) => void,
    private readonly log: (line: string) => void,
  ) {}

  start(): void {
    const { file, execArgv } = workerEntry();
    const child = fork(file, [], {
      execArgv,
      serialization: 'advanced',
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      env: { ...process.env, TANDEM_WORKER_NAME: this.name },
    });
    this.child = child;
    this.ready = false;
    this.readyAt = undefined;
    this.startError = undefined;
    for (const stream of [child.stdout!, child.stderr!]) {
      createInterface({ input: stream }).on('line', (line) => this.log(`[${this.name}] ${line}`));
    }
    child.on('message', (m: FromWorker) => {
      if (m.type === 'ready') {
        this.ready = true;
        for (const w of this.readyWaiters.splice(0)) w.resolve();
      } else if (m.type === 'fatal') {
        this.failStart(new WorkerStartError(this.name, m.message, m.code));
      } else if (m.type === 'drained') {
        this.onDrained?.();
        return;
      }
      this.onMessage(m);
    });
    // A write to a worker whose IPC channel is closing (it is exiting: shutdown, crash) fails with EPIPE
    // after send() returned; the exit handler deals with the worker, the launcher must not die of it.
    child.on('error', (error) => this.log(`[${this.name}] ${error.message}`));
    child.on('exit', (code, signal) => {
      this.ready = false;
      if (this.child === child) this.child = undefined;
      this.onExit(code, signal);
    });
    child.send({ type: 'init', init: this.init } satisfies ToWorker);
  }

  send(message: ToWorker): boolean {
    if (!this.child?.connected) return false;
    try {
      // With a callback, a failed write is reported to it rather than as the child's 'error' event.
      return this.child.send(message, (error) => {
        if (error && !this.stopping) this.log(`[${this.name}] message ${message.type} not delivered: ${error.message}`);
      });
    } catch {
      return false;
    }
  }

  /** The current process will not register: those waiting for it hear why (the first reason given stays). */
  failStart(error: WorkerStartError): void {
    this.startError ??= error;
    for (const w of this.readyWaiters.splice(0)) w.reject(this.startError);
  }

  /** Resolves when the worker has registered; rejects when it fails to start or after `timeoutMs`. */
  waitReady(timeoutMs: number): Promise<void> {
    if (this.ready) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (error: Error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      const timer = setTimeout(() => {
        this.readyWaiters = this.readyWaiters.filter((w) => w !== waiter);
        reject(new TimeoutError(`worker ${this.name} did not start within ${timeoutMs} ms`));
      }, timeoutMs);
      this.readyWaiters.push(waiter);
    });
  }

  async stop(timeoutMs = 10_000): Promise<void> {
    this.stopping = true;
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    if (!this.send({ type: 'shutdown' })) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    await exited;
    clearTimeout(timer);
  }
}

function workerInits(graph: DeploymentGraph, options: DeploymentOptions): WorkerInit[] {
  return graph.pools.flatMap((pool) =>
    Array.from({ length: pool.replicas }, (_, r) => workerInit(graph, pool, r, options)),
  );
}

/** Replica `r` of `pool`. A replica past the pool's gpuIds (one the planner added) takes GPU 0. */
export function workerInit(graph: DeploymentGraph, pool: PoolSpec, r: number, options: DeploymentOptions): WorkerInit {
  return {
    name: `${pool.name}-${r}`,
    pool: pool.name,
    role: pool.role,
    model: graph.model,
    device: pool.device === 'cuda' ? 'cuda' : 'cpu',
    ...(pool.device === 'cuda' ? { gpu: pool.gpuIds?.[r * pool.gpusPerReplica] ?? 0 } : {}),
    // A replica of several GPUs: one per rank (the worker's engine says when it cannot run them).
    ...(pool.device === 'cuda' && pool.gpusPerReplica > 1
      ? { gpus: Array.from({ length: pool.gpusPerReplica }, (_, i) => pool.gpuIds?.[r * pool.gpusPerReplica + i] ?? i) }
      : {}),
    ...(pool.engine.kvCacheFraction !== undefined ? { kvCacheFraction: pool.engine.kvCacheFraction } : {}),
    seed: options.seed ?? 0,
    blockSize: pool.engine.blockSize,
    ...(pool.engine.numBlocks !== undefined ? { numBlocks: pool.engine.numBlocks } : {}),
    ...(pool.engine.threads !== undefined ? { threads: pool.engine.threads } : {}),
    ...(pool.tensorParallelSize > 1 ? { tensorParallelSize: pool.tensorParallelSize } : {}),
    ...(pool.pipelineParallelSize > 1 ? { pipelineParallelSize: pool.pipelineParallelSize } : {}),
    ...(pool.expertParallelSize > 1 ? { expertParallelSize: pool.expertParallelSize } : {}),
    ...(pool.eplb !== undefined ? { eplb: { ...pool.eplb } } : {}),
    ...(pool.engine.maxBatchTokens !== undefined ? { maxBatchTokens: pool.engine.maxBatchTokens } : {}),
    ...(pool.engine.maxSequences !== undefined ? { maxSequences: pool.engine.maxSequences } : {}),
    heartbeatMs: options.heartbeatMs ?? 1000,
    ...(options.remotePrefillTimeoutMs !== undefined ? { remotePrefillTimeoutMs: options.remotePrefillTimeoutMs } : {}),
    ...(options.workerDrainTimeoutMs !== undefined ? { drainTimeoutMs: options.workerDrainTimeoutMs } : {}),
    ...(options.control ? { control: options.control } : {}),
  };
}

/** A request's id on the request plane: the frontend that owns it, then its id there. */
export function requestPlaneId(frontend: number, requestId: string): string {
  return `f${frontend}/${requestId}`;
}

/** The frontend and frontend-side id of a request-plane id; undefined for an id requestPlaneId did not make. */
export function parseRequestPlaneId(id: string): { frontend: number; requestId: string } | undefined {
  const m = /^f(\d+)\/(.*)$/s.exec(id);
  return m ? { frontend: Number(m[1]), requestId: m[2]! } : undefined;
}

/**
 * A worker's message to the routers: one about a request goes to the router that owns it (its request-plane id
 * names the frontend), with the id that router knows; one about no request (worker-wide: load, events) to every
 * router. A request id no router owns is logged and dropped.
 */
export function deliverToRouters(
  routers: readonly Pick<Router, 'onMessage'>[],
  from: string,
  m: FromWorker,
  log: (line: string) => void,
): void {
  if (!('requestId' in m)) {
    for (const router of routers) router.onMessage(from, m);
    return;
  }
  const owner = parseRequestPlaneId(m.requestId);
  const router = owner && routers[owner.frontend];
  if (router) router.onMessage(from, { ...m, requestId: owner.requestId });
  else log(`[launcher] ${from} sent ${m.type} about unknown request ${m.requestId}: dropped`);
}

/** Why a worker process ended, as the restart counter's `reason` label. */
function exitReason(everReady: boolean, code: number | null, signal: NodeJS.Signals | null): string {
  if (!everReady) return 'start_failure';
  return signal ?? `exit_${code}`;
}

/**
 * Reads the model's config and tokenizer, opens the frontend, then starts every worker of `graph` and waits
 * for them to register. Whatever fails stops what was started and rejects with that error.
 */
export async function startDeployment(graph: DeploymentGraph, options: DeploymentOptions = {}): Promise<Deployment> {
  const log = options.log ?? ((line: string) => console.log(line));
  const now = options.now ?? Date.now;
  const healthyMs = options.restartBackoffResetMs ?? RESTART_BACKOFF_RESET_MS;
  const heartbeatMs = options.heartbeatMs ?? 1000;
  // The model first: a wrong path or a broken config is reported before any process starts.
  const config = isDummyModel(graph.model) ? dummyConfig(graph.model) : loadModelConfig(graph.model);
  const tokenizer = modelTokenizer(graph.model, config);
  const apiKey = apiKeyOf(graph, options);
  // The planner's profile before any process starts, like the model (planner hooks): a bad one is a ProfileError.
  const plannerProfile = graph.planner.profile !== undefined ? loadProfile(graph.planner.profile) : undefined;
  if (apiKey === undefined && !isLoopbackHost(graph.frontend.host))
    log(
      `[launcher] WARNING: the API on ${graph.frontend.host} is reachable from other machines and has no ` +
        'authentication: anyone who reaches it can use it. Set an API key (--api-key, TANDEM_API_KEY, or ' +
        'frontend.apiKeyEnv in the graph).',
    );

  const controlPlane: ControlPlane = options.control
    ? await EtcdControlPlane.connect(options.control)
    : new EmbeddedControlPlane(
        Math.max(5 * heartbeatMs, 3000),
        Math.max(5 * heartbeatMs, 3000, options.workerTimeoutMs ?? DEFAULT_WORKER_TIMEOUT_MS),
      );
  // The embedded plane is served to the worker processes over IPC; on etcd they reach etcd themselves.
  const relay = options.control ? undefined : new ControlPlaneRelay(controlPlane, log);
  const metrics = new ServeMetrics();
  const workers = new Map<string, WorkerProcess>();
  const send = (name: string, m: ToWorker) => workers.get(name)?.send(m) ?? false;
  const ports = frontendPorts(graph.frontend);
  // ---- planner hooks: a worker being drained is hidden from the routers (they send it nothing new) ----
  const draining = new Set<string>();
  const routable = routingView(controlPlane, draining, (name) => workers.has(name));
  let planner: PlannerRuntime | undefined;
  // ---- end planner hooks ----
  // One router per frontend; what it sends about a request carries its frontend (requestPlaneId). They share one
  // load estimate, so requests in flight through one frontend weigh on the others' choices (best-effort).
  const load = new LoadEstimate();
  const routers = ports.map(
    (_, i) =>
      new Router(
        routable,
        (name, m) => send(name, 'requestId' in m ? { ...m, requestId: requestPlaneId(i, m.requestId) } : m),
        graph.mode,
        metrics,
        {
          routing: graph.router,
          thresholds: graph.disaggregation,
          load,
          log: (line) => log(`[router${ports.length > 1 ? ` ${i}` : ''}] ${line}`),
        },
      ),
  );
  const backends = routers.map(
    (router, i) =>
      new MigratingBackend(router, {
        limit: graph.frontend.migrationLimit,
        metrics,
        log: (line) => log(`[${frontendName(i, ports.length)}] ${line}`),
      }),
  );
  /** Set once every worker has registered: from then on a crashed worker is restarted. */
  let started = false;
  let stopping = false;

  // The ports before the workers: a busy port is found before any weights load (it answers 503 until then).
  const frontends: RunningFrontend[] = [];
  for (const [i, port] of ports.entries()) {
    try {
      frontends.push(
        await startFrontend({
          backend: backends[i]!,
          tokenizer,
          modelName: graph.model,
          contextLength: config.maxPositionEmbeddings,
          vocabSize: config.vocabSize,
          host: graph.frontend.host,
          port,
          ...(apiKey !== undefined ? { apiKey } : {}),
          metrics,
          plannerStatus: () =>
            planner?.status() ?? plannerOff(routable, (name) => layoutOfInit(workers.get(name)?.init)),
          log: (line) => log(`[${frontendName(i, ports.length)}] ${line}`),
        }),
      );
    } catch (error) {
      await Promise.all(frontends.map((f) => f.close({ drainMs: 0 })));
      controlPlane.close();
      throw listenError(error, graph.frontend.host, port);
    }
  }
  const frontend = frontends[0]!;
  const closeFrontends = (drainMs: number) => Promise.all(frontends.map((f) => f.close({ drainMs })));

  // Workers learn their peers from the control plane themselves: nothing is relayed from here.
  controlPlane.on('added', (w) => {
    const reg = w.registration;
    // In etcd, a worker of another process (a joined worker) is not this launcher's.
    const wp = workers.get(reg.name);
    if (!wp) return;
    log(`[launcher] ${reg.name} registered (${reg.role}, ${reg.device}, ${reg.numBlocks} KV blocks, pid ${reg.pid})`);
    metrics.workerKvBlocks(reg.name, wp.pool, reg.numBlocks - w.load.freeBlocks, reg.numBlocks);
  });
  controlPlane.on('suspect', (name, suspect, reason) => {
    if (workers.has(name) && !stopping)
      log(`[launcher] ${name} ${suspect ? `is suspect (${reason}): routers prefer other workers` : 'answers again'}`);
  });
  controlPlane.on('removed', (name, reason) => {
    if (!workers.has(name)) return;
    if (!stopping) log(`[launcher] ${name} dropped: ${reason}`);
    metrics.dropWorker(name);
  });

  const addWorker = (init: WorkerInit): WorkerProcess => {
    const wp: WorkerProcess = new WorkerProcess(
      init.name,
      init.pool,
      init,
      (m) => {
        if (m.type === 'control') {
          relay?.handle(init.name, m.request, (event) => wp.send({ type: 'control', event }));
          return;
        }
        // Registered through its control plane (the relay above, or etcd) before it says so.
        if (m.type === 'ready') {
          wp.readyAt = now();
          draining.delete(init.name); // a role switch ends its drain (planner hooks)
        } else if (m.type === 'heartbeat') {
          if (m.load.draining && !controlPlane.get(m.name)?.load.draining && !stopping)
            log(`[launcher] ${m.name} is draining (told to stop): routers send it nothing new`);
          controlPlane.heartbeat(m.name, m.load);
          if (m.expertLoad) metrics.expertLoad(m.name, m.expertLoad);
          const live = controlPlane.get(m.name);
          if (live) {
            const total = live.registration.numBlocks;
            metrics.workerKvBlocks(m.name, wp.pool, total - m.load.freeBlocks, total);
          }
        } else if (m.type === 'fatal') log(`[launcher] ${init.name} failed to start: ${m.message}`);
        else deliverToRouters(routers, init.name, m, log);
      },
      (code, signal) => {
        const everReady = wp.readyAt !== undefined;
        relay?.drop(init.name);
        void controlPlane.remove(init.name, `process exited (${signal ?? `code ${code}`})`);
        const how = signal ?? `code ${code}`;
        // Exited during the start before it registered: the start waits for it no longer (also while stopping:
        // a start that failed on another worker stops this one, and its wait's timer must not hold the process).
        if (!started && !everReady)
          wp.failStart(new WorkerStartError(init.name, `its process exited (${how}) before it registered`));
        if (stopping || wp.stopping) return;
        if (!started) return; // starting: no restarts; the start fails with this worker's error
        log(`[launcher] ${init.name} exited unexpectedly (${how})`);
        if (options.restart === false) return;
        metrics.workerRestart(wp.pool, exitReason(everReady, code, signal));
        // Healthy for long enough before this crash: the backoff starts over.
        if (everReady && now() - wp.readyAt! >= healthyMs && wp.restarts > 0) {
          log(
            `[launcher] ${init.name} had been up ${Math.round((now() - wp.readyAt!) / 1000)} s: restart backoff reset`,
          );
          wp.restarts = 0;
        }
        const delay = restartDelayMs(wp.restarts);
        wp.restarts++;
        log(`[launcher] restarting ${init.name} in ${delay} ms (restart ${wp.restarts})`);
        setTimeout(() => {
          if (!stopping) wp.start();
        }, delay).unref();
      },
      log,
    );
    workers.set(init.name, wp);
    return wp;
  };
  for (const init of workerInits(graph, options)) addWorker(init);

  const stopWorkers = () => Promise.all([...workers.values()].map((w) => w.stop()));
  try {
    log(
      `[launcher] listening on ${frontends.map((f) => f.url).join(', ')}; starting ${workers.size} ` +
        `worker${workers.size === 1 ? '' : 's'} for ${graph.model} ...`,
    );
    for (const w of workers.values()) w.start();
    const startTimeout = options.startTimeoutMs ?? DEFAULT_WORKER_START_TIMEOUT_MS;
    await Promise.all([...workers.values()].map((w) => w.waitReady(startTimeout)));
    // In etcd, a registration is in place once the watch shows it: the routers see every worker from here on.
    await waitFor(
      () => [...workers.keys()].every((name) => controlPlane.get(name) !== undefined),
      startTimeout,
      'the workers did not show in the control plane',
    );
    started = true;
  } catch (error) {
    stopping = true;
    await Promise.all([closeFrontends(0), stopWorkers()]);
    controlPlane.close();
    throw error;
  }

  // ---- planner hooks: the launcher's workers as the local connector drives them, and the planner itself ----
  const poolOf = (role: Pool) => graph.pools.find((p) => p.role === role);
  const nextReplica = new Map(graph.pools.map((p) => [p.name, p.replicas]));
  const graphLayout = (pool: PoolSpec): Parallelism => ({
    tp: pool.tensorParallelSize,
    pp: pool.pipelineParallelSize,
    ep: pool.expertParallelSize,
  });
  const localWorkers: LocalWorkers = {
    layout: (name) => layoutOfInit(workers.get(name)?.init),
    serving: (role) =>
      controlPlane
        .workers(role)
        .map((w) => w.registration.name)
        .filter((n) => !draining.has(n) && workers.get(n)?.stopping === false),
    load: (name) => {
      const l = controlPlane.get(name)?.load;
      return l ? l.running + l.waiting + l.prefilling : 0;
    },
    start: async (role, layout) => {
      const pool = poolOf(role);
      if (!pool) throw new BadArgumentError(`the graph has no ${role} pool`);
      if (stopping) throw new BadArgumentError('the deployment is stopping');
      const asGraph = graphLayout(pool);
      const parallel = layout ?? asGraph;
      // Another layout than the graph's (a re-shape): CPU pools only, where the ranks are threads of the worker.
      if (layoutName(parallel) !== layoutName(asGraph)) {
        if (pool.device === 'cuda')
          throw new ReshapeUnsupportedError(
            `pool ${pool.name} runs on GPUs: the local connector re-shapes CPU pools only (a ${layoutName(parallel)} ` +
              `replica's GPUs are held by the replicas it replaces until they stop)`,
          );
        checkParallelConfig(config, parallel, `pool ${pool.name}`);
      }
      const r = nextReplica.get(pool.name)!;
      nextReplica.set(pool.name, r + 1);
      const wp = addWorker(
        workerInit(
          graph,
          {
            ...pool,
            tensorParallelSize: parallel.tp,
            pipelineParallelSize: parallel.pp,
            expertParallelSize: parallel.ep,
          },
          r,
          options,
        ),
      );
      log(`[launcher] planner: starting ${wp.name} (${role}, ${layoutName(parallel)})`);
      wp.start();
      try {
        await wp.waitReady(options.startTimeoutMs ?? DEFAULT_WORKER_START_TIMEOUT_MS);
      } catch (error) {
        await wp.stop();
        workers.delete(wp.name);
        throw error;
      }
      // The deployment began to stop while this worker started: it stops too.
      if (stopping) await wp.stop();
      return wp.name;
    },
    drain: (name, timeoutMs) => {
      const wp = workers.get(name);
      if (!wp) return Promise.reject(new BadArgumentError(`no worker ${name}`));
      draining.add(name);
      log(`[launcher] planner: draining ${name}`);
      return new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => finish(false), timeoutMs);
        timer.unref(); // a drain never keeps the launcher's process alive
        const finish = (drained: boolean) => {
          clearTimeout(timer);
          wp.onDrained = undefined;
          resolve(drained);
        };
        wp.onDrained = () => finish(true);
        if (!wp.send({ type: 'drain' })) finish(false);
      });
    },
    undrain: (name) => {
      draining.delete(name);
      workers.get(name)?.send({ type: 'undrain' });
    },
    stop: async (name) => {
      const wp = workers.get(name);
      if (!wp) return;
      log(`[launcher] planner: stopping ${name}`);
      await wp.stop();
      controlPlane.remove(name, 'stopped by the planner');
      workers.delete(name);
      draining.delete(name);
    },
    switchRole: async (name, role) => {
      const wp = workers.get(name);
      const pool = poolOf(role);
      if (!wp || !pool) throw new BadArgumentError(`no worker ${name}, or no ${role} pool`);
      log(`[launcher] planner: ${name} switches to ${role} (pool ${pool.name}); its weights and KV pool stay`);
      wp.ready = false;
      // A crash restart brings it back in its new role.
      wp.init.role = role;
      wp.init.pool = pool.name;
      wp.pool = pool.name;
      const registered = wp.waitReady(options.startTimeoutMs ?? DEFAULT_WORKER_START_TIMEOUT_MS);
      if (!wp.send({ type: 'setRole', role })) throw new BadArgumentError(`worker ${name} is not reachable`);
      await registered;
    },
  };
  const plannerSpec = graph.planner;
  if (plannerSpec.mode !== 'off') {
    const roles = ['prefill', 'decode'] as const;
    // Devices of one replica: its ranks (GPUs, or on CPU rank threads), as the profile counts them.
    const slots = (role: Pool) => {
      const pool = poolOf(role);
      return pool ? rankCount(graphLayout(pool)) : 1;
    };
    try {
      planner = new PlannerRuntime({
        mode: plannerSpec.mode,
        ttftMs: plannerSpec.ttftMs!,
        itlMs: plannerSpec.itlMs!,
        intervalS: plannerSpec.intervalS,
        minReplicas: plannerSpec.minReplicas,
        // Default budget: what the graph starts (on CPU, one slot per worker), so the planner moves workers.
        maxGpus: plannerSpec.maxGpus ?? roles.reduce((n, r) => n + (poolOf(r)?.replicas ?? 0) * slots(r), 0),
        gpusPerReplica: { prefill: slots('prefill'), decode: slots('decode') },
        ...(plannerProfile ? { profile: plannerProfile } : {}),
        ...(plannerSpec.reshape ? { reshape: true } : {}),
        connector:
          plannerSpec.connector === 'kubernetes'
            ? await kubernetesConnector(
                plannerSpec,
                { prefill: poolOf('prefill')!.name, decode: poolOf('decode')!.name },
                { prefill: graphLayout(poolOf('prefill')!), decode: graphLayout(poolOf('decode')!) },
                log,
              )
            : new LocalConnector(localWorkers, {
                ...(options.planner?.drainTimeoutMs !== undefined
                  ? { drainTimeoutMs: options.planner.drainTimeoutMs }
                  : {}),
                log: (line) => log(`[planner] ${line}`),
              }),
        window: () =>
          new MetricsWindow(
            () => metrics.plannerReadings(),
            () =>
              Object.fromEntries(
                controlPlane.workers().map((w) => {
                  const total = w.registration.numBlocks;
                  return [w.registration.name, total > 0 ? (total - w.load.freeBlocks) / total : 0];
                }),
              ),
          ),
        metrics,
        ...(plannerSpec.correctionIntervalS !== undefined
          ? { correctionIntervalS: plannerSpec.correctionIntervalS }
          : {}),
        correction: { ...correctionOptions(plannerSpec), ...options.planner?.correction },
        log: (line) => log(`[planner] ${line}`),
      });
      await planner.start();
    } catch (error) {
      stopping = true;
      await Promise.all([closeFrontends(0), stopWorkers()]);
      controlPlane.close();
      throw error;
    }
  }
  // ---- end planner hooks ----

  return {
    graph,
    frontend,
    frontends,
    controlPlane,
    backend: backends[0]!,
    backends,
    apiKeyRequired: apiKey !== undefined,
    pids: () => Object.fromEntries([...workers].filter(([, w]) => w.child?.pid).map(([n, w]) => [n, w.child!.pid!])),
    kill: (name, signal = 'SIGKILL') => workers.get(name)?.child?.kill(signal),
    ...(planner ? { planner } : {}),
    localWorkers,
    waitReady: (name, timeoutMs = 60_000) => {
      const w = workers.get(name);
      if (!w) return Promise.reject(new Error(`no worker ${name}`));
      return w.waitReady(timeoutMs);
    },
    stop: async ({ drainMs = 10_000 } = {}) => {
      if (stopping) return;
      stopping = true;
      await planner?.stop();
      await closeFrontends(drainMs);
      await stopWorkers();
      relay?.close();
      await controlPlane.close();
    },
  };
}

// ---- planner hooks ----
/**
 * The control plane as the routers see it: workers being drained are left out of `workers()` (no new request
 * reaches them), nor those draining on their own (SIGTERM), and suspect ones while others of the role answer
 * (routingChoices); everything else (get,
 * events) is the control plane's own, so a request already routed to a draining worker (its remote prefill
 * included) completes.
 */
function routingView(
  controlPlane: ControlPlane,
  draining: ReadonlySet<string>,
  /** Whether a worker is this launcher's (in etcd, others may be registered too: the routers cannot reach them). */
  isOwn: (name: string) => boolean = () => true,
): ControlPlane {
  return new Proxy(controlPlane, {
    get(target, key) {
      if (key === 'workers')
        return (role?: Parameters<ControlPlane['workers']>[0]) =>
          routingChoices(
            target.workers(role).filter((w) => !draining.has(w.registration.name) && isOwn(w.registration.name)),
          );
      const value: unknown = Reflect.get(target, key, target);
      return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
    },
  });
}

/** The kubernetes connector, imported only when a graph asks for it (it loads @kubernetes/client-node). */
async function kubernetesConnector(
  spec: PlannerSpec,
  poolNames: Record<Pool, string>,
  layouts: Record<Pool, Parallelism>,
  log: (line: string) => void,
): Promise<PlannerConnector> {
  const k8s = await import('../planner/connectors/kubernetes.js');
  return k8s.KubernetesConnector.connect({
    ...k8s.kubernetesConnectorOptions(spec.kubernetes!, poolNames, layouts),
    log: (line) => log(`[planner] ${line}`),
  });
}

/** /planner when the graph's planner is off: the pools as they are, with each worker's layout. */
function plannerOff(routable: ControlPlane, layoutOf: (name: string) => Parallelism): PlannerStatus {
  const pool = (role: Pool) =>
    poolLayout(routable.workers(role).map((w) => replicaLayout(w.registration.name, layoutOf(w.registration.name))));
  return {
    mode: 'off',
    replicas: { current: { prefill: routable.workers('prefill').length, decode: routable.workers('decode').length } },
    layouts: { current: { prefill: pool('prefill'), decode: pool('decode') } },
  };
}

/** The layout a worker runs (its init's sizes; 1 where absent). */
function layoutOfInit(init: WorkerInit | undefined): Parallelism {
  return {
    tp: init?.tensorParallelSize ?? 1,
    pp: init?.pipelineParallelSize ?? 1,
    ep: init?.expertParallelSize ?? 1,
  };
}
// ---- end planner hooks ----

/** Resolves once `ready()` holds (polled); rejects with a TimeoutError after `timeoutMs`. */
async function waitFor(ready: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ready()) {
    if (Date.now() > deadline) throw new TimeoutError(`${what} within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** How a frontend's log lines are prefixed: `frontend`, or `frontend-<i>` when there are several. */
function frontendName(index: number, count: number): string {
  return count === 1 ? 'frontend' : `frontend-${index}`;
}

/** A failure to listen, as one line naming the address (EADDRINUSE, EACCES); other errors as they are. */
function listenError(error: unknown, host: string, port: number): unknown {
  const code = (error as NodeJS.ErrnoException)?.code;
  const where = `${host.includes(':') ? `[${host}]` : host}:${port}`;
  if (code === 'EADDRINUSE')
    return new ListenError(
      `cannot listen on ${where}: the port is in use (stop what holds it, or pick another with --port)`,
    );
  if (code === 'EACCES')
    return new ListenError(`cannot listen on ${where}: permission denied (ports below 1024 need privileges)`);
  if (code === 'EADDRNOTAVAIL') return new ListenError(`cannot listen on ${where}: no such address on this machine`);
  return error;
}

/** The start-up banner: the graph and where to reach it. */
export function banner(d: Deployment): string {
  const g = d.graph;
  const lines = [
    `Tandem serving ${g.model} (${g.mode === 'disagg' ? 'disaggregated: prefill and decode in separate processes' : 'aggregated'})`,
    ...g.pools.map(
      (p) =>
        `  pool ${p.name}: ${p.role} x${p.replicas} on ${p.device}${p.gpuIds ? ` GPU ${p.gpuIds.join(',')}` : ''} (block size ${p.engine.blockSize})`,
    ),
    `  workers: ${Object.entries(d.pids())
      .map(([n, pid]) => `${n} (pid ${pid})`)
      .join(', ')}; launcher pid ${process.pid} (SIGINT or SIGTERM stops them all)`,
    `  OpenAI API: ${d.frontends.map((f) => `${f.url}/v1`).join(', ')}  (chat/completions, completions, models)` +
      (d.apiKeyRequired ? '; API key required (Authorization: Bearer <key>)' : ''),
    `  health: ${d.frontend.url}/health   metrics: ${d.frontend.url}/metrics` +
      (d.frontends.length > 1 ? ' (each frontend serves both)' : ''),
    `  request migration: up to ${g.frontend.migrationLimit} per request` +
      (g.frontend.migrationLimit === 0 ? ' (off)' : ''),
    // planner hooks
    `  planner: ${g.planner.mode}` +
      (g.planner.mode === 'off'
        ? ' (fixed pools)'
        : ` (TTFT ${g.planner.ttftMs} ms, ITL ${g.planner.itlMs} ms, every ${g.planner.intervalS} s): ${d.frontend.url}/planner`),
    `  try: curl ${d.frontend.url}/v1/chat/completions -H 'Content-Type: application/json'` +
      (d.apiKeyRequired ? ` -H "Authorization: Bearer $KEY"` : '') +
      ` -d '{"model":"${g.model}","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'`,
  ];
  return lines.join('\n');
}
