/**
 * A joined worker (`tandem worker --join etcd://HOST:2379 --pool NAME --graph FILE`): one worker of one pool,
 * on this host, with no launcher. It registers itself in etcd under its lease (its role, pool, transfer agent
 * and where frontends reach it), serves frontends over the TCP request plane (lib/worker/request-plane.ts), and
 * learns its KV-transfer peers from the control plane's joins and leaves. When its process dies, its lease
 * lapses and it leaves discovery; when etcd comes back empty, the control plane puts it again.
 */
import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import { hostname } from 'node:os';
import { BadArgumentError } from '../errors.js';
import { EtcdControlPlane, type EtcdControlPlaneOptions } from '../control/index.js';
import { AUTH_ENV, isLoopbackHost } from '../transfer/index.js';
import type { DeploymentGraph } from '../deploy/graph.js';
import { workerInit } from '../deploy/launcher.js';
import type { FromWorker, ToWorker, WorkerInit, WorkerRegistration } from './protocol.js';
import {
  RequestPlaneError,
  RequestPlaneServer,
  resolveToken,
  TOKEN_ENV,
  type FrontendConnection,
} from './request-plane.js';
import { openWorker, type Worker } from './worker.js';

export interface JoinWorkerOptions {
  graph: DeploymentGraph;
  /** The pool (graph `pools[].name`) this worker serves in. */
  pool: string;
  /** etcd endpoints (`etcd://HOST:2379`). */
  control: string;
  /** The control plane's namespace and timings (tests shorten the lease). */
  controlOptions?: Omit<EtcdControlPlaneOptions, 'endpoints'>;
  /** The address the request plane (and the status port) binds. Default 127.0.0.1. */
  host?: string;
  /**
   * The address other hosts reach this worker at: registered for the request plane, and where its transfer agent
   * listens (the agent announces the address it listens on). Default `host`, or, when `host` is a wildcard
   * (0.0.0.0, ::), TANDEM_POD_IP (a Kubernetes pod's IP).
   */
  advertise?: string;
  /** Request-plane port; default 0 (a free one). */
  port?: number;
  /** The transfer agent's tcp port; default 0 (a free one). */
  kvPort?: number;
  /** Where /live and /health answer over HTTP (probes); default none. */
  statusPort?: number;
  /** Unique in the namespace; default `<pool>-<hostname>-<pid>`. */
  name?: string;
  seed?: number;
  /** Force the KV transfer backend (tcp between "hosts" that share one machine). */
  kvBackend?: WorkerInit['kvBackend'];
  heartbeatMs?: number;
  /** How long `drain()` (SIGTERM) lets requests in flight finish; default DEFAULT_DRAIN_TIMEOUT_MS (30 s). */
  drainTimeoutMs?: number;
  /** The shared token (request plane, and transfer agent unless TANDEM_TRANSFER_SECRET is set); default TANDEM_TOKEN. */
  token?: string;
  log?: (line: string) => void;
}

export interface JoinedWorker {
  readonly name: string;
  /** The status port (/live, /health), when one was asked for. */
  readonly statusPort?: number;
  readonly registration: () => WorkerRegistration;
  readonly controlPlane: EtcdControlPlane;
  /** Requests in flight here. */
  inFlight(): number;
  /**
   * What SIGTERM does before `stop()`: the worker reports `draining` (frontends choose it no more; /health answers
   * 503), and resolves once nothing is in flight (true) or after the drain timeout (false). Requests still running
   * when `stop()` follows migrate: the frontends see the connection close and re-issue them elsewhere.
   */
  drain(timeoutMs?: number): Promise<boolean>;
  /** Leaves discovery (revokes the lease), closes the request plane, frees the engine. */
  stop(): Promise<void>;
}

/** A worker name from a host name: lower-case letters, digits and '-'. */
function nameOf(pool: string): string {
  const host = hostname()
    .toLowerCase()
    .replace(/[^a-z0-9-]+/g, '-');
  return `${pool}-${host}-${process.pid}`;
}

/**
 * The worker's probes over HTTP: /live answers 200 while the process serves; /health 200 while it is registered
 * in the control plane and takes requests (503 otherwise: etcd lost it and it is putting itself back, or it drains).
 */
