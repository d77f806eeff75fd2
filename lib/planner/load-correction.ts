/**
 * The fast loop between planning intervals: add or remove one worker when the engines say the plan is off.
 *
 * Rule, per pool (prefill judged by TTFT, decode by ITL, each engine's recent value):
 * - an observation *misses* when every engine of the pool is over its SLA, and is *inside* when every engine is
 *   under `scaleDownBelow` x SLA (a pool with no values, no traffic, is inside); anything else is neither, and
 *   resets both counts;
 * - `scaleUpAfter` consecutive misses add one replica; `scaleDownAfter` consecutive insides remove one (never
 *   below minReplicas);
 * - an add that does not fit maxGpus takes a replica from the other pool instead (a move: the worker changes
 *   role) when that pool is inside now, above minReplicas and not cooling down; else it waits;
 * - after a change a pool cools down for `cooldownMs`: no change, counts start again from zero.
 * A re-shape (reshape.ts, decided by the Planner when this correction holds) is a change too: `reshaped`.
 * Hysteresis (every engine, N in a row, a low-water mark well under the SLA) and the cool-down are what keep a
 * noisy load from moving workers back and forth: at most one change per pool per cool-down, and a removal
 * needs the pool to be far inside its SLA for a while, not just under it.
 */
import { BadArgumentError } from '../errors.js';

export const POOLS = ['prefill', 'decode'] as const;
export type Pool = (typeof POOLS)[number];

export interface LoadCorrectionOptions {
  ttftMs: number;
  itlMs: number;
  /** GPUs both pools may take together. */
  maxGpus: number;
  /** Fewest replicas of each pool. Default 1. */
  minReplicas?: number;
  /** GPUs one replica of each pool takes. Default 1 each. */
  gpusPerReplica?: Partial<Record<Pool, number>>;
  /** Consecutive misses before a replica is added. Default 3. */
  scaleUpAfter?: number;
  /** Consecutive insides before a replica is removed. Default 5. */
  scaleDownAfter?: number;
  /** Inside: every engine under this share of its SLA. Default 0.5. */
  scaleDownBelow?: number;
  /** Quiet time of a pool after a change. Default 60 s. */
  cooldownMs?: number;
}

/** Each engine's recent latency (e.g. its p50 over the last few seconds); engines with no requests left out. */
export interface LoadObservation {
  /** Milliseconds on any monotonic clock (the cool-down is measured on it). */
  atMs: number;
  /** TTFT of each prefill engine. */
  prefillTtftMs: readonly number[];
  /** ITL of each decode engine. */
  decodeItlMs: readonly number[];
}

export type PoolVerdict = 'miss' | 'inside' | 'neither';

export interface PoolState {
  replicas: number;
  verdict: PoolVerdict;
  misses: number;
  insides: number;
  /** The cool-down ends at this atMs (0: none). */
  coolingUntilMs: number;
}

export type LoadAction =
  | { kind: 'hold' }
  | { kind: 'add'; pool: Pool }
  | { kind: 'remove'; pool: Pool }
  | { kind: 'move'; from: Pool; to: Pool }
  /** The pool's replicas run another layout (reshape.ts; the Planner decides it, not the correction). */
  | { kind: 'reshape'; pool: Pool; from: string; to: string; replicas: number };

export interface LoadCorrection {
  action: LoadAction;
  /** Replicas after the action. */
  replicas: Record<Pool, number>;
  pools: Record<Pool, PoolState>;
  reason: string;
}

export class LoadCorrector {
  private o: Required<Omit<LoadCorrectionOptions, 'gpusPerReplica'>> & {
    gpusPerReplica: Record<Pool, number>;
  };
  private readonly state: Record<Pool, PoolState>;

