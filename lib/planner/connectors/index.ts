/**
 * How the planner acts: one interface, one file per connector. A connector changes the pools one replica at a
 * time and says how many replicas each serves now; which worker goes, and how (drain, role switch, a
 * workload's replica count), is its own business.
 *
 *   local.ts       the launcher's processes on this machine: start, drain and stop, switch role in place
 *   kubernetes.ts  the pools' workloads (StatefulSets) through the Kubernetes API: scale one up or down; a move
 *                  is a scale-down of one pool then a scale-up of the other (no role switch in place). Not
 *                  re-exported here: it loads @kubernetes/client-node, which only a kubernetes planner needs
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
  /** Reads the pools again where they can change without the connector (a person scaling a workload). */
  refresh?(): Promise<void>;
}

export {
  DEFAULT_DRAIN_TIMEOUT_MS,
  LocalConnector,
  PlannerActionError,
  type LocalWorkers,
  type LocalConnectorOptions,
} from './local.js';
