/**
 * The KV-aware router: a prefix index of which worker holds which KV block (fed by the workers' numbered KV
 * events), a load estimate per worker, one cost function (cost.ts), routing policies, and the remote-prefill
 * decision (disagg.ts's rule). The request relay over the workers' channels is router.ts (`Router`), which asks
 * the KV router for decisions.
 */
export { KvPrefixIndex, type PrefixIndexOptions } from './prefix-index.js';
export { LoadEstimate, type WorkerLoadEstimate } from './load-estimate.js';
export {
  chooseByCost,
  costOf,
  DEFAULT_COST_WEIGHTS,
  DEFAULT_PREFILL_WEIGHT,
  DEFAULT_ROUTER_TEMPERATURE,
  explainCost,
  workerCost,
  type CostTerms,
  type CostWeights,
} from './cost.js';
export {
  createPolicy,
  DEFAULT_ROUTER_POLICY,
  ROUTER_POLICIES,
  type Candidates,
  type RouterPolicyName,
  type RoutingPolicy,
} from './policies.js';
export {
  KV_EVENTS_MISSING_AFTER,
  KvRouter,
  type KvIngest,
  type KvRouterOptions,
  type RouteCandidate,
  type RouteChoice,
  type RouteDecision,
  type RouteRequest,
  type RouterConfig,
} from './kv-router.js';
export {
  DEFAULT_DISAGGREGATION_THRESHOLDS,
  DEFAULT_MAX_PREFILL_QUEUE,
  DEFAULT_MIN_REMOTE_PREFILL_TOKENS,
  shouldPrefillRemotely,
  type DisaggregationThresholds,
  type PrefillSituation,
} from './disagg.js';
// Last: router.ts imports the exports above (through this file) and the deployment graph, which imports them too.
export { Router, WorkerRequestError, type RouterOptions } from './router.js';
