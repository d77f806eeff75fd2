/**
 * Re-shaping a pool while serving: when the replicas of a pool should run another layout of the profile (two TP 1
 * decode replicas into one TP 2, or back) for the observed load. Pure arithmetic on the performance model; the
 * Planner acts on it with the load correction's cool-down (planner.ts), a connector carries it out
 * (connectors/local.ts: start the new layout's replicas, drain and stop the old ones, no request lost).
 *
 * Rule, per pool, at the observed load (rate, ISL, OSL) and the SLAs:
 * - the pool runs n replicas of layout L, D = n x g_L devices (g: devices one replica takes, a TP 2 replica 2);
 * - every other layout L' of the profile is considered with n' = floor(D / g_L') replicas, when that is at least
 *   minReplicas: a re-shape never takes more devices than the pool has, so it keeps the GPU budget;
 * - a layout's servable rate is its replicas x the rate one replica serves within the SLA at this load
 *   (capacity.ts: prefill at the TTFT, decode at the ITL and within its KV cache); 0 where it cannot meet the SLA;
 * - a pool whose layout serves the load (servable_L >= rate) keeps it: a layout that meets the SLA is not
 *   re-shaped, however much more another would serve;
 * - otherwise the candidate that serves the most (ties: fewer devices, then the profile's order) wins when it
 *   serves at least (1 + margin) x what L serves (when L serves nothing, any positive rate wins).
 * The margin is a hysteresis band: L' replaces L only when servable_L' >= (1 + m) servable_L, and L comes back
 * only when servable_L >= (1 + m) servable_L', so a load near the boundary between two layouts moves neither way.
 * The margin does not help where a layout's servable rate jumps with the lengths (it meets the ITL up to some
 * context and not above it; its KV cache holds one more sequence or one fewer), so `Reshaper` adds hysteresis in
 * the load and in time:
 * - it judges the mean load of the last RESHAPE_WINDOW observations (one interval's prompts straddle a boundary
 *   more often than several intervals' do);
 * - a pool goes back to the layout it left only when that layout wins with the mean ISL and OSL both shorter and
 *   longer by the margin too: a load near the boundary where it re-shaped does not re-shape it back;
 * - a re-shape is due once the same winner has won `after` observations in a row (the Planner adds the pool's
 *   cool-down, as for every change).
 */
import { BadArgumentError } from '../errors.js';
import { replicaPlan } from './capacity.js';
import { LoadForecast, MovingMeanForecaster, type LoadSample } from './forecast.js';
import type { Pool } from './load-correction.js';
import { layoutModels, type LayoutModel } from './performance-model.js';
import { layoutName, type Parallelism, type Profile } from './profile.js';

/** A candidate layout must serve this share more than the running one (the hysteresis band). */
export const RESHAPE_MARGIN = 0.25;
/** Observations in a row with the same winner before a re-shape is due (the load correction's scaleUpAfter). */
export const RESHAPE_AFTER = 3;
/** Observations whose mean load is judged. */
export const RESHAPE_WINDOW = 8;

/** A layout of a pool's devices at a load. */
export interface LayoutOption {
  /** layoutName: tp1, tp2, tp2pp2 (`tandem plan`'s vocabulary). */
  layout: string;
  parallelism: Parallelism;
  gpusPerReplica: number;
  replicas: number;
  /** replicas x gpusPerReplica. */
  gpus: number;
  /** Requests per second these replicas serve within the SLA at the load; 0 when this layout cannot meet it. */
  servableRate: number;
  /** Why no replica of it meets the SLA at this load (or why it cannot be judged). */
  reason?: string;
}

export interface ReshapeVerdict {
  pool: Pool;
  /** The load judged, lengths rounded up to whole tokens. */
  load: LoadSample;
  current: LayoutOption;
  /** The other layouts of the profile the pool's devices hold minReplicas of, in the profile's order. */
  candidates: LayoutOption[];
  /** The layout that wins, when one does. */
  target?: LayoutOption;
  reason: string;
}

export interface ReshapeJudgement {
  ttftMs: number;
  itlMs: number;
  /** Fewest replicas of a pool. Default 1. */
  minReplicas?: number;
  /** Default RESHAPE_MARGIN. */
  margin?: number;
}

