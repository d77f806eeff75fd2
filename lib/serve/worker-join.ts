/**
 * A joined worker (`tandem worker --join etcd://HOST:2379 --pool NAME --graph FILE`): one worker of one pool,
 * on this host, with no launcher. It registers itself in etcd under its lease (its role, pool, transfer agent
 * and where frontends reach it), serves frontends over the TCP request plane (lib/serve/request-plane.ts), and
 * learns its KV-transfer peers from the control plane's joins and leaves. When its process dies, its lease
 * lapses and it leaves discovery; when etcd comes back empty, the control plane puts it again.
 */
import { hostname } from 'node:os';
import { BadArgumentError } from '../errors.js';
import { EtcdControlPlane, type EtcdControlPlaneOptions } from '../control/index.js';
import { AUTH_ENV } from '../transfer/index.js';
import type { DeploymentGraph } from './graph.js';
import { workerInit } from './launcher.js';
import type { FromWorker, WorkerInit, WorkerRegistration } from './protocol.js';
import { RequestPlaneServer, resolveToken, type FrontendConnection } from './request-plane.js';
import { openWorker, type Worker } from './worker.js';

export interface JoinWorkerOptions {
  graph: DeploymentGraph;
  /** The pool (graph `pools[].name`) this worker serves in. */
  pool: string;
  /** etcd endpoints (`etcd://HOST:2379`). */
  control: string;
  /** The control plane's namespace and timings (tests shorten the lease). */
  controlOptions?: Omit<EtcdControlPlaneOptions, 'endpoints'>;
  /** The address this worker binds and registers (request plane and transfer agent). Default 127.0.0.1. */
  host?: string;
  /** Request-plane port; default 0 (a free one). */
  port?: number;
  /** Unique in the namespace; default `<pool>-<hostname>-<pid>`. */
  name?: string;
  seed?: number;
  /** Force the KV transfer backend (tcp between "hosts" that share one machine). */
  kvBackend?: WorkerInit['kvBackend'];
  heartbeatMs?: number;
  /** The shared token (request plane, and transfer agent unless TANDEM_TRANSFER_SECRET is set); default TANDEM_TOKEN. */
  token?: string;
  log?: (line: string) => void;
}

export interface JoinedWorker {
  readonly name: string;
  readonly registration: () => WorkerRegistration;
  readonly controlPlane: EtcdControlPlane;
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

/** Starts the worker and registers it. Throws BadArgumentError, ControlPlaneUnavailableError, the engine's errors. */
export async function joinWorker(options: JoinWorkerOptions): Promise<JoinedWorker> {
  const log = options.log ?? ((line: string) => console.log(line));
  const pool = options.graph.pools.find((p) => p.name === options.pool);
  if (!pool)
    throw new BadArgumentError(
      `the graph has no pool '${options.pool}' (it has ${options.graph.pools.map((p) => p.name).join(', ')})`,
    );
  const host = options.host ?? '127.0.0.1';
  const token = resolveToken(options.token);
  const init: WorkerInit = {
    ...workerInit(options.graph, pool, 0, {
      seed: options.seed ?? 0,
      ...(options.heartbeatMs !== undefined ? { heartbeatMs: options.heartbeatMs } : {}),
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
  try {
    plane = await EtcdControlPlane.connect({ ...options.controlOptions, endpoints: options.control });
    const controlPlane = plane;
    /** Messages about a request go to the frontend that sent it; worker-wide ones to every frontend. */
    const out = (m: FromWorker): void => {
      if (m.type === 'ready') {
        controlPlane
          .register(m.registration)
          .catch((error: Error) => log(`[${init.name}] registration: ${error.message}`));
        return;
      }
      if (m.type === 'heartbeat') controlPlane.heartbeat(m.name, m.load);
      if (m.type === 'drained' || m.type === 'fatal') return;
      if ('requestId' in m) {
        const frontend = m.requestId.slice(0, m.requestId.indexOf('/'));
        for (const c of server.frontends()) if (c.frontend === frontend) c.send(m);
        return;
      }
      for (const c of server.frontends()) c.send(m);
    };
    // The transfer agent listens where the request plane does; beyond loopback the shared token is its secret too.
    const secret = process.env[AUTH_ENV.secret] || process.env[AUTH_ENV.secretFile] ? undefined : token;
    worker = await openWorker(init, out, { tcpHost: host, ...(secret !== undefined ? { secret } : {}) });
    const w = worker;
    w.registrationExtras = { pool: pool.name, requestPlane: { host, port: server.port } };

    server.on('connection', (c: FrontendConnection) => {
      c.on('message', (m) => {
        // Peers come from the control plane, never from a frontend; init and shutdown are the launcher's.
        if (m.type === 'peer' || m.type === 'peerGone' || m.type === 'init' || m.type === 'shutdown') return;
        if ('requestId' in m && !m.requestId.startsWith(`${c.frontend}/`)) return;
        w.handle(m);
      });
      // A frontend's connection gone: its requests here are aborted. Its router has failed them on the break (and
      // request migration re-issued them under new ids), so nothing would read their tokens.
      c.on('close', () => w.abortAll(`${c.frontend}/`));
      w.sendKvSnapshot((m) => c.send(m));
    });

    const isPeer = (name: string) => name !== init.name;
    controlPlane.on('added', (peer) => {
      if (isPeer(peer.registration.name)) w.handle({ type: 'peer', peer: peer.registration });
    });
    controlPlane.on('removed', (name) => {
      if (isPeer(name)) w.handle({ type: 'peerGone', name });
    });
    for (const peer of controlPlane.workers())
      if (isPeer(peer.registration.name)) w.handle({ type: 'peer', peer: peer.registration });

    await controlPlane.register(w.registration());
    log(
      `[${init.name}] registered in etcd (${options.control}) as ${w.currentRole} of pool ${pool.name}; ` +
        `request plane on ${host}:${server.port}${token !== undefined ? ' (token required)' : ''}`,
    );
  } catch (error) {
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
    registration: () => w.registration(),
    controlPlane,
    stop: () =>
      (stopped ??= (async () => {
        await controlPlane.close();
        await server.close();
        await w.dispose();
      })()),
  };
}
