/**
 * The local connector: the planner acts on the launcher's worker processes on this machine.
 *
 * - add: start a worker of the pool (it loads the model, registers, then gets requests);
 * - remove: drain the least loaded worker of the pool (routers send it nothing new; its requests finish), then
 *   stop it. A drain that outlasts `drainTimeoutMs` stops it anyway: its remaining requests migrate to other
 *   workers (lib/frontend/migration.ts), as they would if it crashed;
 * - move: drain the least loaded worker of `from`, then switch its role to `to` in place: the process, its
 *   weights, KV pool and transfer agent stay; it registers again with the new role, so peers and routers see it
 *   there. A drain that outlasts `drainTimeoutMs` gives the move up and the worker serves on where it was
 *   (a request cannot change worker mid-stream without migration, and migration is for failures).
 * The last replica of a pool is never removed or moved.
 */
import { TandemError } from '../../errors.js';
import type { Pool } from '../load-correction.js';
import type { PlannerConnector } from './index.js';

/** Default bound on a drain before a removal stops the worker anyway, or a move is given up. */
export const DEFAULT_DRAIN_TIMEOUT_MS = 60_000;

/** A planner action that could not be carried out; the pools are as they were (the message says why). */
export class PlannerActionError extends TandemError {
  constructor(message: string) {
    super('TANDEM_PLANNER_ACTION_FAILED', message);
  }
}

/** The launcher's mechanics the local connector drives (lib/deploy/launcher.ts implements them). */
export interface LocalWorkers {
  /** Workers registered in `role` and not draining, by name. */
  serving(role: Pool): string[];
  /** Requests on a worker as its last heartbeat reported them (running, waiting, prefilling). */
  load(name: string): number;
  /** Starts a worker of the `role` pool; resolves with its name once it has registered. */
  start(role: Pool): Promise<string>;
  /** Routers stop sending it work; resolves true once nothing is in flight on it, false after `timeoutMs`. */
  drain(name: string, timeoutMs: number): Promise<boolean>;
  /** Routers see it again (a drain given up). */
  undrain(name: string): void;
  /** Stops the worker process (for good: it is not restarted). */
  stop(name: string): Promise<void>;
  /** A drained worker serves `role` from now on; resolves once it has registered in that role. */
  switchRole(name: string, role: Pool): Promise<void>;
}

export interface LocalConnectorOptions {
  drainTimeoutMs?: number;
  log?: (line: string) => void;
}

export class LocalConnector implements PlannerConnector {
  readonly kind = 'local';
  private readonly drainTimeoutMs: number;
  private readonly log: (line: string) => void;

  constructor(
    private readonly workers: LocalWorkers,
    options: LocalConnectorOptions = {},
  ) {
    this.drainTimeoutMs = options.drainTimeoutMs ?? DEFAULT_DRAIN_TIMEOUT_MS;
    this.log = options.log ?? (() => {});
  }

  replicas(): Record<Pool, number> {
    return { prefill: this.workers.serving('prefill').length, decode: this.workers.serving('decode').length };
  }

  addReplica(pool: Pool): Promise<string> {
    return this.workers.start(pool);
  }

  async removeReplica(pool: Pool): Promise<string> {
    const name = this.pick(pool, 'remove');
    const drained = await this.workers.drain(name, this.drainTimeoutMs);
    if (!drained)
      this.log(`${name} still had requests after ${this.drainTimeoutMs} ms of drain: they migrate as it stops`);
    await this.workers.stop(name);
    return name;
  }

  async moveReplica(from: Pool, to: Pool): Promise<string> {
    if (from === to) throw new PlannerActionError(`cannot move a replica from ${from} to itself`);
    const name = this.pick(from, 'move');
    if (!(await this.workers.drain(name, this.drainTimeoutMs))) {
      this.workers.undrain(name);
      throw new PlannerActionError(
        `${name} still had requests after ${this.drainTimeoutMs} ms of drain: it stays in ${from}`,
      );
    }
    await this.workers.switchRole(name, to);
    return name;
  }

  /** The least loaded serving worker of `pool`; never the last one. */
  private pick(pool: Pool, what: string): string {
    const names = this.workers.serving(pool);
    if (names.length <= 1)
      throw new PlannerActionError(`cannot ${what} a replica of ${pool}: it has ${names.length} serving`);
    return names.reduce((best, n) => (this.workers.load(n) < this.workers.load(best) ? n : best));
  }
}
