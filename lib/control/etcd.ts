/**
 * The control plane in etcd, for workers on several hosts. Keys, under `/tandem/<namespace>/`:
 *
 *   workers/<name>  the registration (JSON, ./wire.ts), put under the worker's own lease
 *   load/<name>     its load (JSON), under the same lease, written at most once per loadIntervalMs
 *
 * The process that registers a worker keeps its lease alive (etcd3's keep-alive stream, every TTL / 3). When
 * that process dies, or is cut off from etcd for longer than the TTL, etcd deletes both keys and every
 * watcher sees the worker leave. A registration whose lease is lost (expired, or unknown to an etcd that came
 * back with an empty store) is put again under a new lease, until it is removed or the plane closed.
 *
 * Every instance keeps the namespace's workers in a local cache, which get() and workers() read synchronously,
 * filled by list-then-watch: a range read at revision R, then a watch from R + 1. When the watch stream breaks
 * (etcd restarted), the list is read again and the cache reconciled with it, emitting 'removed' and 'added'
 * for the differences; so a store that came back without its keys, or at a lower revision, is followed too.
 * While etcd is unreachable the cache keeps what it last knew.
 */
import type { Etcd3, IKeyValue, Lease, Namespace, Watcher } from 'etcd3';
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { BackendUnavailableError, BadArgumentError, TandemError } from '../errors.js';
import type { PoolRole } from '../deploy/graph.js';
import type { WorkerLoad, WorkerRegistration } from '../worker/protocol.js';
import type { ControlPlane, ControlPlaneEvents, LiveWorker } from './control-plane.js';
import { BadRegistrationError, decodeLoad, decodeRegistration, encodeLoad, encodeRegistration } from './wire.js';

/** A worker whose process stops renewing its lease leaves discovery this long after its last renewal. */
export const DEFAULT_LEASE_TTL_S = 5;
/** Load keys are written at most this often per worker; the lease alone says it is alive. */
export const DEFAULT_LOAD_INTERVAL_MS = 1_000;
/** How long connect() waits for etcd to answer, and the deadline of every single etcd call. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 3_000;
export const DEFAULT_NAMESPACE = 'default';
export const ETCD_KEY_ROOT = '/tandem/';
const NAMESPACE_NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const WORKER_PREFIX = 'workers/';
const LOAD_PREFIX = 'load/';
/** Reconnect and re-register backoff: short, because a worker that is not registered serves nobody. */
const RETRY_BACKOFF = { initialDelay: 100, maxDelay: 2_000 };

/** etcd could not be reached (or did not answer in time); the message names the endpoints. */
export class ControlPlaneUnavailableError extends TandemError {
  constructor(
    readonly endpoints: readonly string[],
    reason: string,
    options?: { cause?: unknown },
  ) {
    super('TANDEM_CONTROL_PLANE_UNAVAILABLE', `etcd at ${endpoints.join(', ')} ${reason}`, options);
  }
}

export interface EtcdControlPlaneOptions {
  /** etcd client URLs: `etcd://HOST:PORT`, `http(s)://HOST:PORT` or `HOST:PORT`; a string may list several, comma-separated. */
  endpoints: string | readonly string[];
  /** Deployment namespace: a DNS label (lower-case letters, digits, -). Default `default`. */
  namespace?: string;
  /** Lease TTL in whole seconds (etcd's unit), >= 1. Default 5. */
  leaseTtlSeconds?: number;
  /** Most one load write per worker per this many ms. Default 1000. */
  loadIntervalMs?: number;
  /** Bound on connect() and on each etcd call, in ms. Default 3000. */
  connectTimeoutMs?: number;
}

/**
 * `etcd://h:p,h2:p` or a list of `http(s)://h:p` / `h:p` as the etcd3 client takes them (`http://h:p`).
 * Throws BadArgumentError.
 */