  constructor(options: LoadCorrectionOptions, replicas: Record<Pool, number>) {
    this.o = {
      minReplicas: 1,
      scaleUpAfter: 3,
      scaleDownAfter: 5,
      scaleDownBelow: 0.5,
      cooldownMs: 60_000,
      ...options,
      gpusPerReplica: { prefill: 1, decode: 1, ...options.gpusPerReplica },
    };
    const o = this.o;
    for (const [name, v] of [
      ['ttftMs', o.ttftMs],
      ['itlMs', o.itlMs],
    ] as const)
      if (!(v > 0 && Number.isFinite(v)))
        throw new BadArgumentError(`${name} must be a positive number (got ${String(v)})`);
    for (const [name, v] of [
      ['maxGpus', o.maxGpus],
      ['minReplicas', o.minReplicas],
      ['scaleUpAfter', o.scaleUpAfter],
      ['scaleDownAfter', o.scaleDownAfter],
      ['gpusPerReplica.prefill', o.gpusPerReplica.prefill],
      ['gpusPerReplica.decode', o.gpusPerReplica.decode],
    ] as const)
      if (!Number.isSafeInteger(v) || v < 1)
        throw new BadArgumentError(`${name} must be a positive integer (got ${String(v)})`);
    if (!(o.scaleDownBelow > 0 && o.scaleDownBelow < 1))
      throw new BadArgumentError(`scaleDownBelow must be in (0, 1) (got ${String(o.scaleDownBelow)})`);
    if (!(o.cooldownMs >= 0)) throw new BadArgumentError(`cooldownMs must be >= 0 (got ${String(o.cooldownMs)})`);
    const fresh = (n: number): PoolState => ({
      replicas: n,
      verdict: 'neither',
      misses: 0,
      insides: 0,
      coolingUntilMs: 0,
    });
    this.state = { prefill: fresh(replicas.prefill), decode: fresh(replicas.decode) };
    this.setReplicas(replicas);
  }

  /**
   * Replicas set from outside (the SLA plan of a new interval, with its layouts' GPUs per replica): counts start
   * again, and with `atMs` a cool-down starts, so that the correction does not undo the plan at once.
   */
  setReplicas(replicas: Record<Pool, number>, atMs?: number, gpusPerReplica?: Record<Pool, number>): void {
    for (const pool of POOLS) {
      const g = gpusPerReplica?.[pool];
      if (g !== undefined && (!Number.isSafeInteger(g) || g < 1))
        throw new BadArgumentError(`gpusPerReplica.${pool} must be a positive integer (got ${g})`);
    }
    if (gpusPerReplica) this.o.gpusPerReplica = { ...gpusPerReplica };
    for (const pool of POOLS) {
      const n = replicas[pool];
      if (!Number.isSafeInteger(n) || n < 0)
        throw new BadArgumentError(`${pool} replicas must be an integer >= 0 (got ${n})`);
      const s = this.state[pool];
      s.replicas = n;
      s.misses = 0;
      s.insides = 0;
      if (atMs !== undefined) s.coolingUntilMs = atMs + this.o.cooldownMs;
    }
  }

  get replicas(): Record<Pool, number> {
    return { prefill: this.state.prefill.replicas, decode: this.state.decode.replicas };
  }

  /** Devices one replica of each pool takes. */
  get gpusPerReplica(): Record<Pool, number> {
    return { ...this.o.gpusPerReplica };
  }

  /** Each pool's replicas, verdict, counts and cool-down. */
  poolStates(): Record<Pool, PoolState> {
    return { prefill: { ...this.state.prefill }, decode: { ...this.state.decode } };
  }

  /** Whether `pool` changed less than the cool-down before `atMs`. */
  cooling(pool: Pool, atMs: number): boolean {
    return atMs < this.state[pool].coolingUntilMs;
  }

  /**
   * `pool` was re-shaped: `replicas` replicas of `gpusPerReplica` devices from now on. Its counts start again and
   * it cools down, as after any other change.
   */
  reshaped(pool: Pool, replicas: number, gpusPerReplica: number, atMs: number): void {
    if (!Number.isSafeInteger(replicas) || replicas < 1)
      throw new BadArgumentError(`${pool} replicas must be a positive integer (got ${replicas})`);
    if (!Number.isSafeInteger(gpusPerReplica) || gpusPerReplica < 1)
      throw new BadArgumentError(`gpusPerReplica.${pool} must be a positive integer (got ${gpusPerReplica})`);
    this.o.gpusPerReplica = { ...this.o.gpusPerReplica, [pool]: gpusPerReplica };
    const s = this.state[pool];
    s.replicas = replicas;
    s.misses = 0;
    s.insides = 0;
    s.coolingUntilMs = atMs + this.o.cooldownMs;
  }

