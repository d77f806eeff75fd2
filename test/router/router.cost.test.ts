import { randomLcg } from 'd3-random';
import { describe, expect, it } from 'vitest';
import { chooseByCost, DEFAULT_PREFILL_WEIGHT, explainCost, workerCost } from '../../lib/router/index.js';

const f = (...v: number[]) => Float64Array.from(v);

describe('workerCost', () => {
  it('is prefillWeight * (uncached + queued prefill) + decode blocks', () => {
    const terms = { uncachedBlocks: 10, queuedPrefillBlocks: 4, decodeBlocks: 7 };
    expect(workerCost(terms)).toBe(DEFAULT_PREFILL_WEIGHT * 14 + 7);
    expect(workerCost(terms, { prefillWeight: 2, temperature: 0 })).toBe(35);
    expect(workerCost(terms, { prefillWeight: 0, temperature: 0 })).toBe(7);
    expect(explainCost('decode-1', terms, { prefillWeight: 2, temperature: 0 })).toBe(
      'cost(decode-1) = 2 * (uncached 10 + queued prefill 4) + decode 7 = 35',
    );
  });
});

describe('chooseByCost', () => {
  const never = () => {
    throw new Error('no draw without a temperature');
  };

  it('the lowest cost wins, wherever it is', () => {
    expect(chooseByCost(3, f(5, 3, 4), f(0, 9, 0), f(0, 9, 0), 0, never)).toBe(1);
    expect(chooseByCost(3, f(5, 4, 3), f(0, 0, 0), f(0, 0, 0), 0, never)).toBe(2);
    expect(chooseByCost(3, f(2, 4, 3), f(9, 0, 0), f(0, 0, 0), 0, never)).toBe(0);
    expect(chooseByCost(1, f(9), f(9), f(9), 0, never)).toBe(0);
  });

  it('ties: fewer in flight, then lighter reported load, then the first', () => {
    expect(chooseByCost(3, f(4, 4, 5), f(2, 1, 0), f(0, 5, 0), 0, never)).toBe(1);
    expect(chooseByCost(3, f(4, 4, 4), f(1, 1, 1), f(3, 2, 2), 0, never)).toBe(1);
    expect(chooseByCost(3, f(4, 4, 4), f(1, 1, 1), f(2, 2, 2), 0, never)).toBe(0);
  });

  it('temperature: a draw that favours low costs, every candidate possible, reproducible with a seed', () => {
    const draw = (seed: number, temperature: number) => {
      const rng = randomLcg(seed);
      const counts = [0, 0, 0];
      for (let i = 0; i < 4000; i++)
        counts[chooseByCost(3, f(10, 20, 40), f(0, 0, 0), f(0, 0, 0), temperature, rng)]!++;
      return counts;
    };
    const warm = draw(0.25, 0.5);
    expect(warm[0]).toBeGreaterThan(warm[1]!);
    expect(warm[1]).toBeGreaterThan(warm[2]!);
    expect(warm[2]).toBeGreaterThan(0);
    expect(draw(0.25, 0.5)).toEqual(warm);
    // Hotter: flatter.
    const hot = draw(0.25, 50);
    expect(hot[0]! - hot[2]!).toBeLessThan(warm[0]! - warm[2]!);
    // p(0) / p(2) = exp((40 - 10) / (0.5 * 40)) = e^1.5 ~ 4.48
    expect(warm[0]! / warm[2]!).toBeGreaterThan(3.5);
    expect(warm[0]! / warm[2]!).toBeLessThan(5.7);
    // Equal costs: uniform.
    const rng = randomLcg(0.5);
    const even = [0, 0];
    for (let i = 0; i < 2000; i++) even[chooseByCost(2, f(0, 0), f(0, 0), f(0, 0), 1, rng)]!++;
    expect(Math.abs(even[0]! - even[1]!)).toBeLessThan(200);
  });

  it('the draw maps the uniform onto the candidates in order (boundaries)', () => {
    // Equal costs: weights 1, 1; u in [0, 0.5) -> 0, [0.5, 1) -> 1.
    expect(chooseByCost(2, f(3, 3), f(0, 0), f(0, 0), 1, () => 0)).toBe(0);
    expect(chooseByCost(2, f(3, 3), f(0, 0), f(0, 0), 1, () => 0.4999)).toBe(0);
    expect(chooseByCost(2, f(3, 3), f(0, 0), f(0, 0), 1, () => 0.5)).toBe(1);
    expect(chooseByCost(2, f(3, 3), f(0, 0), f(0, 0), 1, () => 0.999999)).toBe(1);
  });
});
