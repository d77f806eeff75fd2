/**
 * The random parts of a serving workload, seeded: request arrivals (Poisson, constant, gamma with a burstiness
 * factor) and prompt / output lengths (fixed, uniform, normal). Draws come from d3-random over a seeded LCG, so
 * a seed gives the same workload on every machine and for every deployment it is run against.
 *
 * Arrivals are drawn once as unit intervals (mean 1) and scaled by 1 / rate: a sweep over rates replays the
 * same arrival pattern, compressed (common random numbers: the points of a sweep differ by the rate only).
 *   poisson   intervals ~ Exponential(1): the arrivals of independent clients.
 *   gamma     intervals ~ Gamma(shape = burstiness, scale = 1 / burstiness), mean 1, coefficient of variation
 *             1 / sqrt(burstiness): burstiness 1 is Poisson, below 1 burstier, above 1 more regular (vLLM's
 *             --burstiness).
 *   constant  intervals = 1.
 */
import { randomExponential, randomGamma, randomInt, randomLcg, randomNormal } from 'd3-random';
import { BadArgumentError } from '../errors.js';

export const ARRIVAL_KINDS = ['poisson', 'constant', 'gamma'] as const;
export type ArrivalKind = (typeof ARRIVAL_KINDS)[number];

export interface ArrivalSpec {
  kind: ArrivalKind;
  /** Gamma's shape; 1 for Poisson. */
  burstiness: number;
}

/** A length distribution: `N`, `uniform:MIN:MAX` (inclusive) or `normal:MEAN:STD` (rounded, at least 1). */
export type LengthSpec =
  | { kind: 'fixed'; value: number }
  | { kind: 'uniform'; min: number; max: number }
  | { kind: 'normal'; mean: number; std: number };

/** A seeded source of uniforms in [0, 1), one per purpose so that changing one part leaves the others alone. */
export function seededSource(seed: number, stream: string): () => number {
  // FNV-1a of the stream name, mixed with the seed: independent sequences per purpose.
  let h = 0x811c9dc5;
  for (const c of stream) h = Math.imul(h ^ c.charCodeAt(0), 0x01000193) >>> 0;
  return randomLcg(((h ^ Math.imul(seed >>> 0, 0x9e3779b1)) >>> 0) / 2 ** 32);
}

/** `count` unit inter-arrival intervals (mean 1; scale by 1000 / rate for milliseconds). */
export function unitIntervals(spec: ArrivalSpec, count: number, source: () => number): Float64Array {
  const out = new Float64Array(count);
  if (spec.kind === 'constant') return out.fill(1);
  const draw =
    spec.kind === 'poisson'
      ? randomExponential.source(source)(1)
      : randomGamma.source(source)(spec.burstiness, 1 / spec.burstiness);
  for (let i = 0; i < count; i++) out[i] = draw();
  return out;
}

/** Send times (ms from the start) at `rate` requests per second: the first at 0, then the intervals. */
export function arrivalTimesMs(intervals: Float64Array, rate: number): Float64Array {
  const out = new Float64Array(intervals.length);
  let t = 0;
  for (let i = 1; i < intervals.length; i++) {
    t += (intervals[i - 1]! * 1000) / rate;
    out[i] = t;
  }
  return out;
}

/** Parses a length distribution; `what` names the option in errors. Throws BadArgumentError. */
export function parseLengthSpec(text: string, what: string): LengthSpec {
  const fail = (): never => {
    throw new BadArgumentError(
      `${what} must be N, uniform:MIN:MAX or normal:MEAN:STD with positive integers (MIN <= MAX) (got '${text}')`,
    );
  };
  const int = (s: string | undefined, min: number): number => {
    const n = Number(s);
    if (s === undefined || s.trim() === '' || !Number.isSafeInteger(n) || n < min) fail();
    return n;
  };
  const parts = text.split(':');
  if (parts.length === 1) return { kind: 'fixed', value: int(parts[0], 1) };
  if (parts[0] === 'uniform' && parts.length === 3) {
    const min = int(parts[1], 1);
    const max = int(parts[2], 1);
    if (min > max) fail();
    return { kind: 'uniform', min, max };
  }
  if (parts[0] === 'normal' && parts.length === 3)
    return { kind: 'normal', mean: int(parts[1], 1), std: int(parts[2], 0) };
  return fail();
}

/** The distribution as written on the command line. */
export function formatLengthSpec(spec: LengthSpec): string {
  if (spec.kind === 'fixed') return String(spec.value);
  if (spec.kind === 'uniform') return `uniform:${spec.min}:${spec.max}`;
  return `normal:${spec.mean}:${spec.std}`;
}

/** `count` lengths drawn from `spec`: integers >= 1. */
export function drawLengths(spec: LengthSpec, count: number, source: () => number): Int32Array {
  const out = new Int32Array(count);
  if (spec.kind === 'fixed') return out.fill(spec.value);
  let draw: () => number;
  if (spec.kind === 'uniform') draw = randomInt.source(source)(spec.min, spec.max + 1);
  else {
    const normal = randomNormal.source(source)(spec.mean, spec.std);
    draw = () => Math.max(1, Math.round(normal()));
  }
  for (let i = 0; i < count; i++) out[i] = draw();
  return out;
}

/** The largest length `spec` can give (normal: mean + 6 std), for checks against the context. */
export function maxLength(spec: LengthSpec): number {
  if (spec.kind === 'fixed') return spec.value;
  if (spec.kind === 'uniform') return spec.max;
  return Math.round(spec.mean + 6 * spec.std);
}
