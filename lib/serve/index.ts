/**
 * Compatibility: what lib/serve exported before it was split into the architecture's folders. New code imports
 * from those: lib/deploy (graph, launcher), lib/frontend (HTTP API, backends, migration, metrics, joined frontend),
 * lib/router (the request relay, the KV router, the remote-prefill rule), lib/worker (worker, request plane,
 * protocol) and lib/control (discovery).
 */
export {
  DEFAULT_BLOCK_SIZE,
  DEFAULT_FRONTEND_HOST,
  DEFAULT_FRONTEND_PORT,
  DEFAULT_MODEL,
  DEVICES,
  defaultGraph,
  GraphError,
  loadGraph,
  parseGraph,
  POOL_ROLES,
  SERVING_MODES,
  SHARED_GPU_KV_CACHE_FRACTION,
  type DefaultGraphOptions,
  type DeploymentGraph,
  type DeviceKind,
  type EngineOptions,
  type GraphIssue,
  type ParseGraphOptions,
  type PoolRole,
  type PoolSpec,
  type ServingMode,
} from '../deploy/graph.js';
export {
  DEFAULT_DISAGGREGATION_THRESHOLDS,
  DEFAULT_MAX_PREFILL_QUEUE,
  DEFAULT_MIN_REMOTE_PREFILL_TOKENS,
  shouldPrefillRemotely,
  type DisaggregationThresholds,
  type PrefillSituation,
} from '../router/disagg.js';
export {
  NoWorkerAvailableError,
  type GenerationBackend,
  type GenerationChunk,
  type GenerationRequest,
} from '../frontend/backend.js';
export { engineBackend } from '../frontend/engine-backend.js';
export { HttpError, startFrontend, type FrontendOptions, type RunningFrontend } from '../frontend/index.js';
export { METRIC_NAMES, ServeMetrics } from '../frontend/metrics.js';
