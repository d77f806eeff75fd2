/**
 * The planner's decisions in one place, for a connector to act on: every planning interval, a plan from the
 * forecast load, the SLAs and the profile (`planInterval`); between intervals, the load-based correction
 * (`observeLoad`), and, with `reshape` on, the re-shaping of a pool into another layout of the profile when the
 * correction holds (reshape.ts: the same winner `after` observations in a row, the pool not cooling down; a
 * re-shape starts the pool's cool-down like any change). Each decision, with its inputs (the pools' layouts among
 * them) and outputs, goes to one bounded history. It decides only: acting (starting, stopping, switching the role
 * of workers, starting another layout's) is the connectors'.
 */
import { BadArgumentError } from '../errors.js';
import { rankCount } from '../engine/parallel.js';
import { UnmeetablePlanError } from './errors.js';
import { planCapacity, type CapacityPlan } from './capacity.js';
import { DecisionHistory, DEFAULT_HISTORY_SIZE, type Decision } from './decisions.js';
import { LoadForecast, type LoadSample } from './forecast.js';
import {
  LoadCorrector,
  POOLS,
  type LoadCorrection,
  type LoadCorrectionOptions,
  type LoadObservation,
  type Pool,
} from './load-correction.js';
import { layoutName, type Parallelism, type Profile } from './profile.js';
import { Reshaper, type ReshapeObservation, type ReshaperOptions } from './reshape.js';

/** A layout as the planner names it: `tandem plan`'s vocabulary (layout, parallelism, gpusPerReplica). */
export interface LayoutRef {
  layout: string;
  parallelism: Parallelism;
  gpusPerReplica: number;
}

export function layoutRef(parallelism: Parallelism): LayoutRef {
  const p = { tp: parallelism.tp, pp: parallelism.pp, ep: parallelism.ep };
  return { layout: layoutName(p), parallelism: p, gpusPerReplica: rankCount(p) };
}

/** The pools' layouts a decision was made with (a pool the planner was not told of is absent). */
export type PoolLayouts = Partial<Record<Pool, LayoutRef>>;

export type SlaDecision = Decision<
  'sla',
  { observed: LoadSample; forecast: LoadSample; models: Record<keyof LoadSample, string>; layouts: PoolLayouts },
  { plan: CapacityPlan | null; replicas: Record<Pool, number> }
>;
/** What observeLoad takes: the engines' latencies, and the interval's load for the re-shaping rule. */
export interface LoadInputs extends LoadObservation {
  load?: LoadSample;
}
export type LoadDecision = Decision<
  'load',
  LoadInputs & { layouts: PoolLayouts },
  LoadCorrection & { layouts: PoolLayouts; reshape?: Partial<Record<Pool, ReshapeObservation>> }
>;
export type PlannerDecision = SlaDecision | LoadDecision;

export interface PlannerOptions extends Omit<LoadCorrectionOptions, 'gpusPerReplica'> {
  /** Required for planInterval (mode sla); without it only the load-based correction runs (mode load). */
  profile?: Profile;
  /**
   * The layout each pool's workers run (the launcher passes them): plans keep it, its devices per replica count
   * in the budget, and only a re-shape changes it. Absent: the plan may pick any layout of the profile for that
   * pool, and it is never re-shaped.
   */
  layouts?: Partial<Record<Pool, Parallelism>>;
  /**
   * Re-shape pools into another layout of the profile when that wins for the observed load (reshape.ts; needs the
   * profile and the layouts). true: the defaults (margin RESHAPE_MARGIN, streak scaleUpAfter).
   */
  reshape?: boolean | Pick<ReshaperOptions, 'after' | 'margin'>;
  /** Replicas running at the start. */
  replicas: Record<Pool, number>;
  forecast?: LoadForecast;
  historySize?: number;
}

export class Planner {
  readonly history: DecisionHistory<PlannerDecision>;
  private readonly forecast: LoadForecast;
  private readonly corrector: LoadCorrector;
  private readonly reshaper?: Reshaper;
  private readonly running: Partial<Record<Pool, Parallelism>>;