export function parseEtcdEndpoints(endpoints: string | readonly string[]): string[] {
  const items = (typeof endpoints === 'string' ? [endpoints] : [...endpoints])
    .flatMap((e) => e.split(','))
    .map((e) => e.trim())
    .filter((e) => e.length > 0);
  if (items.length === 0) throw new BadArgumentError('etcd endpoints: none given (write etcd://HOST:2379)');
  let scheme = 'http';
  return items.map((item) => {
    const m = /^(?:(etcd|http|https):\/\/)?([^/:\s]+|\[[0-9a-fA-F:]+\]):(\d{1,5})\/?$/.exec(item);
    if (!m || Number(m[3]) > 65535)
      throw new BadArgumentError(
        `etcd endpoint '${item}': expected etcd://HOST:PORT, http(s)://HOST:PORT or HOST:PORT`,
      );
    // In `etcd://a:1,b:2` the scheme is written once and holds for the hosts after it.
    if (m[1] !== undefined) scheme = m[1] === 'https' ? 'https' : 'http';
    return `${scheme}://${m[2]}:${m[3]}`;
  });
}

/**
 * The etcd client and its fault-handling library. They are optional peer dependencies, loaded only when an
 * etcd plane connects: etcd3 pulls in gRPC and protobufjs (which has an install script), which a deployment on
 * one machine does not need.
 */
interface EtcdLibraries {
  etcd3: typeof import('etcd3');
  cockatiel: typeof import('cockatiel');
}

async function loadEtcdLibraries(): Promise<EtcdLibraries> {
  try {
    const [etcd3, cockatiel] = await Promise.all([import('etcd3'), import('cockatiel')]);
    return { etcd3, cockatiel };
  } catch (error) {
    throw new BackendUnavailableError(
      'etcd control plane',
      `the etcd3 package does not load (${(error as Error).message.split('\n')[0]}); install it next to tandem: npm install etcd3`,
    );
  }
}

interface CachedWorker {
  worker: LiveWorker;
  /** The stored text, to tell a re-put of the same registration from a new one. */
  value: string;
}

/** A registration made through this instance: the lease it lives under and the load still to write. */
interface OwnRegistration {
  readonly registration: WorkerRegistration;
  readonly value: string;
  lease?: Lease;
  /** The running keepRegistered loop; a replacement waits for it, so an old put can never land after a new one. */
  keeping?: Promise<number | undefined>;
  load?: WorkerLoad;
  lastLoadWrite: number;
  loadTimer?: NodeJS.Timeout;
  ended: boolean;
}

export class EtcdControlPlane extends EventEmitter<ControlPlaneEvents> implements ControlPlane {
  readonly endpoints: readonly string[];
  readonly namespace: string;
  readonly leaseTtlSeconds: number;
  private readonly loadIntervalMs: number;
  private readonly callTimeoutMs: number;
  private readonly client: Etcd3;
  private readonly keys: Namespace;
  private readonly cache = new Map<string, CachedWorker>();
  private readonly own = new Map<string, OwnRegistration>();
  /** Why a worker was removed through this instance, for the 'removed' event its key deletion brings. */
  private readonly removalReasons = new Map<string, string>();
  private watcher: Watcher | undefined;
  private resyncing = false;
  private watchGeneration = 0;
  private closed = false;
  /** The store revision the cache reflects; waiters resolve once it reaches theirs. */
  private revision = 0;
  private revisionWaiters: { revision: number; resolve: () => void }[] = [];

