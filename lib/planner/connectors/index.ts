/**
 * How the planner acts: one interface, one file per connector. A connector changes the pools one replica at a
 * time and says how many replicas each serves now; which worker goes, and how (drain, role switch, a
 * workload's replica count), is its own business.
 *
 *   local.ts       the launcher's processes on this machine: start, drain and stop, switch role in place
 *   (kubernetes)   would scale the pools' workloads; a move is a scale-down then a scale-up
 */
import type { Pool } from '../load-correction.js';

export interface PlannerConnector {
  /** `local`, `kubernetes`: for logs and /planner. */
  readonly kind: string;
  /** Replicas serving in each pool now (workers draining or starting excluded). */
  replicas(): Record<Pool, number>;
  /** Adds one replica to `pool`; resolves with the worker's name once it serves. */
  addReplica(pool: Pool): Promise<string>;
  /** Removes one replica of `pool` without losing a request; resolves with the worker's name once it is gone. */
  removeReplica(pool: Pool): Promise<string>;
  /** Moves one replica from `from` to `to` (no request lost); resolves with the worker's name once it serves there. */
  moveReplica(from: Pool, to: Pool): Promise<string>;
}

export {
  DEFAULT_DRAIN_TIMEOUT_MS,
  LocalConnector,
  PlannerActionError,
  type LocalWorkers,
  type LocalConnectorOptions,
} from './local.js';
