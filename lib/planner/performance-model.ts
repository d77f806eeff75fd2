/**
 * A profile layout as functions: prefill time against input length, decode step time against batch and context.
 *
 * Monotone by construction. A short profile is noisy (a longer prompt measured a little faster than a shorter
 * one), and a planner that reads noise as signal gives answers that jump. So the measured points are fitted
 * first, and only then interpolated:
 * - prefill: running maximum over ISL (a longer prompt never takes less time);
 * - decode: running maximum over context for each batch, then over batch for each context, then the time per
 *   sequence capped so that it never rises with the batch (t(B_i) <= t(B_i-1) x B_i / B_i-1: a larger batch
 *   never serves fewer tokens per second). Linear (bilinear) interpolation keeps all three properties.
 * These are what make the planner monotone: more input never fewer prefill replicas, more output never fewer
 * decode replicas.
 *
 * Outside the measured range (documented, each query says when it happened with `extrapolated`):
 * - below the smallest ISL, batch or context: the value at the smallest (an over-estimate: conservative);
 * - above the largest ISL: linear from the last point with the larger of the last segment's slope and the
 *   average time per token (never less than proportional to the length);
 * - above the largest context: every batch's time grows by one factor, 1 + g (context / largest - 1), where g
 *   is the steepest relative growth of the last context segment over all batches, in [0, 1] (g = 1: proportional
 *   to the context; with one context measured, g = 1, an over-estimate). One factor for all batches keeps the
 *   monotone properties, which a per-batch slope would not;
 * - above the largest batch: Infinity. The planner never uses a batch it has not measured.
 * A decode point that was not measured (its batch x context did not fit the KV pool) is Infinity too, and so is
 * anything interpolated from it.
 */
import { layoutName, type Parallelism, type ProfileLayout } from './profile.js';

export interface Estimate {
  ms: number;
  /** The query was outside the measured range (see the module comment for what is assumed there). */
  extrapolated: boolean;
}

/** Index i with xs[i] <= x < xs[i + 1] (xs ascending, x within [xs[0], xs[last]]); the last index at the top. */
function bracket(xs: readonly number[], x: number): number {
  let lo = 0;
  let hi = xs.length - 1;
  if (x >= xs[hi]!) return hi;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (xs[mid]! <= x) lo = mid;
    else hi = mid;
  }
  return lo;
}

/** a + w (b - a), where an infinite end gives Infinity unless its weight is 0. */
function lerp(a: number, b: number, w: number): number {
  if (w <= 0) return a;
  if (w >= 1) return b;
  if (!Number.isFinite(a) || !Number.isFinite(b)) return Infinity;
  return a + w * (b - a);
}

function runningMax(values: number[]): number[] {
  let max = -Infinity;
  return values.map((v) => (max = Math.max(max, v)));
}

export class LayoutModel {
  readonly name: string;
  readonly parallelism: Parallelism;
  readonly gpusPerReplica: number;
  readonly kvCapacityTokens: number;
  readonly maxModelLen: number;
  /** Ascending, distinct. */
  readonly isls: readonly number[];
  /** Fitted prefill ms at each of `isls`. */
  readonly prefillMsAt: readonly number[];
  readonly batches: readonly number[];
  readonly contexts: readonly number[];
  /** Fitted step ms, [batch index][context index]; Infinity where not measured. */
  readonly stepMsAt: readonly (readonly number[])[];
  /** g of the module comment: relative growth of step time with context above the largest context. */
  readonly contextGrowth: number;

