/**
 * A worker: one engine instance (prefill, decode or aggregated) in its own process, its KV pool registered with a
 * transfer agent. Its three planes: the control plane (it registers itself and learns its KV-transfer peers there:
 * lib/control, embedded over IPC or etcd), the request plane (requests in, tokens out) and the event plane (load and
 * KV events out, to every router): the launcher's IPC channel for a launcher's worker, TCP (request-plane.ts) for a
 * joined one (worker-join.ts). protocol.ts is what travels on them.
 */
export { EXPERT_LOAD_WINDOW_HEARTBEATS, openWorker, REMOTE_PREFILL_TIMEOUT_MS, runWorker, Worker } from './worker.js';
export { joinWorker, type JoinedWorker, type JoinWorkerOptions } from './worker-join.js';
export {
  decodePrefillNotice,
  DEFAULT_DRAIN_TIMEOUT_MS,
  encodePrefillNotice,
  type ExpertLoadReport,
  type FromWorker,
  type PrefillNotice,
  type ToWorker,
  type WorkerInit,
  type WorkerLoad,
  type WorkerRegistration,
} from './protocol.js';
export {
  DEFAULT_CONNECT_TIMEOUT_MS,
  DEFAULT_MAX_QUEUED_BYTES,
  MAX_FRAME_BYTES,
  RequestPlaneError,
  RequestPlaneServer,
  resolveToken,
  TOKEN_ENV,
  WorkerClient,
  type FrontendConnection,
  type RequestPlane,
  type RequestPlaneServerOptions,
  type WorkerClientOptions,
} from './request-plane.js';
