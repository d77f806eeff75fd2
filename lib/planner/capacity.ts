/**
 * SLA arithmetic: from a load (request rate, ISL, OSL), the SLAs (TTFT, ITL) and a profile, the replicas each
 * pool needs and each pool's layout, within a GPU budget. Pure: nothing is started.
 *
 * Prefill (per replica of a layout): a prompt of ISL tokens alone takes S = prefillMs(ISL). Prompts queue, so
 * a replica kept busy a share rho of the time adds a wait; with the M/D/1 mean wait W = rho S / (2 (1 - rho)),
 * TTFT = S + W <= ttftMs holds while rho <= 2x / (1 + 2x), x = (ttftMs - S) / S, capped at
 * MAX_PREFILL_UTILIZATION. A replica then serves rho / S prompts per second (its throughput at the TTFT SLA),
 * and prefillReplicas = ceil(rate / (rho / S)). S > ttftMs: no replica count meets the TTFT.
 * Conservative for short prompts: the engine batches several into one step (up to maxNumBatchedTokens), which
 * serves more than one at a time.
 *
 * Decode (per replica of a layout): the mean context of a sequence over its decode is ISL + OSL / 2. The batch
 * B is the largest measured batch whose step time at that context meets the ITL SLA, bounded by the KV pool
 * (B sequences of ISL + OSL tokens, rounded up to whole blocks, must fit: no preemption at the end of the
 * requests) and by the engine's maxNumSeqs. A request occupies a slot for OSL steps of t = decodeStepMs(B, ctx),
 * so (Little's law) a replica serves B / (OSL t) requests per second, and
 * decodeReplicas = ceil(rate x OSL x t / B). No B >= 1: no replica count meets the ITL.
 *
 * Layout: per pool, the layout of the profile that needs the fewest devices (replicas x devices per replica: a
 * TP 2 replica counts 2); ties go to the lower latency (prefill: one prompt's time; decode: the step time at the
 * planned batch), then to the layout listed first. Every layout considered, with its numbers or why it cannot meet
 * the SLA, is in `alternatives`. A pool whose layout is fixed (`layouts`: a planner while serving, whose workers
 * change layout only by a re-shape, reshape.ts) considers that layout of the profile only. Budget: when the pools together need more than `gpus`, the plan is 'over-budget':
 * for each pair of layouts, minReplicas of each pool, then one replica at a time to the pool that serves the
 * smaller share of the rate while one fits; the pair that serves the most wins. `servableRate` says what that
 * deployment serves within the SLAs. A budget below minReplicas of each pool is an UnmeetablePlanError.
 */
import { BadArgumentError } from '../errors.js';
import { UnmeetablePlanError } from './errors.js';
import { layoutModels, type LayoutModel } from './performance-model.js';
import { layoutName, type Parallelism, type Profile } from './profile.js';

/** A prefill replica is planned busy at most this share of the time: queues grow without bound near 1. */
export const MAX_PREFILL_UTILIZATION = 0.9;

/** Rounding slack: 2.0000000001 replicas is 2. */
const EPSILON = 1e-9;

export interface CapacityRequest {
  /** Requests per second. */
  rate: number;
  /** Prompt tokens per request. */
  isl: number;
  /** Output tokens per request. */
  osl: number;
  ttftMs: number;
  itlMs: number;
  /** GPUs both pools may take together (CPU engine: engine instances). */
  gpus: number;
  /** Fewest replicas of each pool. Default 1. */
  minReplicas?: number;
  /**
   * A pool whose layout is fixed (a planner while serving: its workers change layout only by a re-shape) is
   * planned with that layout of the profile only; absent: every layout of the profile is considered.
   */
  layouts?: Partial<Record<'prefill' | 'decode', Parallelism>>;
}

interface PoolPlanBase {
  layout: string;
  parallelism: Parallelism;
  gpusPerReplica: number;
  /** What the load needs to meet the SLA. */
  replicasNeeded: number;
  /** What the plan deploys: replicasNeeded, or less when over budget. */
  replicas: number;
  /** replicas x gpusPerReplica. */
  gpus: number;
  /** Requests per second one replica serves within the SLA. */
  ratePerReplica: number;
  /** Estimates outside the profile's measured range that this pool's numbers rest on. */
  extrapolated: boolean;
}

export interface PrefillPoolPlan extends PoolPlanBase {
  role: 'prefill';
  /** One prompt of ISL tokens alone. */
  prefillMs: number;
  /** The busy share planned (rho). */
  utilization: number;
}