  constructor(private readonly options: PlannerOptions) {
    this.history = new DecisionHistory<PlannerDecision>(options.historySize ?? DEFAULT_HISTORY_SIZE);
    this.forecast = options.forecast ?? new LoadForecast();
    this.running = { ...options.layouts };
    // A pool's layout sets its devices per replica (ranks: a TP 2 replica takes 2).
    const gpusPerReplica = {
      ...(options as { gpusPerReplica?: Partial<Record<Pool, number>> }).gpusPerReplica,
      ...Object.fromEntries(Object.entries(this.running).map(([pool, p]) => [pool, rankCount(p)])),
    };
    this.corrector = new LoadCorrector({ ...options, gpusPerReplica }, options.replicas);
    if (options.reshape) {
      if (!options.profile) throw new BadArgumentError('re-shaping pools needs a profile');
      if (!options.layouts?.prefill && !options.layouts?.decode)
        throw new BadArgumentError("re-shaping pools needs the pools' layouts");
      this.reshaper = new Reshaper(options.profile, {
        ttftMs: options.ttftMs,
        itlMs: options.itlMs,
        minReplicas: options.minReplicas ?? 1,
        after: options.scaleUpAfter ?? 3,
        ...(options.reshape === true ? {} : options.reshape),
      });
    }
  }

  get replicas(): Record<Pool, number> {
    return this.corrector.replicas;
  }

  /** The layout each pool runs, as decided (a re-shape changes it before the connector has carried it out). */
  get layouts(): PoolLayouts {
    return Object.fromEntries(Object.entries(this.running).map(([pool, p]) => [pool, layoutRef(p)])) as PoolLayouts;
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
        ...(Object.keys(this.running).length > 0 ? { layouts: this.running } : {}),
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
      inputs: { observed, forecast, models: this.forecast.models, layouts: this.layouts },
      outputs: { plan, replicas: this.corrector.replicas },
      reason,
    });
  }

  /**
   * The replicas (and layouts) actually serving, when they differ from the decided ones (a connector's action
   * failed): the correction starts counting again from them, without a cool-down. A pool left out of `layouts`
   * keeps its decided layout (its replicas run several: the connector carries the re-shape on).
   */
  resync(replicas: Record<Pool, number>, layouts?: Partial<Record<Pool, Parallelism>>): void {
    for (const pool of POOLS) {
      const p = layouts?.[pool];
      if (p && this.running[pool]) this.running[pool] = p;
    }
    const gpusPerReplica = this.corrector.gpusPerReplica;
    for (const pool of POOLS) {
      const p = this.running[pool];
      if (p) gpusPerReplica[pool] = rankCount(p);
    }
    this.corrector.setReplicas(replicas, undefined, gpusPerReplica);
    for (const pool of POOLS) this.reshaper?.reset(pool);
  }

  /**
   * One observation of the engines' latencies between intervals; with `load` (the interval's rate, ISL, OSL) and
   * re-shaping on, a re-shape when the correction holds and one is due.
   */
  observeLoad(observation: LoadInputs): LoadDecision {
    const inputs = { ...observation, layouts: this.layouts };
    let correction: LoadCorrection = this.corrector.observe(observation);
    let reshape: Partial<Record<Pool, ReshapeObservation>> | undefined;
    if (this.reshaper && observation.load) {
      const replicas = this.corrector.replicas;
      reshape = this.reshaper.observe(
        observation.load,
        Object.fromEntries(
          Object.entries(this.running).map(([pool, parallelism]) => [
            pool,
            { parallelism, replicas: replicas[pool as Pool] },
          ]),
        ),
      );
      const action = correction.action;
      if (action.kind === 'hold') {
        const due = POOLS.find((p) => reshape![p]?.due && !this.corrector.cooling(p, observation.atMs));
        const v = due && reshape[due];
        if (due && v?.target) {
          this.running[due] = v.target.parallelism;
          this.corrector.reshaped(due, v.target.replicas, v.target.gpusPerReplica, observation.atMs);
          this.reshaper.reshaped(due, v.current.layout);
          correction = {
            action: {
              kind: 'reshape',
              pool: due,
              from: v.current.layout,
              to: v.target.layout,
              replicas: v.target.replicas,
            },
            replicas: this.corrector.replicas,
            pools: this.corrector.poolStates(),
            reason: `re-shape ${due} from ${v.current.replicas} x ${v.current.layout} to ${v.target.replicas} x ${v.target.layout} (${v.streak} times in a row): ${v.reason}`,
          };
        }
      } else
        for (const pool of action.kind === 'move' ? [action.from, action.to] : [action.pool]) this.reshaper.reset(pool);
    }
    return this.history.record<LoadDecision>({
      kind: 'load',
      inputs,
      outputs: { ...correction, layouts: this.layouts, ...(reshape ? { reshape } : {}) },
      reason: correction.reason,
    });
  }
}
