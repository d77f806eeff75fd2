import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import { HoltLinearForecaster, LoadForecast, MovingMeanForecaster, type Forecaster } from '../../lib/planner/index.js';

describe('HoltLinearForecaster', () => {
  it('nothing observed: no forecast; one value: that value', () => {
    const f = new HoltLinearForecaster();
    expect(f.predict()).toBeUndefined();
    f.observe(7);
    expect(f.predict()).toBe(7);
  });

  it('the update equations, step by step', () => {
    const f = new HoltLinearForecaster(0.5, 0.3);
    f.observe(10); // l = 10, b = 0
    f.observe(14); // l = 0.5*14 + 0.5*(10+0) = 12; b = 0.3*(12-10) + 0.7*0 = 0.6
    expect(f.predict()).toBeCloseTo(12.6, 12);
    f.observe(20); // l = 0.5*20 + 0.5*12.6 = 16.3; b = 0.3*(16.3-12) + 0.7*0.6 = 1.71
    expect(f.predict()).toBeCloseTo(18.01, 12);
  });

  it('a ramp is followed: the forecast converges on the next value of a linear series', () => {
    const f = new HoltLinearForecaster();
    for (let t = 0; t < 60; t++) f.observe(5 + 2 * t);
    expect(f.predict()).toBeCloseTo(5 + 2 * 60, 3);
    // A moving mean lags a ramp by half its window.
    const m = new MovingMeanForecaster(5);
    for (let t = 0; t < 60; t++) m.observe(5 + 2 * t);
    expect(m.predict()).toBe(5 + 2 * 57);
  });

  it('a steady value stays; a falling load is never forecast below 0', () => {
    const f = new HoltLinearForecaster();
    for (let i = 0; i < 10; i++) f.observe(3);
    expect(f.predict()).toBeCloseTo(3, 12);
    const g = new HoltLinearForecaster(0.9, 0.9);
    for (const v of [100, 50, 5, 0]) g.observe(v);
    expect(g.predict()).toBe(0);
  });

  it('bad parameters and values', () => {
    expect(() => new HoltLinearForecaster(0)).toThrow(BadArgumentError);
    expect(() => new HoltLinearForecaster(0.5, 1.5)).toThrow(BadArgumentError);
    expect(() => new HoltLinearForecaster().observe(NaN)).toThrow(BadArgumentError);
    expect(() => new MovingMeanForecaster(0)).toThrow(BadArgumentError);
    expect(() => new MovingMeanForecaster().observe(Infinity)).toThrow(BadArgumentError);
  });
});

describe('MovingMeanForecaster', () => {
  it('the mean of the last window values', () => {
    const m = new MovingMeanForecaster(3);
    expect(m.predict()).toBeUndefined();
    m.observe(1);
    expect(m.predict()).toBe(1);
    for (const v of [2, 3, 10]) m.observe(v);
    expect(m.predict()).toBe(5);
    expect(m.name).toBe('moving-mean(window=3)');
  });
});

describe('LoadForecast', () => {
  it('each quantity by its own model; lengths in whole tokens', () => {
    const f = new LoadForecast();
    expect(f.predict()).toBeUndefined();
    f.observe({ rate: 2, isl: 100, osl: 10 });
    f.observe({ rate: 4, isl: 101, osl: 11 });
    const p = f.predict()!;
    expect(p.rate).toBeCloseTo(3 + 0.3, 12); // Holt: l = 3, b = 0.3
    expect(p.isl).toBe(101); // mean 100.5, rounded up
    expect(p.osl).toBe(11);
    expect(f.models).toEqual({
      rate: 'holt(alpha=0.5, beta=0.3)',
      isl: 'moving-mean(window=5)',
      osl: 'moving-mean(window=5)',
    });
  });

  it('pluggable: any Forecaster', () => {
    class Last implements Forecaster {
      readonly name = 'last';
      private v: number | undefined;
      observe(value: number) {
        this.v = value;
      }
      predict() {
        return this.v;
      }
    }
    const f = new LoadForecast({ rate: new Last() });
    f.observe({ rate: 9, isl: 1, osl: 1 });
    f.observe({ rate: 1, isl: 1, osl: 1 });
    expect(f.predict()!.rate).toBe(1);
    expect(f.models.rate).toBe('last');
  });
});
