import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import {
  arrivalTimesMs,
  drawLengths,
  parseLengthSpec,
  seededSource,
  unitIntervals,
  type LengthSpec,
} from '../../lib/bench/distributions.js';

// The workload's random parts, checked as statistics over a seeded draw: each tolerance is several standard
// errors wide for its sample size, and the seed makes the draw (hence the verdict) the same on every run.
const N = 20_000;

function moments(xs: ArrayLike<number>) {
  let sum = 0;
  for (let i = 0; i < xs.length; i++) sum += xs[i]!;
  const mean = sum / xs.length;
  let sq = 0;
  for (let i = 0; i < xs.length; i++) sq += (xs[i]! - mean) ** 2;
  const std = Math.sqrt(sq / (xs.length - 1));
  return { mean, std, cv: std / mean };
}

describe('arrival processes', () => {
  it('Poisson: exponential intervals of mean 1 (CV 1, median ln 2); per-second counts have variance = mean', () => {
    const iv = unitIntervals({ kind: 'poisson', burstiness: 1 }, N, seededSource(7, 'arrivals'));
    const m = moments(iv);
    expect(m.mean).toBeCloseTo(1, 1);
    expect(Math.abs(m.mean - 1)).toBeLessThan(0.03);
    expect(Math.abs(m.cv - 1)).toBeLessThan(0.04);
    const belowMedian = iv.filter((x) => x < Math.LN2).length / N;
    expect(Math.abs(belowMedian - 0.5)).toBeLessThan(0.015);
    // A Poisson process at 10 req/s: counts in 1 s windows have mean 10 and variance 10 (dispersion 1).
    const at = arrivalTimesMs(iv, 10);
    const windows = new Array(Math.floor(at[N - 1]! / 1000)).fill(0) as number[];
    for (const t of at) if (t < windows.length * 1000) windows[Math.floor(t / 1000)]!++;
    const c = moments(windows);
    expect(Math.abs(c.mean - 10)).toBeLessThan(0.3);
    expect(Math.abs(c.std ** 2 / c.mean - 1)).toBeLessThan(0.12);
  });

  it('gamma: mean 1 at every burstiness, CV 1 / sqrt(burstiness)', () => {
    for (const burstiness of [0.25, 1, 4]) {
      const m = moments(unitIntervals({ kind: 'gamma', burstiness }, N, seededSource(3, 'arrivals')));
      expect(Math.abs(m.mean - 1), `burstiness ${burstiness}`).toBeLessThan(0.05);
      expect(
        Math.abs(m.cv - 1 / Math.sqrt(burstiness)) / (1 / Math.sqrt(burstiness)),
        `burstiness ${burstiness}`,
      ).toBeLessThan(0.06);
    }
  });

  it('constant: every interval 1; send times at exactly 1000 / rate ms apart, the first at 0', () => {
    const iv = unitIntervals({ kind: 'constant', burstiness: 1 }, 5, seededSource(0, 'arrivals'));
    expect([...iv]).toEqual([1, 1, 1, 1, 1]);
    expect([...arrivalTimesMs(iv, 4)]).toEqual([0, 250, 500, 750, 1000]);
  });

  it('a rate scales the same pattern: doubling the rate halves every send time', () => {
    const iv = unitIntervals({ kind: 'poisson', burstiness: 1 }, 50, seededSource(11, 'arrivals'));
    const slow = arrivalTimesMs(iv, 2);
    const fast = arrivalTimesMs(iv, 4);
    for (let i = 0; i < 50; i++) expect(fast[i]).toBeCloseTo(slow[i]! / 2, 9);
  });

  it('a seed gives the same draw; another seed or stream another', () => {
    const draw = (seed: number, stream: string) => [
      ...unitIntervals({ kind: 'poisson', burstiness: 1 }, 20, seededSource(seed, stream)),
    ];
    expect(draw(5, 'arrivals')).toEqual(draw(5, 'arrivals'));
    expect(draw(5, 'arrivals')).not.toEqual(draw(6, 'arrivals'));
    expect(draw(5, 'arrivals')).not.toEqual(draw(5, 'isl'));
  });
});

describe('length distributions', () => {
  const draw = (spec: LengthSpec) => drawLengths(spec, N, seededSource(1, 'isl'));

  it('fixed: every length the same', () => {
    expect(new Set(draw({ kind: 'fixed', value: 3000 }))).toEqual(new Set([3000]));
  });

  it('uniform: integers MIN..MAX inclusive, each about as often, mean (MIN + MAX) / 2', () => {
    const xs = draw({ kind: 'uniform', min: 10, max: 20 });
    const counts = new Map<number, number>();
    for (const x of xs) counts.set(x, (counts.get(x) ?? 0) + 1);
    expect([...counts.keys()].sort((a, b) => a - b)).toEqual([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]);
    for (const c of counts.values()) expect(Math.abs(c / N - 1 / 11)).toBeLessThan(0.008);
    expect(Math.abs(moments(xs).mean - 15)).toBeLessThan(0.1);
  });

  it('normal: mean and standard deviation as asked, rounded to integers, never below 1', () => {
    const xs = draw({ kind: 'normal', mean: 1000, std: 100 });
    const m = moments(xs);
    expect(Math.abs(m.mean - 1000)).toBeLessThan(3);
    expect(Math.abs(m.std - 100)).toBeLessThan(3);
    expect(xs.every((x) => Number.isInteger(x))).toBe(true);
    const clipped = draw({ kind: 'normal', mean: 2, std: 5 });
    expect(Math.min(...clipped)).toBe(1);
  });

  it('parses N, uniform:MIN:MAX and normal:MEAN:STD; anything else names the option', () => {
    expect(parseLengthSpec('3000', '--isl')).toEqual({ kind: 'fixed', value: 3000 });
    expect(parseLengthSpec('uniform:5:5', '--isl')).toEqual({ kind: 'uniform', min: 5, max: 5 });
    expect(parseLengthSpec('normal:150:0', '--osl')).toEqual({ kind: 'normal', mean: 150, std: 0 });
    for (const bad of ['0', '-3', '1.5', '', 'uniform:6:5', 'uniform:0:5', 'normal:100', 'gauss:1:2', 'uniform:1:x']) {
      expect(() => parseLengthSpec(bad, '--isl'), bad).toThrow(BadArgumentError);
      expect(() => parseLengthSpec(bad, '--isl'), bad).toThrow(/^--isl must be N, uniform:MIN:MAX or normal:MEAN:STD/);
    }
  });
});
