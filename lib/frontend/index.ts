/**
 * The OpenAI-compatible HTTP frontend: POST /v1/chat/completions and /v1/completions (streaming over SSE in
 * OpenAI's chunk format, or not), GET /v1/models, /health and /metrics. It tokenizes and applies the chat
 * template, checks requests against the model (request.ts), and hands token ids to a `GenerationBackend`;
 * stop strings are matched here, on text (generation.ts).
 *
 * A bad request never reaches a worker and never takes the server down: it gets OpenAI's error body
 * `{ error: { message, type, param, code } }` with 400 (malformed or out of range), 401 (API key), 404
 * (unknown model or path), 405, 413 (body too large), 415 (not JSON), 503 (no worker, or draining) or 500.
 *
 * Behind it: a `GenerationBackend` (backend.ts): the router over workers, behind request migration (migration.ts),
 * or one engine in this process (engine-backend.ts). metrics.ts is /metrics. A joined frontend
 * (request-plane-frontend.ts) finds its workers in etcd and reaches them over TCP.
 */
export { ClientDisconnectedError, HttpError } from './errors.js';
export {
  MAX_COMPLETION_LOGPROBS,
  MAX_STOP_STRINGS,
  MAX_TEMPERATURE,
  MAX_TOP_LOGPROBS,
  checkChatRequest,
  checkCompletionRequest,
  type CheckedRequest,
  type ServedModel,
} from './request.js';
export {
  DEFAULT_DRAIN_MS,
  DEFAULT_MAX_BODY_BYTES,
  startFrontend,
  type FrontendOptions,
  type RunningFrontend,
} from './server.js';
export {
  NoWorkerAvailableError,
  type FinishReason,
  type GenerationBackend,
  type GenerationChunk,
  type GenerationRequest,
  type SamplingParams,
  type TokenLogprobs,
} from './backend.js';
export { engineBackend } from './engine-backend.js';
export {
  DEFAULT_MIGRATION_LIMIT,
  MigratingBackend,
  MIGRATION_OUTCOMES,
  WORKER_GONE,
  type MigrationOptions,
  type MigrationOutcome,
} from './migration.js';
export { METRIC_NAMES, ServeMetrics, type Endpoint, type PlannerReadings, type RequestStatus } from './metrics.js';
export {
  joinFrontend,
  ReachableWorkers,
  type JoinedFrontend,
  type JoinFrontendOptions,
  type ReachableWorkersOptions,
} from './request-plane-frontend.js';
