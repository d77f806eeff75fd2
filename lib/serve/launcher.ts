/**
 * The launcher: starts a deployment graph on this machine. One process per worker (forked, supervised:
 * a crashed worker is reported and restarted), logs prefixed by process, the control plane and the router
 * in this process, and the OpenAI-compatible frontend in front of them. `stop()` drains, then stops
 * everything; no process outlives it.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { dummyConfig, isDummyModel } from '../engine/model/dummy.js';
import { loadModelConfig } from '../engine/model/config.js';
import { modelTokenizer } from '../engine/tokenizer.js';
import { EmbeddedControlPlane, type ControlPlane } from './control-plane.js';
import type { DeploymentGraph, PoolSpec } from './graph.js';
import { startFrontend, type RunningFrontend } from '../frontend/index.js';
import { ServeMetrics } from './metrics.js';
import type { FromWorker, ToWorker, WorkerInit } from './protocol.js';
import { Router } from './router.js';

export interface DeploymentOptions {
  /** Where log lines go (default: stdout). */
  log?: (line: string) => void;
  heartbeatMs?: number;
  /** Seed of `dummy:` weights, the same in every worker. */
  seed?: number;
  /** Restart crashed workers (default true). */
  restart?: boolean;
  /** Worker start-up bound (loading the model included). Default 120 s. */
  startTimeoutMs?: number;
}

export interface Deployment {
  readonly graph: DeploymentGraph;
  readonly frontend: RunningFrontend;
  readonly controlPlane: ControlPlane;
  /** Worker process ids by worker name (the current process of each). */
  pids(): Record<string, number>;
  /** Kills a worker process (tests of supervision and failover). */
  kill(name: string, signal?: NodeJS.Signals): void;
  /** Resolves when worker `name` has registered (again). */
  waitReady(name: string, timeoutMs?: number): Promise<void>;
  stop(options?: { drainMs?: number }): Promise<void>;
}

const here = dirname(fileURLToPath(import.meta.url));

/** The worker entry: the built JS next to this file, or the TypeScript source under tsx. */
function workerEntry(): { file: string; execArgv: string[] } {
  const js = join(here, 'worker-main.js');
  if (existsSync(js)) return { file: js, execArgv: [] };
  return { file: join(here, 'worker-main.ts'), execArgv: ['--import', 'tsx'] };
}

class WorkerProcess {
  child?: ChildProcess;
  restarts = 0;
  stopping = false;
  ready = false;
  private readyWaiters: (() => void)[] = [];