export interface DecodePoolPlan extends PoolPlanBase {
  role: 'decode';
  /** Mean context of a sequence over its decode: ISL + OSL / 2. */
  context: number;
  /** Sequences per replica planned. */
  batch: number;
  /** Largest batch that meets the ITL at `context` (within the batches measured). */
  itlBatch: number;
  /** Largest batch whose KV fits a replica. */
  kvBatch: number;
  /** Step time at `batch`: the planned ITL. */
  stepMs: number;
}

/** One layout considered for a pool: its numbers where it meets the SLA, else why not. */
export interface LayoutAlternative {
  layout: string;
  parallelism: Parallelism;
  gpusPerReplica: number;
  /** The layout the plan deploys for this pool. */
  chosen: boolean;
  /** Replicas and devices that meet the SLA at this load (absent when none do). */
  replicasNeeded?: number;
  gpus?: number;
  /** Prefill: one prompt's time; decode: the step time at the planned batch. */
  latencyMs?: number;
  ratePerReplica?: number;
  /** Why no replica count of this layout meets the SLA. */
  reason?: string;
}

export interface CapacityPlan {
  /** 'ok': the SLAs are met within the budget; 'over-budget': the best effort within it. */
  status: 'ok' | 'over-budget';
  request: CheckedRequest;
  prefill: PrefillPoolPlan;
  decode: DecodePoolPlan;
  /** GPUs the SLAs need at this rate. */
  gpusNeeded: number;
  /** GPUs the plan deploys (<= the budget). */
  gpusUsed: number;
  /** Requests per second the deployed plan serves within the SLAs (>= rate when 'ok'). */
  servableRate: number;
  /** Every layout of the profile, per pool, as considered for this load (in the profile's order). */
  alternatives: { prefill: LayoutAlternative[]; decode: LayoutAlternative[] };
}

type CheckedRequest = Required<Omit<CapacityRequest, 'layouts'>>;

function checkRequest(r: CapacityRequest): CheckedRequest {
  const positive = (name: string, v: number) => {
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0)
      throw new BadArgumentError(`${name} must be a positive number (got ${String(v)})`);
  };
  const positiveInt = (name: string, v: number) => {
    if (!Number.isSafeInteger(v) || v < 1)
      throw new BadArgumentError(`${name} must be a positive integer (got ${String(v)})`);
  };
  positive('rate', r.rate);
  positiveInt('isl', r.isl);
  positiveInt('osl', r.osl);
  positive('ttftMs', r.ttftMs);
  positive('itlMs', r.itlMs);
  positiveInt('gpus', r.gpus);
  const minReplicas = r.minReplicas ?? 1;
  positiveInt('minReplicas', minReplicas);
  return { rate: r.rate, isl: r.isl, osl: r.osl, ttftMs: r.ttftMs, itlMs: r.itlMs, gpus: r.gpus, minReplicas };
}

const ms = (x: number) => `${+x.toPrecision(3)} ms`;

/** The replicas of `model` that serve `r.rate` at `ratePerReplica` each (at least r.minReplicas), all deployed. */
function poolOf(model: LayoutModel, r: CheckedRequest, ratePerReplica: number, extrapolated: boolean): PoolPlanBase {
  const replicasNeeded = Math.max(r.minReplicas, Math.ceil(r.rate / ratePerReplica - EPSILON));
  return {
    layout: model.name,
    parallelism: model.parallelism,
    gpusPerReplica: model.gpusPerReplica,
    replicasNeeded,
    replicas: replicasNeeded,
    gpus: replicasNeeded * model.gpusPerReplica,
    ratePerReplica,
    extrapolated,
  };
}

/** One layout's prefill replica at the TTFT SLA, or why it cannot meet it. */
function prefillFor(model: LayoutModel, r: CheckedRequest): PrefillPoolPlan | string {
  if (r.isl > model.maxModelLen) return `a prompt of ${r.isl} tokens is over the model's ${model.maxModelLen}`;
  const s = model.prefillMs(r.isl);
  if (s.ms >= r.ttftMs)
    return `one prompt of ${r.isl} tokens alone takes ${ms(s.ms)} on ${model.name}, over the TTFT SLA of ${ms(r.ttftMs)}`;
  const x = (r.ttftMs - s.ms) / s.ms;
  const utilization = Math.min(MAX_PREFILL_UTILIZATION, (2 * x) / (1 + 2 * x));
  return {
    role: 'prefill',
    ...poolOf(model, r, utilization / (s.ms / 1000), s.extrapolated),
    prefillMs: s.ms,
    utilization,
  };
}

