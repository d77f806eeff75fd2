/**
 * The control plane: who the workers are, what they offer, whether they are alive. Workers register (role,
 * transfer-agent metadata, KV pool) and heartbeat with their load. A worker whose heartbeats stop is first
 * `suspect` (routers prefer the others; its requests in flight go on: a worker starved of CPU is slow, not dead),
 * and is dropped only on a certain signal (its process exited, its request-plane connection or its lease was lost:
 * whoever sees that calls `remove`) or after a much longer silence.
 * `ControlPlane` is the interface; the launcher embeds `EmbeddedControlPlane` (one host, in memory), and
 * `EtcdControlPlane` (./etcd.ts) keeps the same view across hosts in etcd.
 */
import { EventEmitter } from 'node:events';
import type { PoolRole } from '../deploy/graph.js';
import type { WorkerLoad, WorkerRegistration } from '../worker/protocol.js';

export interface LiveWorker {
  readonly registration: WorkerRegistration;
  load: WorkerLoad;
  lastHeartbeat: number;
  /** No heartbeat for the suspect window: routers prefer other workers (preferResponsive); cleared by the next one. */
  suspect?: boolean;
}

export interface ControlPlaneEvents {
  added: [worker: LiveWorker];
  removed: [name: string, reason: string];
  /** A worker became suspect (`true`: why) or answered again (`false`). */
  suspect: [name: string, suspect: boolean, reason: string];
}

/**
 * Discovery, one interface whatever keeps it: a worker registers itself and learns its peers from the 'added' and
 * 'removed' events; routers choose among workers(). A promise from register(), remove() or close() settles once
 * this instance's view shows the change (a distributed plane); an in-memory plane is done on return.
 */
export interface ControlPlane extends EventEmitter<ControlPlaneEvents> {
  register(registration: WorkerRegistration): void | Promise<void>;
  /** Records a worker's load in this instance's view (a distributed plane also stores its own workers' load). */
  heartbeat(name: string, load: WorkerLoad): void;
  remove(name: string, reason: string): void | Promise<void>;
  get(name: string): LiveWorker | undefined;
  workers(role?: PoolRole): LiveWorker[];
  close(): void | Promise<void>;
}

/** A worker missing heartbeats for this long is suspect (routers prefer others; nothing of it fails). */
export const DEFAULT_WORKER_SUSPECT_MS = 5_000;
/**
 * A worker missing heartbeats for this long is dropped (its requests migrate) even without a certain signal of its
 * death: long enough that a worker starved of CPU on an overloaded machine is not taken for dead.
 */
export const DEFAULT_WORKER_TIMEOUT_MS = 60_000;

/**
 * Of `workers`, those not suspect; all of them when every one is suspect (a slow worker beats none). What routers
 * choose among.
 */
export function preferResponsive(workers: LiveWorker[]): LiveWorker[] {
  const responsive = workers.filter((w) => !w.suspect);
  return responsive.length > 0 ? responsive : workers;
}

/**
 * What a router chooses a new request's workers among: those not draining (they report it with their load: a
 * worker told to stop finishes what it has and takes nothing new), the responsive ones first (preferResponsive).
 */
export function routingChoices(workers: LiveWorker[]): LiveWorker[] {
  return preferResponsive(workers.filter((w) => !w.load.draining));
}

export class EmbeddedControlPlane extends EventEmitter<ControlPlaneEvents> implements ControlPlane {
  private readonly live = new Map<string, LiveWorker>();
  private readonly sweep: NodeJS.Timeout;

  /**
   * `suspectAfterMs`: the heartbeat silence after which a worker is suspect; `timeoutMs`: the silence after which it
   * is dropped (at least `suspectAfterMs`).
   */
  constructor(
    private readonly suspectAfterMs = DEFAULT_WORKER_SUSPECT_MS,
    private readonly timeoutMs = Math.max(DEFAULT_WORKER_TIMEOUT_MS, suspectAfterMs),
  ) {
    super();
    if (!(timeoutMs >= suspectAfterMs))
      throw new RangeError(
        `the worker timeout (${timeoutMs} ms) must be at least the suspect window (${suspectAfterMs} ms)`,
      );
    this.sweep = setInterval(
      () => {
        const now = Date.now();
        for (const [name, w] of this.live) {
          const silent = now - w.lastHeartbeat;
          if (silent > this.timeoutMs) this.remove(name, `no heartbeat for ${this.timeoutMs} ms`);
          else if (silent > this.suspectAfterMs && !w.suspect) {
            w.suspect = true;
            this.emit('suspect', name, true, `no heartbeat for ${this.suspectAfterMs} ms`);
          }
        }
      },
      Math.max(100, Math.floor(suspectAfterMs / 4)),
    );
    this.sweep.unref();
  }

  register(registration: WorkerRegistration): void {
    this.remove(registration.name, 'registered again');
    const worker: LiveWorker = {
      registration,
      load: { running: 0, waiting: 0, freeBlocks: registration.numBlocks, prefilling: 0 },
      lastHeartbeat: Date.now(),
    };
    this.live.set(registration.name, worker);
    this.emit('added', worker);
  }

  heartbeat(name: string, load: WorkerLoad): void {
    const w = this.live.get(name);
    if (!w) return;
    w.load = load;
    w.lastHeartbeat = Date.now();
    if (w.suspect) {
      w.suspect = false;
      this.emit('suspect', name, false, 'heartbeat again');
    }
  }

  remove(name: string, reason: string): void {
    if (!this.live.delete(name)) return;
    this.emit('removed', name, reason);
  }

  get(name: string): LiveWorker | undefined {
    return this.live.get(name);
  }

  workers(role?: PoolRole): LiveWorker[] {
    return [...this.live.values()].filter((w) => role === undefined || w.registration.role === role);
  }

  close(): void {
    clearInterval(this.sweep);
  }
}
