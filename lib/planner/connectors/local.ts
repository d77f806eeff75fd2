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
 * - re-shape (2 x TP 1 into 1 x TP 2, or back): make before break, one new replica at a time. Start a replica of
 *   the new layout (it registers and serves), then retire (drain, then stop; a drain that outlasts
 *   `drainTimeoutMs` stops it anyway and its requests migrate) the old replicas whose devices the new ones now
 *   stand for, least loaded first: old replicas are retired while those left still hold at least the pool's
 *   devices less those of the new replicas started. So the pool serves throughout, and while both run holds at
 *   most one replica's devices more than before (a new replica's or an old one's, the larger; on CPU the devices
 *   are rank threads). A start that fails stops the re-shape there
 *   (PlannerActionError): the pool serves on with what runs, and a re-shape asked again carries on from it. A
 *   pool the launcher cannot re-shape (GPU pools) is a ReshapeUnsupportedError before anything changes.
 * The last replica of a pool is never removed or moved.
 */
import { BadArgumentError, ParallelLayoutError, TandemError } from '../../errors.js';
import { rankCount } from '../../engine/parallel.js';
import { ReshapeUnsupportedError } from '../errors.js';
import type { Pool } from '../load-correction.js';
import { layoutName, type Parallelism } from '../profile.js';
import { poolLayout, replicaLayout, type PlannerConnector, type PoolLayout } from './index.js';

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
  /**
   * Starts a worker of the `role` pool, in `layout` (default: the graph's for the pool); resolves with its name once
   * it has registered. ReshapeUnsupportedError for a layout other than the graph's where the launcher cannot run
   * one (a GPU pool).
   */
  start(role: Pool, layout?: Parallelism): Promise<string>;
  /** The layout a worker runs. */
  layout(name: string): Parallelism;
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

  layouts(): Record<Pool, PoolLayout> {
    const of = (pool: Pool) =>
      poolLayout(this.workers.serving(pool).map((name) => replicaLayout(name, this.workers.layout(name))));
    return { prefill: of('prefill'), decode: of('decode') };
  }

  /** A new replica runs the layout the pool's replicas share (the graph's while they share none). */
  addReplica(pool: Pool): Promise<string> {
    return this.workers.start(pool, this.layouts()[pool].parallelism);
  }

  async reshapePool(pool: Pool, parallelism: Parallelism, replicas: number): Promise<string[]> {
    if (!Number.isSafeInteger(replicas) || replicas < 1)
      throw new BadArgumentError(`a re-shaped pool needs a positive integer of replicas (got ${replicas})`);
    const target = layoutName(parallelism);
    const ranks = (name: string) => rankCount(this.workers.layout(name));
    const isNew = (name: string) => layoutName(this.workers.layout(name)) === target;
    const serving = () => this.workers.serving(pool);
    const old = () => serving().filter((n) => !isNew(n));
    const devices = (names: string[]) => names.reduce((n, name) => n + ranks(name), 0);
    // The pool's devices (old and new replicas), so that a re-shape carried on after a failure keeps them.
    const pool0 = devices(serving());
    const perReplica = rankCount(parallelism);
    const started: string[] = [];
    this.log(
      `re-shaping ${pool}: ${this.describe(pool)} -> ${replicas} x ${target} (${pool0} devices; the new start first)`,
    );
    while (serving().filter(isNew).length < replicas) {
      try {
        started.push(await this.workers.start(pool, parallelism));
      } catch (error) {
        // A layout the launcher cannot run, or the model does not take: refused at the first start, nothing changed.
        if (error instanceof ReshapeUnsupportedError || error instanceof ParallelLayoutError) throw error;
        throw new PlannerActionError(
          `re-shaping ${pool} to ${target}: a ${target} replica did not start (${(error as Error).message}); ` +
            `${pool} serves on with ${this.describe(pool)}`,
        );
      }
      // Retire old replicas while those left hold at least the devices the new ones do not stand for yet.
      const keep = Math.max(0, pool0 - serving().filter(isNew).length * perReplica);
      const retiring: string[] = [];
      const left = this.leastLoadedFirst(old());
      while (left.length > 0 && devices(left) - ranks(left[0]!) >= keep) retiring.push(left.shift()!);
      await Promise.all(retiring.map((name) => this.retire(name)));
    }
    await Promise.all(old().map((name) => this.retire(name)));
    this.log(`re-shaped ${pool}: ${this.describe(pool)}`);
    return started;
  }

  async removeReplica(pool: Pool): Promise<string> {
    const name = this.pick(pool, 'remove');
    await this.retire(name);
    return name;
  }

  /** Drains a worker, then stops it; what a drain that outlasts its bound leaves migrates. */
  private async retire(name: string): Promise<void> {
    const drained = await this.workers.drain(name, this.drainTimeoutMs);
    if (!drained)
      this.log(`${name} still had requests after ${this.drainTimeoutMs} ms of drain: they migrate as it stops`);
    await this.workers.stop(name);
  }

  private leastLoadedFirst(names: string[]): string[] {
    return [...names].sort((a, b) => this.workers.load(a) - this.workers.load(b));
  }

  /** `2 x tp1`, `tp2 + tp1`: a pool's serving replicas. */
  private describe(pool: Pool): string {
    const l = this.layouts()[pool];
    if (l.replicas.length === 0) return 'no replica';
    if (l.layout !== 'mixed') return `${l.replicas.length} x ${l.layout}`;
    return l.replicas.map((r) => r.layout).join(' + ');
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
