/**
 * The planner's decisions in one place, for a connector to act on: every planning interval, a plan from the
 * forecast load, the SLAs and the profile (`planInterval`); between intervals, the load-based correction
 * (`observeLoad`). Each decision, with its inputs and outputs, goes to one bounded history. It decides only:
 * acting (starting, stopping or switching the role of workers) is the connectors'.
 */
import { UnmeetablePlanError } from './errors.js';
import { planCapacity, type CapacityPlan } from './capacity.js';
import { DecisionHistory, DEFAULT_HISTORY_SIZE, type Decision } from './decisions.js';
import { LoadForecast, type LoadSample } from './forecast.js';
import {
  LoadCorrector,
  type LoadCorrection,
  type LoadCorrectionOptions,
  type LoadObservation,
  type Pool,
} from './load-correction.js';
import type { Parallelism, Profile } from './profile.js';

export type SlaDecision = Decision<
  'sla',
  { observed: LoadSample; forecast: LoadSample; models: Record<keyof LoadSample, string> },
  { plan: CapacityPlan | null; replicas: Record<Pool, number> }
>;
export type LoadDecision = Decision<'load', LoadObservation, LoadCorrection>;
export type PlannerDecision = SlaDecision | LoadDecision;

export interface PlannerOptions extends Omit<LoadCorrectionOptions, 'gpusPerReplica'> {
  /** Required for planInterval (mode sla); without it only the load-based correction runs (mode load). */
  profile?: Profile;
  /**
   * The layout each pool's workers run: plans keep it (a pool is not re-shaped while serving). Absent: the plan
   * may pick any layout of the profile for that pool.
   */
  layouts?: Partial<Record<Pool, Parallelism>>;
  /** Replicas running at the start. */
  replicas: Record<Pool, number>;
  forecast?: LoadForecast;
  historySize?: number;
}

export class Planner {
  readonly history: DecisionHistory<PlannerDecision>;
  private readonly forecast: LoadForecast;
  private readonly corrector: LoadCorrector;

  constructor(private readonly options: PlannerOptions) {
    this.history = new DecisionHistory<PlannerDecision>(options.historySize ?? DEFAULT_HISTORY_SIZE);
    this.forecast = options.forecast ?? new LoadForecast();
    this.corrector = new LoadCorrector(options, options.replicas);
  }

  get replicas(): Record<Pool, number> {
    return this.corrector.replicas;
  }

  /**
   * The end of a planning interval: `observed` is its load. Plans the next interval for the forecast load; an
   * unmeetable SLA keeps the replicas as they are (the decision says why).
   */
  planInterval(observed: LoadSample, atMs: number): SlaDecision {
    const { profile } = this.options;
    if (!profile) throw new UnmeetablePlanError('planInterval needs a profile (mode sla)');
    this.forecast.observe(observed);
    const forecast = this.forecast.predict()!;
    let plan: CapacityPlan | null = null;
    let reason: string;
    try {
      plan = planCapacity(profile, {
        ...forecast,
        rate: Math.max(forecast.rate, Number.MIN_VALUE),
        ttftMs: this.options.ttftMs,
        itlMs: this.options.itlMs,
        gpus: this.options.maxGpus,
        minReplicas: this.options.minReplicas ?? 1,
        ...(this.options.layouts ? { layouts: this.options.layouts } : {}),
      });
      this.corrector.setReplicas({ prefill: plan.prefill.replicas, decode: plan.decode.replicas }, atMs, {
        prefill: plan.prefill.gpusPerReplica,
        decode: plan.decode.gpusPerReplica,
      });
      reason =
        plan.status === 'ok'
          ? `forecast ${forecast.rate.toFixed(2)} req/s needs ${plan.prefill.replicas} prefill + ${plan.decode.replicas} decode`
          : `forecast ${forecast.rate.toFixed(2)} req/s needs ${plan.gpusNeeded} GPUs, over the budget of ${this.options.maxGpus}: best effort`;
    } catch (error) {
      if (!(error instanceof UnmeetablePlanError)) throw error;
      reason = error.message;
    }
    return this.history.record<SlaDecision>({
      kind: 'sla',
      inputs: { observed, forecast, models: this.forecast.models },
      outputs: { plan, replicas: this.corrector.replicas },
      reason,
    });
  }

  /**
   * The replicas actually serving, when they differ from the decided ones (a connector's action failed): the
   * correction starts counting again from them, without a cool-down.
   */
  resync(replicas: Record<Pool, number>): void {
    this.corrector.setReplicas(replicas);
  }

  /** One observation of the engines' latencies between intervals. */
  observeLoad(observation: LoadObservation): LoadDecision {
    const correction = this.corrector.observe(observation);
    return this.history.record<LoadDecision>({
      kind: 'load',
      inputs: observation,
      outputs: correction,
      reason: correction.reason,
    });
  }
}
