/** Serving: the deployment graph, the OpenAI-compatible frontend, the backend seam, metrics, disaggregation policy. */
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