const rate3 = (x: number) => `${+x.toPrecision(3)} req/s`;

/** One layout with `replicas` replicas at `load`. */
function optionOf(
  profile: Profile,
  model: LayoutModel,
  pool: Pool,
  replicas: number,
  load: LoadSample,
  slas: ReshapeJudgement,
): LayoutOption {
  const plan = replicaPlan(profile, model, pool, {
    // A quiet interval still judges the layouts (they serve nothing needed: every one serves the load).
    rate: Math.max(load.rate, Number.MIN_VALUE),
    isl: load.isl,
    osl: load.osl,
    ttftMs: slas.ttftMs,
    itlMs: slas.itlMs,
  });
  const base = {
    layout: model.name,
    parallelism: model.parallelism,
    gpusPerReplica: model.gpusPerReplica,
    replicas,
    gpus: replicas * model.gpusPerReplica,
  };
  return typeof plan === 'string'
    ? { ...base, servableRate: 0, reason: plan }
    : { ...base, servableRate: replicas * plan.ratePerReplica };
}

/** Whether `pool`, running `current`, should run another layout of the profile at `load`; see the module comment. */
export function judgeReshape(
  profile: Profile,
  pool: Pool,
  current: { parallelism: Parallelism; replicas: number },
  observed: LoadSample,
  slas: ReshapeJudgement,
): ReshapeVerdict {
  const minReplicas = slas.minReplicas ?? 1;
  const margin = slas.margin ?? RESHAPE_MARGIN;
  if (!(margin >= 0 && Number.isFinite(margin)))
    throw new BadArgumentError(`the re-shaping margin must be a number >= 0 (got ${String(margin)})`);
  if (!Number.isSafeInteger(current.replicas) || current.replicas < 0)
    throw new BadArgumentError(`${pool} replicas must be an integer >= 0 (got ${current.replicas})`);
  for (const [name, v] of [
    ['rate', observed.rate],
    ['isl', observed.isl],
    ['osl', observed.osl],
  ] as const)
    if (!(v >= 0 && Number.isFinite(v))) throw new BadArgumentError(`${name} must be a number >= 0 (got ${v})`);
  const load = {
    rate: observed.rate,
    isl: Math.max(1, Math.ceil(observed.isl)),
    osl: Math.max(1, Math.ceil(observed.osl)),
  };
  const name = layoutName(current.parallelism);
  const models = layoutModels(profile);
  const model = models.find((m) => m.name === name);
  if (!model)
    return {
      pool,
      load,
      current: {
        layout: name,
        parallelism: current.parallelism,
        gpusPerReplica: 0,
        replicas: current.replicas,
        gpus: 0,
        servableRate: 0,
        reason: 'not in the profile',
      },
      candidates: [],
      reason: `the ${pool} pool runs ${name}, a layout the profile does not have: not re-shaped`,
    };
  const now = optionOf(profile, model, pool, current.replicas, load, slas);
  const candidates = models
    .filter((m) => m.name !== name && Math.floor(now.gpus / m.gpusPerReplica) >= minReplicas)
    .map((m) => optionOf(profile, m, pool, Math.floor(now.gpus / m.gpusPerReplica), load, slas));
  const verdict = { pool, load, current: now, candidates };
  if (current.replicas === 0) return { ...verdict, reason: `the ${pool} pool has no replica to re-shape` };
  const best = candidates.reduce<LayoutOption | undefined>(
    (b, c) => (!b || c.servableRate > b.servableRate || (c.servableRate === b.servableRate && c.gpus < b.gpus) ? c : b),
    undefined,
  );
  const what = (o: LayoutOption) =>
    `${o.replicas} x ${o.layout} serve${o.replicas === 1 ? 's' : ''} ${rate3(o.servableRate)}`;
  if (now.servableRate >= load.rate)
    return { ...verdict, reason: `${what(now)} within the SLA, the load is ${rate3(load.rate)}: kept` };
  if (!best || best.servableRate <= 0)
    return {
      ...verdict,
      reason: `${what(now)} of ${rate3(load.rate)} and no other layout of the pool's ${now.gpus} devices serves any: kept`,
    };
  if (best.servableRate < (1 + margin) * now.servableRate)
    return {
      ...verdict,
      reason: `${what(now)} of ${rate3(load.rate)}; the best other, ${what(best)}, is not ${1 + margin}x as much: kept`,
    };
  return {
    ...verdict,
    target: best,
    reason: `${what(now)} of ${rate3(load.rate)}; ${what(best)} on ${best.gpus} of its ${now.gpus} devices`,
  };
}