/** One layout's decode replica at the ITL SLA, or why it cannot meet it. */
function decodeFor(
  model: LayoutModel,
  r: CheckedRequest,
  engine: { blockSize: number; maxNumSeqs: number },
): DecodePoolPlan | string {
  const total = r.isl + r.osl;
  if (total > model.maxModelLen) return `ISL + OSL = ${total} tokens is over the model's ${model.maxModelLen}`;
  const context = r.isl + r.osl / 2;
  const blockTokens = Math.ceil(total / engine.blockSize) * engine.blockSize;
  const kvBatch = Math.floor(model.kvCapacityTokens / blockTokens);
  if (kvBatch < 1)
    return `one request of ${total} tokens does not fit the KV cache of a ${model.name} replica (${model.kvCapacityTokens} tokens)`;
  // Step time rises with the batch (performance-model.ts): the batches that meet the ITL are 1..itlBatch.
  let itlBatch = 0;
  for (let b = 1; b <= model.maxBatch; b++) {
    if (model.decodeStepMs(b, context).ms > r.itlMs) break;
    itlBatch = b;
  }
  if (itlBatch < 1) {
    const one = model.decodeStepMs(1, context).ms;
    return `one decode step at ${Math.round(context)} tokens of context takes ${ms(one)} on ${model.name}, over the ITL SLA of ${ms(r.itlMs)}`;
  }
  const batch = Math.min(itlBatch, kvBatch, engine.maxNumSeqs);
  const step = model.decodeStepMs(batch, context);
  return {
    role: 'decode',
    ...poolOf(model, r, batch / ((r.osl * step.ms) / 1000), step.extrapolated),
    context,
    batch,
    itlBatch,
    kvBatch,
    stepMs: step.ms,
  };
}

/** The layouts that can meet the SLA, or UnmeetablePlanError with every layout's reason when none can. */
function feasible<T extends PoolPlanBase>(candidates: (T | string)[], what: string): T[] {
  const plans = candidates.filter((c): c is T => typeof c !== 'string');
  if (plans.length === 0)
    throw new UnmeetablePlanError(`no ${what} replica meets the SLA: ${(candidates as string[]).join('; ')}`);
  return plans;
}

const latencyOf = (p: PrefillPoolPlan | DecodePoolPlan) => (p.role === 'prefill' ? p.prefillMs : p.stepMs);

/** The plan needing the fewest devices; on ties the lower latency, then the first listed. */
const cheapest = <T extends PrefillPoolPlan | DecodePoolPlan>(plans: T[]): T =>
  plans.reduce((best, p) =>
    p.gpus < best.gpus || (p.gpus === best.gpus && latencyOf(p) < latencyOf(best)) ? p : best,
  );

/** Each layout's candidate as an alternative of the table, the deployed one marked. */
function alternativesOf(
  models: LayoutModel[],
  candidates: (PrefillPoolPlan | DecodePoolPlan | string)[],
  chosen: string,
): LayoutAlternative[] {
  return candidates.map((c, i) => {
    const m = models[i]!;
    const base = {
      layout: m.name,
      parallelism: m.parallelism,
      gpusPerReplica: m.gpusPerReplica,
      chosen: m.name === chosen,
    };
    if (typeof c === 'string') return { ...base, reason: c };
    return {
      ...base,
      replicasNeeded: c.replicasNeeded,
      gpus: c.gpus,
      latencyMs: latencyOf(c),
      ratePerReplica: c.ratePerReplica,
    };
  });
}

const served = (p: PoolPlanBase) => p.replicas * p.ratePerReplica;

/**
 * Within a budget below the need: minReplicas of each pool, then one replica at a time to the pool that serves
 * the smaller share of the rate, while it fits. Undefined when minReplicas of each do not fit.
 */
