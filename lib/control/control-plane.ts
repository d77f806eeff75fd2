/**
 * The control plane: who the workers are, what they offer, whether they are alive. Workers register (role,
 * transfer-agent metadata, KV pool), heartbeat with their load, and are dropped when they stop answering.
 * `ControlPlane` is the interface; the launcher embeds `EmbeddedControlPlane` (one host, in memory), and
 * `EtcdControlPlane` (./etcd.ts) keeps the same view across hosts in etcd.
 */
import { EventEmitter } from 'node:events';
import type { PoolRole } from '../serve/graph.js';
import type { WorkerLoad, WorkerRegistration } from '../serve/protocol.js';

export interface LiveWorker {
  readonly registration: WorkerRegistration;
  load: WorkerLoad;
  lastHeartbeat: number;
}

export interface ControlPlaneEvents {
  added: [worker: LiveWorker];
  removed: [name: string, reason: string];
}

export interface ControlPlane extends EventEmitter<ControlPlaneEvents> {
  register(registration: WorkerRegistration): void;
  heartbeat(name: string, load: WorkerLoad): void;
  remove(name: string, reason: string): void;
  get(name: string): LiveWorker | undefined;
  workers(role?: PoolRole): LiveWorker[];
  close(): void;
}

/** A worker missing heartbeats for this long is dropped. */
export const DEFAULT_WORKER_TIMEOUT_MS = 5_000;

export class EmbeddedControlPlane extends EventEmitter<ControlPlaneEvents> implements ControlPlane {
  private readonly live = new Map<string, LiveWorker>();
  private readonly sweep: NodeJS.Timeout;

  constructor(private readonly timeoutMs = DEFAULT_WORKER_TIMEOUT_MS) {
    super();
    this.sweep = setInterval(
      () => {
        const now = Date.now();
        for (const [name, w] of this.live) {
          if (now - w.lastHeartbeat > this.timeoutMs) this.remove(name, `no heartbeat for ${this.timeoutMs} ms`);
        }
      },
      Math.max(100, Math.floor(timeoutMs / 4)),
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
