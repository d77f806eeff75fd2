/**
 * A joined frontend (`tandem frontend --join etcd://HOST:2379 --graph FILE`): the OpenAI API, its router and
 * request migration, in front of workers it discovers in etcd and reaches over the TCP request plane
 * (lib/worker/request-plane.ts). No launcher: workers join and leave on their own hosts.
 *
 * The router sees `ReachableWorkers`: the control plane's workers that this frontend is connected to. A worker
 * joins the router when its connection is up and leaves it when the connection breaks or its registration
 * goes (lease lapsed): its requests in flight then fail with TANDEM_WORKER_GONE, which request migration
 * re-issues to another worker.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { BadArgumentError } from '../errors.js';
import { EtcdControlPlane, type EtcdControlPlaneOptions } from '../control/index.js';
import {
  routingChoices,
  type ControlPlane,
  type ControlPlaneEvents,
  type LiveWorker,
} from '../control/control-plane.js';
import { dummyConfig, isDummyModel } from '../engine/model/dummy.js';
import { loadModelConfig } from '../engine/model/config.js';
import { modelTokenizer } from '../engine/tokenizer.js';
import { startFrontend, type RunningFrontend } from './index.js';
import { frontendPorts, type DeploymentGraph, type PoolRole } from '../deploy/graph.js';
import { apiKeyOf, isLoopbackHost } from '../deploy/launcher.js';
import { MigratingBackend } from './migration.js';
import { ServeMetrics } from './metrics.js';
import type { ExpertLoadReport, FromWorker, ToWorker, WorkerLoad, WorkerRegistration } from '../worker/protocol.js';
import { WorkerClient, type RequestPlane } from '../worker/request-plane.js';
import { Router } from '../router/router.js';

export interface ReachableWorkersOptions {
  /** This frontend's id on the request plane (its request ids carry it). Default: random. */
  frontend?: string;
  token?: string;
  connectTimeoutMs?: number;
  log?: (line: string) => void;
}

/**
 * The workers of a control plane that this frontend reaches over TCP, as a ControlPlane for the router, and the
 * connections to them: send() a message to a worker; what workers send comes to `onMessage`.
 */
export class ReachableWorkers extends EventEmitter<ControlPlaneEvents> implements ControlPlane, RequestPlane {
  readonly frontend: string;
  private readonly clients = new Map<string, WorkerClient>();
  private readonly up = new Set<string>();
  /** Messages from workers (request ids as the router knows them); set by whoever builds the router. */
  onMessage: (from: string, m: FromWorker) => void = () => {};
  /** A MoE worker's expert load, from its heartbeats (the frontend's /metrics). */
  onExpertLoad: (from: string, report: ExpertLoadReport) => void = () => {};

  constructor(
    private readonly discovery: ControlPlane,
    private readonly options: ReachableWorkersOptions = {},
  ) {
    super();
    this.frontend = options.frontend ?? randomBytes(6).toString('hex');
    discovery.on('added', (w) => this.connect(w.registration));
    discovery.on('removed', (name, reason) => this.disconnect(name, reason));
    for (const w of discovery.workers()) this.connect(w.registration);
  }

  private connect(registration: WorkerRegistration): void {
    const name = registration.name;
    this.disconnect(name, 'registered again');
    const address = registration.requestPlane;
    if (!address) {
      this.options.log?.(`worker ${name} registered no request-plane address: not reachable from this frontend`);
      return;
    }
    const client = new WorkerClient({
      ...address,
      frontend: this.frontend,
      ...(this.options.token !== undefined ? { token: this.options.token } : {}),
      ...(this.options.connectTimeoutMs !== undefined ? { connectTimeoutMs: this.options.connectTimeoutMs } : {}),
      ...(this.options.log ? { log: this.options.log } : {}),
    });
    this.clients.set(name, client);
    client.on('up', () => {
      const w = this.discovery.get(name);
      if (this.clients.get(name) !== client || !w) return;
      this.up.add(name);
      this.emit('added', w);
    });
    client.on('down', (reason) => {
      if (this.clients.get(name) === client && this.up.delete(name))
        this.emit('removed', name, `request plane connection lost (${reason})`);
    });
    client.on('refused', (reason) => this.options.log?.(`worker ${name} refused this frontend: ${reason}`));
    client.on('message', (m) => this.receive(name, m));
  }

  private disconnect(name: string, reason: string): void {
    const client = this.clients.get(name);
    if (!client) return;
    this.clients.delete(name);
    client.close();
    if (this.up.delete(name)) this.emit('removed', name, reason);
  }

  private receive(from: string, m: FromWorker): void {
    if (m.type === 'heartbeat') {
      if (m.expertLoad) this.onExpertLoad(from, m.expertLoad);
      return this.discovery.heartbeat(from, m.load);
    }
    if ('requestId' in m) {
      const prefix = `${this.frontend}/`;
      if (!m.requestId.startsWith(prefix)) return;
      return this.onMessage(from, { ...m, requestId: m.requestId.slice(prefix.length) });
    }
    this.onMessage(from, m);
  }