function bestEffort<P extends PoolPlanBase, D extends PoolPlanBase>(prefill: P, decode: D, r: CheckedRequest) {
  const least = r.minReplicas * (prefill.gpusPerReplica + decode.gpusPerReplica);
  if (least > r.gpus) return undefined;
  const p = { ...prefill, replicas: r.minReplicas };
  const d = { ...decode, replicas: r.minReplicas };
  let left = r.gpus - least;
  for (;;) {
    const order = served(p) <= served(d) ? [p, d] : [d, p];
    const next = order.find((pool) => pool.gpusPerReplica <= left && pool.replicas < pool.replicasNeeded);
    if (!next) break;
    next.replicas++;
    left -= next.gpusPerReplica;
  }
  p.gpus = p.replicas * p.gpusPerReplica;
  d.gpus = d.replicas * d.gpusPerReplica;
  return { prefill: p, decode: d, gpusUsed: p.gpus + d.gpus, servableRate: Math.min(served(p), served(d)) };
}

/** Replica counts and layouts for a load; see the module comment for the arithmetic. */
export function planCapacity(profile: Profile, request: CapacityRequest): CapacityPlan {
  const r = checkRequest(request);
  const all = layoutModels(profile);
  const modelsOf = (pool: 'prefill' | 'decode') => {
    const fixed = request.layouts?.[pool];
    if (!fixed) return all;
    const name = layoutName({ tp: fixed.tp, pp: fixed.pp, ep: fixed.ep });
    const models = all.filter((m) => m.name === name);
    if (models.length === 0)
      throw new UnmeetablePlanError(
        `the ${pool} pool runs ${name}, a layout the profile does not have (it has ${all.map((m) => m.name).join(', ')})`,
      );
    return models;
  };
  const prefillModels = modelsOf('prefill');
  const decodeModels = modelsOf('decode');
  const prefillCandidates = prefillModels.map((m) => prefillFor(m, r));
  const decodeCandidates = decodeModels.map((m) => decodeFor(m, r, profile.engine));
  const prefills = feasible(prefillCandidates, 'prefill');
  const decodes = feasible(decodeCandidates, 'decode');
  const prefill = cheapest(prefills);
  const decode = cheapest(decodes);
  const gpusNeeded = prefill.gpus + decode.gpus;
  const alternatives = (p: PoolPlanBase, d: PoolPlanBase) => ({
    prefill: alternativesOf(prefillModels, prefillCandidates, p.layout),
    decode: alternativesOf(decodeModels, decodeCandidates, d.layout),
  });
  if (gpusNeeded <= r.gpus)
    return {
      status: 'ok',
      request: r,
      prefill,
      decode,
      gpusNeeded,
      gpusUsed: gpusNeeded,
      servableRate: Math.min(served(prefill), served(decode)),
      alternatives: alternatives(prefill, decode),
    };

  // Over budget: of every pair of layouts, the one that serves the most within it (then the fewest GPUs).
  let best: ReturnType<typeof bestEffort<PrefillPoolPlan, DecodePoolPlan>>;
  for (const p of prefills)
    for (const d of decodes) {
      const effort = bestEffort(p, d, r);
      if (!effort) continue;
      if (
        !best ||
        effort.servableRate > best.servableRate ||
        (effort.servableRate === best.servableRate && effort.gpusUsed < best.gpusUsed)
      )
        best = effort;
    }
  if (!best) {
    const smallest = (plans: PoolPlanBase[]) => plans.reduce((a, b) => (b.gpusPerReplica < a.gpusPerReplica ? b : a));
    const [p, d] = [smallest(prefills), smallest(decodes)];
    throw new UnmeetablePlanError(
      `a budget of ${r.gpus} GPUs cannot hold ${r.minReplicas} ${p.layout} prefill and ${r.minReplicas} ` +
        `${d.layout} decode replicas (${r.minReplicas * (p.gpusPerReplica + d.gpusPerReplica)} GPUs)`,
    );
  }
  return {
    status: 'over-budget',
    request: r,
    gpusNeeded,
    ...best,
    alternatives: alternatives(best.prefill, best.decode),
  };
}

/**
 * One replica of `model` in `pool` at a load, within the SLA (what planCapacity computes for each layout): its
 * numbers (ratePerReplica, latency), or why no replica of that layout meets the SLA. For the re-shaping rule
 * (reshape.ts), which compares layouts on the devices a pool already has.
 */
export function replicaPlan(
  profile: Pick<Profile, 'engine'>,
  model: LayoutModel,
  pool: 'prefill' | 'decode',
  load: Pick<CapacityRequest, 'rate' | 'isl' | 'osl' | 'ttftMs' | 'itlMs'>,
): PrefillPoolPlan | DecodePoolPlan | string {
  const r = checkRequest({ ...load, gpus: 1, minReplicas: 1 });
  return pool === 'prefill' ? prefillFor(model, r) : decodeFor(model, r, profile.engine);
}