  private gpusUsed(): number {
    return POOLS.reduce((sum, p) => sum + this.state[p].replicas * this.o.gpusPerReplica[p], 0);
  }

  private verdict(values: readonly number[], sla: number): PoolVerdict {
    for (const v of values)
      if (typeof v !== 'number' || Number.isNaN(v) || v < 0)
        throw new BadArgumentError(`a latency must be a number >= 0 (got ${String(v)})`);
    if (values.length > 0 && values.every((v) => v > sla)) return 'miss';
    if (values.every((v) => v < this.o.scaleDownBelow * sla)) return 'inside';
    return 'neither';
  }

  /** Takes one observation; returns what to do now (at most one change). */
  observe(obs: LoadObservation): LoadCorrection {
    if (!Number.isFinite(obs.atMs))
      throw new BadArgumentError(`atMs must be a finite number (got ${String(obs.atMs)})`);
    const now = obs.atMs;
    const verdicts: Record<Pool, PoolVerdict> = {
      prefill: this.verdict(obs.prefillTtftMs, this.o.ttftMs),
      decode: this.verdict(obs.decodeItlMs, this.o.itlMs),
    };
    for (const pool of POOLS) {
      const s = this.state[pool];
      s.verdict = verdicts[pool];
      s.misses = s.verdict === 'miss' ? s.misses + 1 : 0;
      s.insides = s.verdict === 'inside' ? s.insides + 1 : 0;
    }
    const cooling = (p: Pool) => this.cooling(p, now);
    const changed = (...pools: Pool[]) => {
      for (const p of pools) {
        const s = this.state[p];
        s.misses = 0;
        s.insides = 0;
        s.coolingUntilMs = now + this.o.cooldownMs;
      }
    };
    const other = (p: Pool): Pool => (p === 'prefill' ? 'decode' : 'prefill');
    const sla = (p: Pool) => (p === 'prefill' ? `TTFT ${this.o.ttftMs} ms` : `ITL ${this.o.itlMs} ms`);

    let action: LoadAction = { kind: 'hold' };
    let reason = 'within the hysteresis band';
    for (const pool of POOLS) {
      const s = this.state[pool];
      if (s.misses < this.o.scaleUpAfter) continue;
      if (cooling(pool)) {
        reason = `${pool} misses its ${sla(pool)} but cools down until ${s.coolingUntilMs}`;
        continue;
      }
      const gpr = this.o.gpusPerReplica[pool];
      const from = other(pool);
      const donor = this.state[from];
      if (this.gpusUsed() + gpr <= this.o.maxGpus) {
        s.replicas++;
        changed(pool);
        action = { kind: 'add', pool };
        reason = `every ${pool} engine missed its ${sla(pool)} ${this.o.scaleUpAfter} times in a row`;
      } else if (
        donor.verdict === 'inside' &&
        donor.replicas > this.o.minReplicas &&
        !cooling(from) &&
        this.o.gpusPerReplica[from] === gpr
      ) {
        donor.replicas--;
        s.replicas++;
        changed(pool, from);
        action = { kind: 'move', from, to: pool };
        reason = `every ${pool} engine missed its ${sla(pool)} ${this.o.scaleUpAfter} times in a row; the GPU budget (${this.o.maxGpus}) is full and ${from} is well inside its ${sla(from)}`;
      } else {
        reason = `${pool} misses its ${sla(pool)} but the GPU budget (${this.o.maxGpus}) is full and ${from} has no replica to spare`;
        continue;
      }
      break;
    }
    if (action.kind === 'hold')
      for (const pool of POOLS) {
        const s = this.state[pool];
        if (s.insides < this.o.scaleDownAfter || s.replicas <= this.o.minReplicas || cooling(pool)) continue;
        s.replicas--;
        changed(pool);
        action = { kind: 'remove', pool };
        reason = `every ${pool} engine was under ${this.o.scaleDownBelow} x its ${sla(pool)} ${this.o.scaleDownAfter} times in a row`;
        break;
      }
    return {
      action,
      replicas: this.replicas,
      pools: this.poolStates(),
      reason,
    };
  }
}
