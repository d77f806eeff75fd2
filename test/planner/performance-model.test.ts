import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { LayoutModel } from '../../lib/planner/index.js';
import { prefillCost, stepCost, syntheticLayout } from './synthetic.js';

describe('LayoutModel: interpolation', () => {
  const model = new LayoutModel(syntheticLayout());

  it('is exact at measured points and linear between them', () => {
    expect(model.prefillMs(512)).toEqual({ ms: prefillCost(512), extrapolated: false });
    const mid = (prefillCost(512) + prefillCost(1024)) / 2;
    expect(model.prefillMs(768).ms).toBeCloseTo(mid, 9);
    expect(model.decodeStepMs(8, 1024)).toEqual({ ms: stepCost(8, 1024), extrapolated: false });
    // Bilinear between batches 8, 16 and contexts 1024, 4096.
    const corners = [stepCost(8, 1024), stepCost(16, 1024), stepCost(8, 4096), stepCost(16, 4096)];
    const expected = 0.25 * corners.reduce((a, b) => a + b, 0);
    expect(model.decodeStepMs(12, 2560).ms).toBeCloseTo(expected, 9);
  });

  it('below the measured range: the value at the smallest point (conservative)', () => {
    expect(model.prefillMs(10)).toEqual({ ms: prefillCost(128), extrapolated: true });
    expect(model.decodeStepMs(1, 16)).toEqual({ ms: stepCost(1, 256), extrapolated: true });
  });

  it('above the largest ISL: never less than proportional to the length', () => {
    const last = prefillCost(8192);
    const slope = (prefillCost(8192) - prefillCost(4096)) / 4096;
    const e = model.prefillMs(16384);
    expect(e.extrapolated).toBe(true);
    expect(e.ms).toBeCloseTo(last + Math.max(slope, last / 8192) * 8192, 9);
    expect(e.ms).toBeGreaterThanOrEqual((last * 16384) / 8192);
  });

  it('above the largest batch: Infinity (the planner never uses an unmeasured batch)', () => {
    expect(model.decodeStepMs(257, 1024).ms).toBe(Infinity);
  });

  it('above the largest context: one growth factor for every batch, at most proportional', () => {
    const g = model.contextGrowth;
    expect(g).toBeGreaterThan(0);
    expect(g).toBeLessThanOrEqual(1);
    for (const b of [1, 64]) {
      const e = model.decodeStepMs(b, 32768);
      expect(e.extrapolated).toBe(true);
      expect(e.ms).toBeCloseTo(stepCost(b, 16384) * (1 + g), 9);
      expect(e.ms).toBeGreaterThan(stepCost(b, 16384));
    }
    // One context measured: proportional.
    const one = new LayoutModel(syntheticLayout({ context: [1000] }));
    expect(one.decodeStepMs(4, 3000).ms).toBeCloseTo(3 * stepCost(4, 1000), 9);
  });

  it('a point not measured (did not fit the KV pool) is Infinity, and so is what leans on it', () => {
    const layout = syntheticLayout({ batch: [1, 2, 4], context: [256, 1024] });
    layout.decode = layout.decode.filter((d) => !(d.batch === 4 && d.context === 1024));
    const m = new LayoutModel(layout);
    expect(m.decodeStepMs(4, 1024).ms).toBe(Infinity);
    expect(m.decodeStepMs(3, 1024).ms).toBe(Infinity);
    expect(m.decodeStepMs(4, 512).ms).toBe(Infinity);
    expect(m.decodeStepMs(2, 1024).ms).toBe(stepCost(2, 1024));
    expect(m.decodeStepMs(4, 256).ms).toBe(stepCost(4, 256));
  });
});

describe('LayoutModel: monotone whatever the noise', () => {
  const noisyLayout = fc
    .record({ noise: fc.double({ min: 0, max: 0.6, noNaN: true }), seed: fc.integer({ min: 0, max: 1e6 }) })
    .map(({ noise, seed }) => new LayoutModel(syntheticLayout({ noise, seed })));

  it("a noisy point is fitted: a longer prompt measured faster takes the shorter one's time", () => {
    const layout = syntheticLayout({ isl: [256, 512, 1024] });
    layout.prefill[1]!.ms = layout.prefill[1]!.msMax = 100; // 512 measured slower than 1024
    const m = new LayoutModel(layout);
    expect(m.prefillMs(1024).ms).toBe(100);
    expect(m.prefillMs(768).ms).toBe(100);
  });

  it('prefill time never falls with a longer prompt', () => {
    fc.assert(
      fc.property(noisyLayout, fc.integer({ min: 1, max: 20000 }), fc.integer({ min: 1, max: 20000 }), (m, a, b) => {
        const [lo, hi] = a <= b ? [a, b] : [b, a];
        return m.prefillMs(lo).ms <= m.prefillMs(hi).ms;
      }),
    );
  });

  it('step time never falls with batch or context; time per sequence never rises with batch', () => {
    fc.assert(
      fc.property(
        noisyLayout,
        fc.integer({ min: 1, max: 256 }),
        fc.integer({ min: 1, max: 256 }),
        fc.integer({ min: 1, max: 40000 }),
        fc.integer({ min: 1, max: 40000 }),
        (m, b1, b2, c1, c2) => {
          const [bLo, bHi] = b1 <= b2 ? [b1, b2] : [b2, b1];
          const [cLo, cHi] = c1 <= c2 ? [c1, c2] : [c2, c1];
          const t = (b: number, c: number) => m.decodeStepMs(b, c).ms;
          const eps = 1e-9;
          return (
            t(bLo, cLo) <= t(bHi, cLo) + eps &&
            t(bLo, cLo) <= t(bLo, cHi) + eps &&
            t(bHi, cHi) / bHi <= t(bLo, cHi) / bLo + eps
          );
        },
      ),
    );
  });
});
