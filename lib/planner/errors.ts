/** The planner's typed errors. */
import { TandemError } from '../errors.js';

/** A profile file that cannot be read, is not JSON, or does not validate; the message names the file and field. */
export class ProfileError extends TandemError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('TANDEM_BAD_PROFILE', message, options);
  }
}

/**
 * No deployment meets the SLAs, at any size (the latency of one request alone is over the SLA, or one request's
 * KV does not fit a worker), or the GPU budget cannot hold one replica of each pool. A budget that holds one
 * replica of each but not enough of them is not an error: the plan says 'over-budget' and gives its best effort.
 */
export class UnmeetablePlanError extends TandemError {
  constructor(message: string) {
    super('TANDEM_PLAN_UNMEETABLE', message);
  }
}

/**
 * A connector that cannot re-shape a pool (run its replicas in another layout) where it runs: the kubernetes
 * connector (a pool's pods come from one workload template), or GPU pools of the local connector (a new layout's
 * ranks need GPUs that the old replicas hold until they stop). The pools are as they were.
 */
export class ReshapeUnsupportedError extends TandemError {
  constructor(message: string) {
    super('TANDEM_RESHAPE_UNSUPPORTED', message);
  }
}