  /** Connects, reads the namespace's workers and starts watching. Throws ControlPlaneUnavailableError, BadArgumentError. */
  static async connect(options: EtcdControlPlaneOptions): Promise<EtcdControlPlane> {
    const plane = new EtcdControlPlane(options, await loadEtcdLibraries());
    const timeoutMs = plane.callTimeoutMs;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        plane.listAndWatch(),
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () => reject(new ControlPlaneUnavailableError(plane.endpoints, `did not answer within ${timeoutMs} ms`)),
            timeoutMs,
          );
        }),
      ]);
    } catch (error) {
      await plane.close();
      if (error instanceof ControlPlaneUnavailableError) throw error;
      throw new ControlPlaneUnavailableError(plane.endpoints, `is unreachable: ${(error as Error).message}`, {
        cause: error,
      });
    } finally {
      clearTimeout(timer);
    }
    return plane;
  }

  private constructor(
    options: EtcdControlPlaneOptions,
    private readonly lib: EtcdLibraries,
  ) {
    super();
    this.endpoints = parseEtcdEndpoints(options.endpoints);
    this.namespace = options.namespace ?? DEFAULT_NAMESPACE;
    if (!NAMESPACE_NAME.test(this.namespace))
      throw new BadArgumentError(
        `control plane namespace '${this.namespace}': must be a DNS label (lower-case letters, digits and -, at most 63)`,
      );
    this.leaseTtlSeconds = options.leaseTtlSeconds ?? DEFAULT_LEASE_TTL_S;
    if (!Number.isInteger(this.leaseTtlSeconds) || this.leaseTtlSeconds < 1)
      throw new BadArgumentError(
        `leaseTtlSeconds: must be a whole number of seconds >= 1 (got ${this.leaseTtlSeconds})`,
      );
    this.loadIntervalMs = options.loadIntervalMs ?? DEFAULT_LOAD_INTERVAL_MS;
    this.callTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const callTimeoutMs = this.callTimeoutMs;
    const { circuitBreaker, ConsecutiveBreaker, ExponentialBackoff, handleWhen, retry } = lib.cockatiel;
    const { isRecoverableError } = lib.etcd3;
    this.client = new lib.etcd3.Etcd3({
      hosts: [...this.endpoints],
      dialTimeout: callTimeoutMs,
      // Streams (watch, keep-alive) live on; every unary call has a deadline, so nothing waits on a dead etcd.
      defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + callTimeoutMs }),
      faultHandling: {
        // etcd3's default breaker stays open 5 s after 3 failures; a restarted etcd is used again after 1 s.
        host: () =>
          circuitBreaker(handleWhen(isRecoverableError), { halfOpenAfter: 1_000, breaker: new ConsecutiveBreaker(3) }),
        global: retry(handleWhen(isRecoverableError), {
          maxAttempts: 2,
          backoff: new ExponentialBackoff(RETRY_BACKOFF),
        }),
        watchBackoff: new ExponentialBackoff(RETRY_BACKOFF).next(),
      },
    });
    this.keys = this.client.namespace(`${ETCD_KEY_ROOT}${this.namespace}/`);
  }

  // ---- registrations made here ------------------------------------------------------------------------------

  /**
   * Puts the registration under a new lease and resolves once this instance's cache shows it. Rejects with
   * ControlPlaneUnavailableError when that does not happen within the call timeout; the registration is still
   * retried in the background until it lands, is removed or the plane is closed. A name registered here
   * before is replaced (its old lease revoked).
   */
  register(registration: WorkerRegistration): Promise<void> {
    const registered = this.registerOwn(registration);
    registered.catch(() => {}); // callers that treat register() as fire-and-forget must not see an unhandled rejection
    return registered;
  }

  private async registerOwn(registration: WorkerRegistration): Promise<void> {
    if (this.closed) throw new ControlPlaneUnavailableError(this.endpoints, 'control plane closed');
    const previous = this.own.get(registration.name);
    const own: OwnRegistration = {
      registration,
      value: encodeRegistration(registration),
      lastLoadWrite: 0,
      ended: false,
    };
    this.own.set(registration.name, own);
    let landed: Promise<number | undefined>;
    if (previous) {
      // The new put takes the key over from the old lease, so watchers see one replacement, not a leave and a
      // join; the old lease is revoked only after that (or once the new one could not be put).
      this.endOwn(previous, { revoke: false });
      landed = own.keeping = (previous.keeping ?? Promise.resolve(undefined)).then(() => this.keepRegistered(own));
      void landed.finally(() => previous.lease?.revoke().catch(() => {}));
    } else {
      landed = own.keeping = this.keepRegistered(own);
    }
    let timer: NodeJS.Timeout | undefined;
    try {
      const revision = await Promise.race([
        landed,
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () =>
              reject(
                new ControlPlaneUnavailableError(
                  this.endpoints,
                  `did not take the registration of '${registration.name}' within ${this.callTimeoutMs} ms (still retrying)`,
                ),
              ),
            this.callTimeoutMs,
          );
        }),
      ]);
      if (revision !== undefined) await this.cacheReached(revision);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Grants a lease and puts the registration (and the last load) under it, retrying until that succeeds or the
   * registration ends; resolves with the put's revision (undefined when it ended first). A lost lease starts
   * this again.
   */
  private async keepRegistered(own: OwnRegistration): Promise<number | undefined> {
    const backoff = new this.lib.cockatiel.ExponentialBackoff(RETRY_BACKOFF).next();
    for (let delay = backoff; !own.ended && !this.closed; delay = delay.next(undefined)) {
      const lease = this.keys.lease(this.leaseTtlSeconds);
      lease.on('lost', () => {}); // a failed grant also emits 'lost'; the catch below handles it
      own.lease = lease;
      try {
        const put = await lease
          .put(WORKER_PREFIX + own.registration.name)
          .value(own.value)
          .exec();
        if (own.load)
          await lease
            .put(LOAD_PREFIX + own.registration.name)
            .value(encodeLoad(own.load))
            .exec();
        if (own.ended || this.closed) {
          await lease.revoke().catch(() => {});
          return undefined;
        }
        lease.removeAllListeners('lost');
        lease.on('lost', () => this.leaseLost(own, lease));
        if (lease.revoked()) this.leaseLost(own, lease);
        return Number(put.header.revision);
      } catch {
        lease.release();
        await sleep(delay.duration);
      }
    }
    return undefined;
  }

  private leaseLost(own: OwnRegistration, lease: Lease): void {
    if (own.ended || this.closed || own.lease !== lease) return;
    own.keeping = this.keepRegistered(own);
  }

  /** Throttled: the newest load is written at most once per loadIntervalMs; the local cache sees it at once. */
  heartbeat(name: string, load: WorkerLoad): void {
    const cached = this.cache.get(name);
    if (cached) {
      cached.worker.load = load;
      cached.worker.lastHeartbeat = Date.now();
    }
    const own = this.own.get(name);
    if (!own || own.ended) return;
    own.load = load;
    if (own.loadTimer) return;
    const wait = own.lastLoadWrite + this.loadIntervalMs - Date.now();
    own.loadTimer = setTimeout(() => this.writeLoad(own), Math.max(0, wait));
    own.loadTimer.unref();
  }

  private writeLoad(own: OwnRegistration): void {
    own.loadTimer = undefined;
    if (own.ended || this.closed || !own.lease || !own.load) return;
    own.lastLoadWrite = Date.now();
    // A failed write is not retried: the next heartbeat carries a newer load, and a lost lease re-puts it.
    own.lease
      .put(LOAD_PREFIX + own.registration.name)
      .value(encodeLoad(own.load))
      .exec()
      .catch(() => {});
  }

  /** Stops keeping the registration; revokes its lease unless told not to (then returns the lease). */
  private endOwn(own: OwnRegistration, options: { revoke: false }): Lease | undefined;
  private endOwn(own: OwnRegistration): Promise<void>;
  private endOwn(own: OwnRegistration, options?: { revoke: false }): Promise<void> | Lease | undefined {
    own.ended = true;
    clearTimeout(own.loadTimer);
    if (this.own.get(own.registration.name) === own) this.own.delete(own.registration.name);
    if (options?.revoke === false) return own.lease;
    // Revoking deletes the keys at once; if etcd is away they go when the lease expires.
    return own.lease ? own.lease.revoke().catch(() => {}) : Promise.resolve();
  }

  /**
   * Takes the worker out of discovery everywhere: its keys are deleted (and, when it was registered here, its
   * lease revoked). Resolves once this instance's cache no longer shows it; never rejects (with etcd away, a
   * registration made here still expires with its lease). The 'removed' event carries `reason` here.
   */
  async remove(name: string, reason: string): Promise<void> {
    const own = this.own.get(name);
    if (!own && !this.cache.has(name)) return;
    this.removalReasons.set(name, reason);
    const lease = own ? this.endOwn(own, { revoke: false }) : undefined;
    try {
      const [deleted] = await Promise.all([
        this.keys
          .delete()
          .key(WORKER_PREFIX + name)
          .exec(),
        this.keys
          .delete()
          .key(LOAD_PREFIX + name)
          .exec(),
      ]);
      await this.cacheReached(Number(deleted.header.revision));
    } catch {
      // etcd is away: the registration goes when its lease expires, or stays for the owner to remove again
    } finally {
      void lease?.revoke().catch(() => {});
    }
  }

  // ---- the cache ---------------------------------------------------------------------------------------------

  get(name: string): LiveWorker | undefined {
    return this.cache.get(name)?.worker;
  }

  workers(role?: PoolRole): LiveWorker[] {
    return [...this.cache.values()]
      .map((c) => c.worker)
      .filter((w) => role === undefined || w.registration.role === role);
  }

  /** List at revision R, reconcile the cache with it, watch from R + 1. */
  private async listAndWatch(): Promise<void> {
    // An attempt that timed out may still finish later; the generation tells it that it is stale.
    const generation = ++this.watchGeneration;
    const stale = () => this.closed || generation !== this.watchGeneration;
    const listed = await this.keys.getAll().exec();
    if (stale()) return;
    const revision = Number(listed.header.revision);
    this.reconcile(listed.kvs, revision);
    const watcher = await this.keys
      .watch()
      .prefix('')
      .startRevision(String(revision + 1))
      .create();
    if (stale()) {
      await watcher.cancel().catch(() => {});
      return;
    }
    this.watcher = watcher;
    watcher
      .on('put', (kv) => this.applyPut(kv))
      .on('delete', (kv) => this.applyDelete(kv))
      .on('data', (res) => this.advanceTo(Number(res.header.revision)))
      .on('disconnected', () => this.resync())
      .on('error', () => this.resync());
  }

  /** After the watch broke: drop it, then list and watch again until that works (or the plane closes). */
  private resync(): void {
    if (this.closed || this.resyncing) return;
    this.resyncing = true;
    this.dropWatcher();
    void (async () => {
      const backoff = new this.lib.cockatiel.ExponentialBackoff(RETRY_BACKOFF).next();
      for (let delay = backoff; !this.closed; delay = delay.next(undefined)) {
        await sleep(delay.duration);
        try {
          await this.withDeadline(this.listAndWatch());
          break;
        } catch {
          this.watchGeneration++;
        }
      }
      this.resyncing = false;
    })();
  }

  private dropWatcher(): Promise<void> {
    const watcher = this.watcher;
    this.watcher = undefined;
    if (!watcher) return Promise.resolve();
    watcher.removeAllListeners();
    watcher.on('error', () => {}); // an EventEmitter's unheard 'error' throws
    return watcher.cancel().catch(() => {});
  }

  private async withDeadline<T>(work: Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([
        work,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error('etcd call timed out')), this.callTimeoutMs);
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
  }

  private reconcile(kvs: readonly IKeyValue[], revision: number): void {
    const listed = new Map<string, string>();
    const loads = new Map<string, string>();
    for (const kv of kvs) {
      const key = kv.key.toString();
      if (key.startsWith(WORKER_PREFIX)) listed.set(key.slice(WORKER_PREFIX.length), kv.value.toString());
      else if (key.startsWith(LOAD_PREFIX)) loads.set(key.slice(LOAD_PREFIX.length), kv.value.toString());
    }
    for (const name of [...this.cache.keys()])
      if (!listed.has(name)) this.dropCached(name, 'no longer registered in etcd');
    for (const [name, value] of listed) this.putCached(WORKER_PREFIX + name, name, value);
    for (const [name, value] of loads) this.putLoad(LOAD_PREFIX + name, name, value);
    // The store may have come back at a lower revision (empty data directory): follow it down.
    this.revision = revision;
    this.advanceTo(revision);
  }

  private applyPut(kv: IKeyValue): void {
    const key = kv.key.toString();
    if (key.startsWith(WORKER_PREFIX)) this.putCached(key, key.slice(WORKER_PREFIX.length), kv.value.toString());
    else if (key.startsWith(LOAD_PREFIX)) this.putLoad(key, key.slice(LOAD_PREFIX.length), kv.value.toString());
  }

  private applyDelete(kv: IKeyValue): void {
    const key = kv.key.toString();
    if (key.startsWith(WORKER_PREFIX))
      this.dropCached(key.slice(WORKER_PREFIX.length), 'its lease expired or its registration was deleted');
  }

  private putCached(key: string, name: string, value: string): void {
    const cached = this.cache.get(name);
    if (cached?.value === value) return;
    let registration: WorkerRegistration;
    try {
      registration = decodeRegistration(key, value);
    } catch (error) {
      if (!(error instanceof BadRegistrationError)) throw error;
      process.emitWarning(`control plane: ignoring ${this.namespace}/${error.message}`, { code: error.code });
      return;
    }
    if (registration.name !== name) {
      process.emitWarning(`control plane: ignoring ${this.namespace}/${key}: it names worker '${registration.name}'`, {
        code: 'TANDEM_BAD_REGISTRATION',
      });
      return;
    }
    if (cached) this.dropCached(name, 'registered again');
    const worker: LiveWorker = {
      registration,
      load: { running: 0, waiting: 0, freeBlocks: registration.numBlocks, prefilling: 0 },
      lastHeartbeat: Date.now(),
    };
    this.cache.set(name, { worker, value });
    this.emit('added', worker);
  }

  private putLoad(key: string, name: string, value: string): void {
    const cached = this.cache.get(name);
    if (!cached) return;
    try {
      cached.worker.load = decodeLoad(key, value);
      cached.worker.lastHeartbeat = Date.now();
    } catch (error) {
      if (!(error instanceof BadRegistrationError)) throw error;
      process.emitWarning(`control plane: ignoring ${this.namespace}/${error.message}`, { code: error.code });
    }
  }

  private dropCached(name: string, reason: string): void {
    if (!this.cache.delete(name)) return;
    const given = this.removalReasons.get(name);
    this.removalReasons.delete(name);
    this.emit('removed', name, given ?? reason);
  }

  private advanceTo(revision: number): void {
    if (revision > this.revision) this.revision = revision;
    const due = this.revisionWaiters.filter((w) => w.revision <= this.revision);
    if (due.length === 0) return;
    this.revisionWaiters = this.revisionWaiters.filter((w) => w.revision > this.revision);
    for (const w of due) w.resolve();
  }

  private cacheReached(revision: number): Promise<void> {
    if (revision <= this.revision) return Promise.resolve();
    return new Promise((resolve) => this.revisionWaiters.push({ revision, resolve }));
  }

  /**
   * Revokes the leases of the workers registered here (they leave discovery at once), stops watching and
   * closes the connection. Never rejects; with etcd away, the registrations expire after their TTL.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.revisionWaiters) w.resolve();
    this.revisionWaiters = [];
    const revoking = [...this.own.values()].map((own) => this.endOwn(own));
    await Promise.race([
      Promise.all([...revoking, this.dropWatcher()]),
      sleep(this.callTimeoutMs, undefined, { ref: false }),
    ]);
    this.client.close();
  }
}