async function listenStatus(
  host: string,
  port: number,
  registered: () => boolean,
  draining: () => boolean,
): Promise<HttpServer> {
  const server = createHttpServer((req, res) => {
    const path = (req.url ?? '').split('?')[0];
    const [code, body] =
      req.method !== 'GET'
        ? [405, { error: 'method not allowed' }]
        : path === '/live'
          ? [200, { status: 'alive' }]
          : path === '/health'
            ? draining()
              ? [503, { status: 'draining' }]
              : registered()
                ? [200, { status: 'ok' }]
                : [503, { status: 'not_registered' }]
            : [404, { error: 'not found' }];
    res.writeHead(code, { 'Content-Type': 'application/json' }).end(JSON.stringify(body));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  return server;
}

/** Starts the worker and registers it. Throws BadArgumentError, ControlPlaneUnavailableError, the engine's errors. */
export async function joinWorker(options: JoinWorkerOptions): Promise<JoinedWorker> {
  const log = options.log ?? ((line: string) => console.log(line));
  const pool = options.graph.pools.find((p) => p.name === options.pool);
  if (!pool)
    throw new BadArgumentError(
      `the graph has no pool '${options.pool}' (it has ${options.graph.pools.map((p) => p.name).join(', ')})`,
    );
  const host = options.host ?? '127.0.0.1';
  const wildcard = host === '0.0.0.0' || host === '::' || host === '[::]';
  const advertise = options.advertise ?? (wildcard ? process.env.TANDEM_POD_IP || undefined : host);
  if (advertise === undefined)
    throw new BadArgumentError(
      `--host ${host} listens on every address: say where other hosts reach this worker (--advertise ADDR)`,
    );
  const token = resolveToken(options.token);
  // The transfer agent listens where peers reach it; beyond loopback it needs the token as its secret (below).
  if (token === undefined && !isLoopbackHost(advertise))
    throw new BadArgumentError(
      `refusing to serve on ${advertise} without a token: set ${TOKEN_ENV} on every worker and frontend`,
    );
  const init: WorkerInit = {
    ...workerInit(options.graph, pool, 0, {
      seed: options.seed ?? 0,
      ...(options.heartbeatMs !== undefined ? { heartbeatMs: options.heartbeatMs } : {}),
      ...(options.drainTimeoutMs !== undefined ? { workerDrainTimeoutMs: options.drainTimeoutMs } : {}),
    }),
    name: options.name ?? nameOf(pool.name),
    ...(options.kvBackend ? { kvBackend: options.kvBackend } : {}),
  };
  const server = await RequestPlaneServer.listen({
    host,
    ...(options.port !== undefined ? { port: options.port } : {}),
    ...(token !== undefined ? { token } : {}),
  });
  server.on('refused', (reason) => log(`[${init.name}] request plane: refused a connection: ${reason}`));
  let plane: EtcdControlPlane | undefined;
  let worker: Worker | undefined;
  let status: HttpServer | undefined;
  let draining: Promise<boolean> | undefined;
  try {
    // Before the model loads: a startup probe sees the process live while it does.
    if (options.statusPort !== undefined)
      status = await listenStatus(
        host,
        options.statusPort,
        () => plane?.get(init.name) !== undefined,
        () => draining !== undefined,
      );
    plane = await EtcdControlPlane.connect({ ...options.controlOptions, endpoints: options.control });
    const controlPlane = plane;
    /**
     * Messages about a request go to the frontend that sent it (request plane); worker-wide ones to every frontend
     * (event plane). What a launcher would hear of the process (ready, drained, fatal) has no one to hear it here.
     */
    const out = (m: FromWorker): void => {
      if (m.type === 'ready' || m.type === 'control' || m.type === 'drained' || m.type === 'fatal') return;
      if (m.type === 'heartbeat') controlPlane.heartbeat(m.name, m.load);
      const frontend = 'requestId' in m ? m.requestId.slice(0, m.requestId.indexOf('/')) : undefined;
      // A frontend that reads too slowly loses its connection rather than messages (FramedSocket's closeWhenFull).
      for (const c of server.frontends()) if (frontend === undefined || c.frontend === frontend) c.send(m);
    };
    // The transfer agent listens on the advertised address; the shared token is its secret unless one is set for it.
    const secret = process.env[AUTH_ENV.secret] || process.env[AUTH_ENV.secretFile] ? undefined : token;
    worker = await openWorker(init, out, controlPlane, {
      tcpHost: advertise,
      ...(options.kvPort !== undefined ? { tcpPort: options.kvPort } : {}),
      ...(secret !== undefined ? { secret } : {}),
    });
    const w = worker;
    w.registrationExtras = { pool: pool.name, requestPlane: { host: advertise, port: server.port } };

    server.on('connection', (c: FrontendConnection) => {
      c.on('message', (m) => {
        // A frame is any structured-clone value: what is not a frontend's message (peers come from the control
        // plane; init, shutdown, drain and role changes are this host's) closes the connection, the worker unharmed.
        if (!isFrontendMessage(m)) {
          c.close(new RequestPlaneError('TANDEM_REQUEST_PLANE_PROTOCOL', 'not a frontend message'));
          return;
        }
        if ('requestId' in m && !m.requestId.startsWith(`${c.frontend}/`)) return;
        w.handle(m);
      });
      // A frontend's connection gone: its requests here are aborted. Its router has failed them on the break (and
      // request migration re-issued them under new ids), so nothing would read their tokens.
      c.on('close', () => w.abortAll(`${c.frontend}/`));
      w.sendKvSnapshot((m) => c.send(m));
    });

    await w.register();
    log(
      `[${init.name}] registered in etcd (${options.control}) as ${w.currentRole} of pool ${pool.name}; ` +
        `request plane on ${host}:${server.port}, reached at ${advertise}` +
        `${token !== undefined ? ' (token required)' : ''}` +
        (status ? `; /live and /health on ${host}:${(status.address() as { port: number }).port}` : ''),
    );
  } catch (error) {
    status?.close();
    await plane?.close();
    await server.close();
    await worker?.dispose();
    throw error;
  }
  const controlPlane = plane;
  const w = worker;
  let stopped: Promise<void> | undefined;
  return {
    name: init.name,
    ...(status ? { statusPort: (status.address() as { port: number }).port } : {}),
    registration: () => w.registration(),
    controlPlane,
    inFlight: () => w.inFlight,
    drain: (timeoutMs) => (draining ??= w.drainForExit(timeoutMs)),
    stop: () =>
      (stopped ??= (async () => {
        status?.close();
        await controlPlane.close();
        await server.close();
        await w.dispose();
      })()),
  };
}

/** What a frontend sends a worker over the request plane (its router's messages). */
const FRONTEND_MESSAGES = new Set(['generate', 'prefill', 'prefillFailed', 'abort', 'kvSnapshotRequest']);

/** A frontend's message by its shape: an object of a frontend type, its request id (when it has one) a string. */
function isFrontendMessage(m: unknown): m is ToWorker {
  if (typeof m !== 'object' || m === null) return false;
  const { type, requestId } = m as { type?: unknown; requestId?: unknown };
  if (typeof type !== 'string' || !FRONTEND_MESSAGES.has(type)) return false;
  return type === 'kvSnapshotRequest' || typeof requestId === 'string';
}
