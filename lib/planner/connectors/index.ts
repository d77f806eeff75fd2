/**
 * How the planner acts: one interface, one file per connector. A connector changes the pools one replica at a
 * time and says how many replicas each serves now; which worker goes, and how (drain, role switch, a
 * workload's replica count), is its own business.
 *
 * Each connector also says what layout (tp, pp, ep) each pool's replicas run, replica by replica, in `tandem plan`'s
 * vocabulary (`tp1`, `tp2pp2`), and re-shapes a pool into another layout where it can.
 *
 *   local.ts       the launcher's processes on this machine: start, drain and stop, switch role in place;
 *                  re-shape a CPU pool (start the new layout's workers, drain and stop the old ones)
 *   kubernetes.ts  the pools' workloads (StatefulSets) through the Kubernetes API: scale one up or down; a move
 *                  is a scale-down of one pool then a scale-up of the other (no role switch in place); no
 *                  re-shape (ReshapeUnsupportedError). Not re-exported here: it loads @kubernetes/client-node,
 *                  which only a kubernetes planner needs
 */
import type { Pool } from '../load-correction.js';
import { layoutName, type Parallelism } from '../profile.js';

/** One replica's layout. */
export interface ReplicaLayout {
  /** The worker (local) or pod (kubernetes). */
  name: string;
  /** layoutName: tp1, tp2, tp2pp2. */
  layout: string;
  parallelism: Parallelism;
}

/** What a pool's replicas run. */
export interface PoolLayout {
  /** The layout every replica runs; `mixed` while a re-shape is under way; absent for a pool with no replica. */
  layout?: string;
  /** Absent unless every replica runs one layout. */
  parallelism?: Parallelism;
  replicas: ReplicaLayout[];
}

/** A pool's layout from its replicas'. */
export function poolLayout(replicas: ReplicaLayout[]): PoolLayout {
  const names = new Set(replicas.map((r) => r.layout));
  if (names.size === 0) return { replicas };
  if (names.size > 1) return { layout: 'mixed', replicas };
  return { layout: replicas[0]!.layout, parallelism: { ...replicas[0]!.parallelism }, replicas };
}

/** A replica's layout entry. */
export function replicaLayout(name: string, parallelism: Parallelism): ReplicaLayout {
  const p = { tp: parallelism.tp, pp: parallelism.pp, ep: parallelism.ep };
  return { name, layout: layoutName(p), parallelism: p };
}

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
  /** What each pool's serving replicas run (workers draining or starting excluded). */
  layouts(): Record<Pool, PoolLayout>;
  /**
   * Re-shapes `pool` into `replicas` replicas of `parallelism`, serving throughout and losing no request; resolves
   * with the names of the replicas started. ReshapeUnsupportedError where the connector cannot.
   */
  reshapePool(pool: Pool, parallelism: Parallelism, replicas: number): Promise<string[]>;
}

export {
  DEFAULT_DRAIN_TIMEOUT_MS,
  LocalConnector,
  PlannerActionError,
  type LocalWorkers,
  type LocalConnectorOptions,
} from './local.js';