  constructor(
    readonly name: string,
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
    for (const stream of [child.stdout!, child.stderr!]) {
      createInterface({ input: stream }).on('line', (line) => this.log(`[${this.name}] ${line}`));
    }
    child.on('message', (m: FromWorker) => {
      if (m.type === 'ready') {
        this.ready = true;
        for (const w of this.readyWaiters.splice(0)) w();
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

  waitReady(timeoutMs: number): Promise<void> {
    if (this.ready) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name} did not start within ${timeoutMs} ms`)), timeoutMs);
      this.readyWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
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
  const inits: WorkerInit[] = [];
  const device = (p: PoolSpec): WorkerInit['device'] => (p.device === 'cuda' ? 'cuda' : 'cpu');
  for (const pool of graph.pools) {
    for (let r = 0; r < pool.replicas; r++) {
      inits.push({
        name: `${pool.name}-${r}`,
        role: pool.role,
        model: graph.model,
        device: device(pool),
        ...(pool.device === 'cuda' ? { gpu: pool.gpuIds?.[r * pool.gpusPerReplica] ?? 0 } : {}),
        ...(pool.engine.kvCacheFraction !== undefined ? { kvCacheFraction: pool.engine.kvCacheFraction } : {}),
        seed: options.seed ?? 0,
        blockSize: pool.engine.blockSize,
        ...(pool.engine.numBlocks !== undefined ? { numBlocks: pool.engine.numBlocks } : {}),
        ...(pool.engine.threads !== undefined ? { threads: pool.engine.threads } : {}),
        ...(pool.engine.maxBatchTokens !== undefined ? { maxBatchTokens: pool.engine.maxBatchTokens } : {}),
        ...(pool.engine.maxSequences !== undefined ? { maxSequences: pool.engine.maxSequences } : {}),
        thresholds: graph.disaggregation,
        heartbeatMs: options.heartbeatMs ?? 1000,
      });
    }
  }
  return inits;
}

/** Starts every worker of `graph`, waits for them to register, then opens the frontend. */
export async function startDeployment(graph: DeploymentGraph, options: DeploymentOptions = {}): Promise<Deployment> {
  const log = options.log ?? ((line: string) => console.log(line));
  const heartbeatMs = options.heartbeatMs ?? 1000;
  const controlPlane = new EmbeddedControlPlane(Math.max(5 * heartbeatMs, 3000));
  const metrics = new ServeMetrics();
  const workers = new Map<string, WorkerProcess>();
  const send = (name: string, m: ToWorker) => workers.get(name)?.send(m) ?? false;
  const router = new Router(controlPlane, send, graph.mode, metrics);
  let stopping = false;

  controlPlane.on('added', (w) => {
    const reg = w.registration;
    log(`[launcher] ${reg.name} registered (${reg.role}, ${reg.device}, ${reg.numBlocks} KV blocks, pid ${reg.pid})`);
    // Every worker learns every other's transfer agent, so that prefill can write into decode's pool.
    for (const other of controlPlane.workers()) {
      if (other.registration.name === reg.name) continue;
      send(reg.name, { type: 'peer', peer: other.registration });
      send(other.registration.name, { type: 'peer', peer: reg });
    }
  });
  controlPlane.on('removed', (name, reason) => {
    if (!stopping) log(`[launcher] ${name} dropped: ${reason}`);
    for (const other of controlPlane.workers()) send(other.registration.name, { type: 'peerGone', name });
  });

  for (const init of workerInits(graph, options)) {
    const wp: WorkerProcess = new WorkerProcess(
      init.name,
      init,
      (m) => {
        if (m.type === 'ready') controlPlane.register(m.registration);
        else if (m.type === 'heartbeat') controlPlane.heartbeat(m.name, m.load);
        else if (m.type === 'fatal') log(`[launcher] ${init.name} failed to start: ${m.message}`);
        else router.onMessage(init.name, m);
      },
      (code, signal) => {
        controlPlane.remove(init.name, `process exited (${signal ?? `code ${code}`})`);
        if (stopping || wp.stopping) return;
        log(`[launcher] ${init.name} exited unexpectedly (${signal ?? `code ${code}`})`);
        if (options.restart === false) return;
        const delay = Math.min(10_000, 500 * 2 ** Math.min(wp.restarts, 5));
        wp.restarts++;
        log(`[launcher] restarting ${init.name} in ${delay} ms (restart ${wp.restarts})`);
        setTimeout(() => {
          if (!stopping) wp.start();
        }, delay).unref();
      },
      log,
    );
    workers.set(init.name, wp);
  }

  const stopWorkers = () => Promise.all([...workers.values()].map((w) => w.stop()));
  try {
    for (const w of workers.values()) w.start();
    const startTimeout = options.startTimeoutMs ?? 120_000;
    await Promise.all([...workers.values()].map((w) => w.waitReady(startTimeout)));
  } catch (error) {
    stopping = true;
    await stopWorkers();
    controlPlane.close();
    throw error;
  }

  const config = isDummyModel(graph.model) ? dummyConfig(graph.model) : loadModelConfig(graph.model);
  const tokenizer = modelTokenizer(graph.model, config);
  let frontend: RunningFrontend;
  try {
    frontend = await startFrontend({
      backend: router,
      tokenizer,
      modelName: graph.model,
      contextLength: config.maxPositionEmbeddings,
      vocabSize: config.vocabSize,
      host: graph.frontend.host,
      port: graph.frontend.port,
      metrics,
      log: (line) => log(`[frontend] ${line}`),
    });
  } catch (error) {
    stopping = true;
    await stopWorkers();
    controlPlane.close();
    throw error;
  }

  return {
    graph,
    frontend,
    controlPlane,
    pids: () => Object.fromEntries([...workers].filter(([, w]) => w.child?.pid).map(([n, w]) => [n, w.child!.pid!])),
    kill: (name, signal = 'SIGKILL') => workers.get(name)?.child?.kill(signal),
    waitReady: (name, timeoutMs = 60_000) => {
      const w = workers.get(name);
      if (!w) return Promise.reject(new Error(`no worker ${name}`));
      return w.waitReady(timeoutMs);
    },
    stop: async ({ drainMs = 10_000 } = {}) => {
      if (stopping) return;
      stopping = true;
      await frontend.close({ drainMs });
      await stopWorkers();
      controlPlane.close();
    },
  };
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
      .join(', ')}`,
    `  OpenAI API: ${d.frontend.url}/v1  (chat/completions, completions, models)`,
    `  health: ${d.frontend.url}/health   metrics: ${d.frontend.url}/metrics`,
    `  try: curl ${d.frontend.url}/v1/chat/completions -H 'Content-Type: application/json' -d '{"model":"${g.model}","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'`,
  ];
  return lines.join('\n');
}