  /** Sends to a connected worker (request ids get this frontend's prefix); false when it cannot take it now. */
  send(name: string, m: ToWorker): boolean {
    if (!this.up.has(name)) return false;
    const client = this.clients.get(name)!;
    return client.send('requestId' in m ? { ...m, requestId: `${this.frontend}/${m.requestId}` } : m);
  }

  register(): void {
    throw new BadArgumentError('a frontend registers no workers');
  }

  heartbeat(name: string, load: WorkerLoad): void {
    this.discovery.heartbeat(name, load);
  }

  remove(name: string, reason: string): void {
    this.disconnect(name, reason);
  }

  get(name: string): LiveWorker | undefined {
    return this.up.has(name) ? this.discovery.get(name) : undefined;
  }

  /** The workers a router chooses among: connected, not draining, responsive ones first (routingChoices). */
  workers(role?: PoolRole): LiveWorker[] {
    return routingChoices(this.discovery.workers(role).filter((w) => this.up.has(w.registration.name)));
  }

  close(): void {
    for (const name of [...this.clients.keys()]) this.disconnect(name, 'frontend closing');
  }
}

export interface JoinFrontendOptions {
  graph: DeploymentGraph;
  control: string;
  controlOptions?: Omit<EtcdControlPlaneOptions, 'endpoints'>;
  /** Default the graph's frontend.host (127.0.0.1 unless it says otherwise). */
  host?: string;
  /** Default the graph's frontend.port; 0: a free port. */
  port?: number;
  apiKey?: string;
  token?: string;
  log?: (line: string) => void;
}

export interface JoinedFrontend {
  readonly frontend: RunningFrontend;
  readonly workers: ReachableWorkers;
  readonly controlPlane: EtcdControlPlane;
  stop(options?: { drainMs?: number }): Promise<void>;
}

/** Connects to etcd, then serves the OpenAI API over the workers it finds there. */
export async function joinFrontend(options: JoinFrontendOptions): Promise<JoinedFrontend> {
  const { graph } = options;
  const log = options.log ?? ((line: string) => console.log(line));
  const config = isDummyModel(graph.model) ? dummyConfig(graph.model) : loadModelConfig(graph.model);
  const tokenizer = modelTokenizer(graph.model, config);
  // The key: given, else from the variable the graph names (which must then be set), as the launcher does.
  const apiKey = apiKeyOf(graph, options);
  const host = options.host ?? graph.frontend.host;
  if (apiKey === undefined && !isLoopbackHost(host))
    log(
      `[frontend] WARNING: the API on ${host} is reachable from other machines and has no authentication: ` +
        'anyone who reaches it can use it. Set an API key (--api-key, TANDEM_API_KEY, or frontend.apiKeyEnv).',
    );
  const controlPlane = await EtcdControlPlane.connect({ ...options.controlOptions, endpoints: options.control });
  const workers = new ReachableWorkers(controlPlane, {
    ...(options.token !== undefined ? { token: options.token } : {}),
    log: (line) => log(`[frontend] ${line}`),
  });
  const metrics = new ServeMetrics();
  const router = new Router(workers, (name, m) => workers.send(name, m), graph.mode, metrics, {
    routing: graph.router,
    thresholds: graph.disaggregation,
    log: (line) => log(`[router] ${line}`),
  });
  workers.onMessage = (from, m) => router.onMessage(from, m);
  workers.onExpertLoad = (from, report) => metrics.expertLoad(from, report);
  workers.on('removed', (name) => metrics.dropWorker(name));
  workers.on('added', (w) => log(`[frontend] worker ${w.registration.name} (${w.registration.role}) reachable`));
  workers.on('removed', (name, reason) => log(`[frontend] worker ${name} gone: ${reason}`));
  const backend = new MigratingBackend(router, {
    limit: graph.frontend.migrationLimit,
    metrics,
    log: (line) => log(`[frontend] ${line}`),
  });
  let frontend: RunningFrontend;
  try {
    frontend = await startFrontend({
      backend,
      tokenizer,
      modelName: graph.model,
      contextLength: config.maxPositionEmbeddings,
      vocabSize: config.vocabSize,
      host,
      port: options.port ?? frontendPorts(graph.frontend)[0]!,
      ...(apiKey !== undefined ? { apiKey } : {}),
      metrics,
      log: (line) => log(`[frontend] ${line}`),
    });
  } catch (error) {
    workers.close();
    await controlPlane.close();
    throw error;
  }
  return {
    frontend,
    workers,
    controlPlane,
    stop: async ({ drainMs = 10_000 } = {}) => {
      await frontend.close({ drainMs });
      workers.close();
      await controlPlane.close();
    },
  };
}
