/**
 * The planner: sizes the prefill and decode pools for a load and SLAs from a measured profile, and corrects
 * them between planning intervals from the engines' latencies.
 *
 *   profile.ts           the profile file (zod schema, load / write)
 *   profiler.ts          measuring one through the engine (`tandem profile`)
 *   performance-model.ts the profile as monotone functions (prefill ms(ISL), step ms(batch, context))
 *   capacity.ts          SLA arithmetic: replicas and layouts within a GPU budget (`tandem plan`)
 *   forecast.ts          the next interval's load (Holt's linear trend, moving means; pluggable)
 *   load-correction.ts   the fast loop: one worker at a time, with hysteresis and a cool-down
 *   reshape.ts           when a pool's replicas should run another layout (2 x TP 1 <-> 1 x TP 2) for the load
 *   decisions.ts         the bounded history of decisions
 *   planner.ts           the above together, for a connector to act on
 *   spec.ts              the deployment graph's `planner` section
 *   observe.ts           what it sees of a deployment: ServeMetrics differenced per interval
 *   runtime.ts           the planner at work in the launcher: tick, decide, log, act through a connector
 *   connectors/          how it acts: one interface; local (the launcher's processes), kubernetes (the pools'
 *                        workloads; imported from connectors/kubernetes.js, not re-exported: it loads the client)
 */
export { ProfileError, ReshapeUnsupportedError, UnmeetablePlanError } from './errors.js';
export {
  PROFILE_FORMAT,
  PROFILE_VERSION,
  ProfileSchema,
  layoutName,
  loadProfile,
  parseProfile,
  writeProfile,
  type DecodePoint,
  type Parallelism,
  type PrefillPoint,
  type Profile,
  type ProfileLayout,
  type SkippedLayout,
} from './profile.js';
export {
  DEFAULT_SWEEP,
  QUICK_SWEEP,
  layoutGrid,
  measureProfile,
  type MeasureProfileOptions,
  type ProfileProgress,
  type ProfileSweep,
} from './profiler.js';
export { LayoutModel, layoutModels, type Estimate } from './performance-model.js';
export {
  MAX_PREFILL_UTILIZATION,
  planCapacity,
  replicaPlan,
  type CapacityPlan,
  type CapacityRequest,
  type DecodePoolPlan,
  type PrefillPoolPlan,
} from './capacity.js';
export {
  HoltLinearForecaster,
  LoadForecast,
  MovingMeanForecaster,
  type Forecaster,
  type LoadSample,
} from './forecast.js';
export {
  LoadCorrector,
  POOLS,
  type LoadAction,
  type LoadCorrection,
  type LoadCorrectionOptions,
  type LoadObservation,
  type Pool,
  type PoolState,
} from './load-correction.js';
export {
  judgeReshape,
  RESHAPE_AFTER,
  RESHAPE_MARGIN,
  RESHAPE_WINDOW,
  Reshaper,
  type LayoutOption,
  type ReshapeJudgement,
  type ReshapeObservation,
  type ReshaperOptions,
  type ReshapeVerdict,
} from './reshape.js';
export { DecisionHistory, DEFAULT_HISTORY_SIZE, type Decision } from './decisions.js';
export {
  layoutRef,
  Planner,
  type LayoutRef,
  type LoadDecision,
  type LoadInputs,
  type PlannerDecision,
  type PlannerOptions,
  type PoolLayouts,
  type SlaDecision,
} from './planner.js';
export {
  DEFAULT_PLANNING_INTERVAL_S,
  KubernetesPlannerSchema,
  PLANNER_CONNECTORS,
  PLANNER_MODES,
  PlannerSpecSchema,
  correctionOptions,
  correctionTickS,
  type KubernetesPlannerSpec,
  type PlannerConnectorKind,
  type PlannerMode,
  type PlannerSpec,
  type PlannerSpecInput,
} from './spec.js';
export { MetricsWindow, type PlannerWindow } from './observe.js';
export {
  CORRECTION_INTERVAL_S,
  PlannerRuntime,
  sharedLayouts,
  type PlannerAction,
  type PlannerRuntimeOptions,
  type PlannerStatus,
} from './runtime.js';
export {
  DEFAULT_DRAIN_TIMEOUT_MS,
  LocalConnector,
  PlannerActionError,
  poolLayout,
  replicaLayout,
  type LocalConnectorOptions,
  type LocalWorkers,
  type PlannerConnector,
  type PoolLayout,
  type ReplicaLayout,
} from './connectors/index.js';