export interface ReshaperOptions extends ReshapeJudgement {
  /** The same winner this many observations in a row before a re-shape is due. Default RESHAPE_AFTER. */
  after?: number;
  /** The mean load of this many observations is judged. Default RESHAPE_WINDOW. */
  window?: number;
}

/** A verdict with its streak: `due` once the same target has won `after` observations in a row. */
export interface ReshapeObservation extends ReshapeVerdict {
  streak: number;
  due: boolean;
}

/** judgeReshape over time: the mean load of the last observations, the streak of each pool's winner. */
export class Reshaper {
  private readonly after: number;
  private readonly load: LoadForecast;
  private readonly streaks: Record<Pool, { target: string; count: number } | undefined> = {
    prefill: undefined,
    decode: undefined,
  };
  /** The layout each pool was last re-shaped from. */
  private readonly left: Partial<Record<Pool, string>> = {};

  constructor(
    private readonly profile: Profile,
    private readonly options: ReshaperOptions,
  ) {
    this.after = options.after ?? RESHAPE_AFTER;
    if (!Number.isSafeInteger(this.after) || this.after < 1)
      throw new BadArgumentError(`the re-shaping streak must be a positive integer (got ${String(options.after)})`);
    const window = options.window ?? RESHAPE_WINDOW;
    this.load = new LoadForecast({
      rate: new MovingMeanForecaster(window),
      isl: new MovingMeanForecaster(window),
      osl: new MovingMeanForecaster(window),
    });
  }

  /** One interval's load; each pool given (its running layout and replicas) judged at the mean load. */
  observe(
    load: LoadSample,
    pools: Partial<Record<Pool, { parallelism: Parallelism; replicas: number }>>,
  ): Partial<Record<Pool, ReshapeObservation>> {
    this.load.observe(load);
    const mean = this.load.predict()!;
    const out: Partial<Record<Pool, ReshapeObservation>> = {};
    for (const pool of ['prefill', 'decode'] as const) {
      const current = pools[pool];
      if (!current) continue;
      let verdict = judgeReshape(this.profile, pool, current, mean, this.options);
      const target = verdict.target?.layout;
      if (target !== undefined && target === this.left[pool] && !this.winsAcrossBand(pool, current, mean, target))
        verdict = {
          ...verdict,
          target: undefined,
          reason:
            `${verdict.reason}; but ${target} is the layout the pool left, and it comes back only when it wins with ` +
            `prompts and outputs ${Math.round(this.margin * 100)}% shorter and longer too: kept`,
        };
      const last = this.streaks[pool];
      const streak = verdict.target ? (last?.target === verdict.target.layout ? last.count + 1 : 1) : 0;
      this.streaks[pool] = verdict.target ? { target: verdict.target.layout, count: streak } : undefined;
      out[pool] = { ...verdict, streak, due: streak >= this.after };
    }
    return out;
  }

  /** The pool changed (resized): its streak starts again. */
  reset(pool: Pool): void {
    this.streaks[pool] = undefined;
  }

  /** The pool was re-shaped from layout `from`: its streak starts again, and `from` is the layout it left. */
  reshaped(pool: Pool, from: string): void {
    this.streaks[pool] = undefined;
    this.left[pool] = from;
  }

  private get margin(): number {
    return this.options.margin ?? RESHAPE_MARGIN;
  }

  /** Whether `target` also wins at the mean lengths scaled by 1 - margin and by 1 + margin. */
  private winsAcrossBand(
    pool: Pool,
    current: { parallelism: Parallelism; replicas: number },
    mean: LoadSample,
    target: string,
  ): boolean {
    return [1 - this.margin, 1 + this.margin].every((f) => {
      const load = { rate: mean.rate, isl: mean.isl * f, osl: mean.osl * f };
      return judgeReshape(this.profile, pool, current, load, this.options).target?.layout === target;
    });
  }
}