  constructor(layout: ProfileLayout) {
    this.name = layoutName(layout.parallelism);
    this.parallelism = layout.parallelism;
    this.gpusPerReplica = layout.gpusPerReplica;
    this.kvCapacityTokens = layout.kvCapacityTokens;
    this.maxModelLen = layout.maxModelLen;

    const prefill = [...layout.prefill].sort((a, b) => a.isl - b.isl);
    this.isls = prefill.map((p) => p.isl);
    this.prefillMsAt = runningMax(prefill.map((p) => p.ms));

    this.batches = [...new Set(layout.decode.map((d) => d.batch))].sort((a, b) => a - b);
    this.contexts = [...new Set(layout.decode.map((d) => d.context))].sort((a, b) => a - b);
    const grid = this.batches.map(() => this.contexts.map(() => Infinity));
    for (const d of layout.decode) grid[this.batches.indexOf(d.batch)]![this.contexts.indexOf(d.context)] = d.stepMs;
    // Over context, for each batch.
    for (let i = 0; i < grid.length; i++) grid[i] = runningMax(grid[i]!);
    // Over batch, for each context: never faster with more sequences, never slower per sequence.
    for (let j = 0; j < this.contexts.length; j++)
      for (let i = 1; i < grid.length; i++) {
        const prev = grid[i - 1]![j]!;
        let t = Math.max(grid[i]![j]!, prev);
        if (Number.isFinite(t)) t = Math.min(t, (prev * this.batches[i]!) / this.batches[i - 1]!);
        grid[i]![j] = t;
      }
    this.stepMsAt = grid;
    const cs = this.contexts;
    let growth = cs.length > 1 ? 0 : 1;
    if (cs.length > 1) {
      const [cPrev, cLast] = [cs[cs.length - 2]!, cs[cs.length - 1]!];
      for (const row of grid) {
        const [prev, last] = [row[cs.length - 2]!, row[cs.length - 1]!];
        if (Number.isFinite(last)) growth = Math.max(growth, ((last - prev) / last) * (cLast / (cLast - cPrev)));
      }
    }
    this.contextGrowth = Math.min(1, Math.max(0, growth));
  }

  /** Time of one prompt of `isl` tokens alone on a replica. */
  prefillMs(isl: number): Estimate {
    const xs = this.isls;
    const ys = this.prefillMsAt;
    const last = xs.length - 1;
    if (isl < xs[0]!) return { ms: ys[0]!, extrapolated: true };
    if (isl > xs[last]!) {
      const perToken = ys[last]! / xs[last]!;
      const slope = last > 0 ? Math.max(perToken, (ys[last]! - ys[last - 1]!) / (xs[last]! - xs[last - 1]!)) : perToken;
      return { ms: ys[last]! + slope * (isl - xs[last]!), extrapolated: true };
    }
    const i = bracket(xs, isl);
    if (i === last) return { ms: ys[last]!, extrapolated: false };
    return { ms: lerp(ys[i]!, ys[i + 1]!, (isl - xs[i]!) / (xs[i + 1]! - xs[i]!)), extrapolated: false };
  }

  /** Step time of one batch's row `i` at `context` (extrapolated above the largest context). */
  private rowAt(i: number, context: number): number {
    const cs = this.contexts;
    const row = this.stepMsAt[i]!;
    const last = cs.length - 1;
    if (context <= cs[0]!) return row[0]!;
    if (context > cs[last]!) return row[last]! * (1 + this.contextGrowth * (context / cs[last]! - 1));
    const j = bracket(cs, context);
    if (j === last) return row[last]!;
    return lerp(row[j]!, row[j + 1]!, (context - cs[j]!) / (cs[j + 1]! - cs[j]!));
  }

  /** Time of one decode step of `batch` sequences with `context` tokens each. Infinity above the largest batch. */
  decodeStepMs(batch: number, context: number): Estimate {
    const bs = this.batches;
    const cs = this.contexts;
    const last = bs.length - 1;
    const extrapolated = batch < bs[0]! || batch > bs[last]! || context < cs[0]! || context > cs[cs.length - 1]!;
    if (batch > bs[last]!) return { ms: Infinity, extrapolated };
    if (batch <= bs[0]!) return { ms: this.rowAt(0, context), extrapolated };
    const i = bracket(bs, batch);
    if (i === last) return { ms: this.rowAt(last, context), extrapolated };
    const w = (batch - bs[i]!) / (bs[i + 1]! - bs[i]!);
    return { ms: lerp(this.rowAt(i, context), this.rowAt(i + 1, context), w), extrapolated };
  }

  /** The largest batch measured. */
  get maxBatch(): number {
    return this.batches[this.batches.length - 1]!;
  }
}

/** Every layout of a profile, as models. */
export function layoutModels(profile: { layouts: readonly ProfileLayout[] }): LayoutModel[] {
  return profile.layouts.map((l) => new LayoutModel(l));
}
