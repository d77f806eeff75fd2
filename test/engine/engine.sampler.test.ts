import { describe, expect, it } from 'vitest';
import { Sampler, argmax, counterUniform, seedHalves, type SamplerParams } from '../../lib/engine/sampler.js';
import * as RUNNER from '../../lib/engine/runner.js';
import { referenceLogits } from '../helpers/fake-runner.js';

const V = 50;
const params = (p: Partial<SamplerParams> & { seed?: number } = {}): SamplerParams => ({
  temperature: 1,
  topK: 0,
  topP: 1,
  ...seedHalves(p.seed ?? 7),
  ...p,
});

/** Two rows: row 1 is the interesting one, row 0 a decoy (checks row addressing). */
function rows(): Float32Array {
  const out = new Float32Array(2 * V);
  out.set(referenceLogits([9, 9, 9], V), 0);
  out.set(referenceLogits([1, 2, 3], V), V);
  return out;
}

function softmax(logits: Float32Array, t: number): Float64Array {
  const max = Math.max(...logits);
  const e = Float64Array.from(logits, (x) => Math.exp((x - max) / t));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / s);
}

function histogram(s: Sampler, logits: Float32Array, p: SamplerParams, n: number): Float64Array {
  const h = new Float64Array(V);
  for (let i = 0; i < n; i++) h[s.sample(logits, 1, p, i)]! += 1 / n;
  return h;
}

describe('Sampler', () => {
  const s = new Sampler(V);
  const logits = rows();
  const row = logits.subarray(V, 2 * V);
  const best = argmax(logits, V, V);

  it('greedy, top-k 1 and a tiny top-p all give the arg max', () => {
    expect(best).toBe(Array.from(row).indexOf(Math.max(...row)));
    for (let i = 0; i < 50; i++) {
      expect(s.sample(logits, 1, params({ temperature: 0 }), i)).toBe(best);
      expect(s.sample(logits, 1, params({ topK: 1, seed: i }), i)).toBe(best);
      expect(s.sample(logits, 1, params({ topP: 1e-6, seed: i }), i)).toBe(best);
    }
    // Ties go to the lowest id.
    expect(argmax(new Float32Array([1, 3, 3, 2]), 0, 4)).toBe(1);
  });

  it('counter-based uniforms are deterministic, in [0, 1), and look uniform', () => {
    expect(counterUniform(1, 2, 3)).toBe(counterUniform(1, 2, 3));
    expect(counterUniform(1, 2, 3)).not.toBe(counterUniform(1, 2, 4));
    expect(counterUniform(1, 2, 3)).not.toBe(counterUniform(2, 2, 3));
    expect(counterUniform(1, 2, 3)).not.toBe(counterUniform(1, 3, 3));
    expect(counterUniform(1, 2, 3)).not.toBe(counterUniform(1, 2, 3 + 2 ** 32)); // counters past 32 bits
    const n = 20000;
    const bins = new Array<number>(10).fill(0);
    let mean = 0;
    let outside = 0;
    for (let i = 0; i < n; i++) {
      const u = counterUniform(42, 0, i);
      if (!(u >= 0 && u < 1)) outside++;
      bins[Math.floor(u * 10)]! += 1;
      mean += u / n;
    }
    expect(outside).toBe(0);
    expect(Math.abs(mean - 0.5)).toBeLessThan(0.01);
    for (const b of bins) expect(Math.abs(b / n - 0.1)).toBeLessThan(0.01);
    // Test vectors: a seeded request gives the same tokens from one release to the next.
    expect([counterUniform(1, 2, 3), counterUniform(42, 0, 0), counterUniform(7, 9, 2 ** 32 + 5)]).toEqual([
      0.7181870862103915, 0.21735760410760385, 0.6002859693504592,
    ]);
    expect(seedHalves(2 ** 40 + 5)).toEqual({ seedLo: 5, seedHi: 2 ** 8 });
    expect(() => seedHalves(0.5)).toThrow(/safe integer/);
  });

  /**
   * The distribution the sampler must draw from (vLLM's order): softmax of logits / T, the k best kept (ties: lower
   * id), then the smallest best-first prefix of those whose probability reaches p, renormalised. Keys best first.
   */
  function targetDistribution(logits: Float32Array, t: number, topK: number, topP: number): Map<number, number> {
    const probs = softmax(logits, t);
    const order = Array.from(probs.keys()).sort((a, b) => probs[b]! - probs[a]! || a - b);
    const k = topK > 0 ? Math.min(topK, order.length) : order.length;
    const top = order.slice(0, k);
    const mass = top.reduce((a, v) => a + probs[v]!, 0);
    const kept: number[] = [];
    let cum = 0;
    for (const v of top) {
      kept.push(v);
      cum += probs[v]! / mass;
      if (cum >= topP) break;
    }
    const keptMass = kept.reduce((a, v) => a + probs[v]!, 0);
    return new Map(kept.map((v) => [v, probs[v]! / keptMass]));
  }

  // Histograms of seeded draws (counter-based uniforms: the same on every run). n = 4000 gives a standard error of
  // at most 0.008 per token; the tolerance of 0.035 is over four of them, and tokens outside the kept set must
  // never be drawn at all.
  const N = 4000;
  const TOLERANCE = 0.035;
  function expectDraws(c: Partial<SamplerParams>, seed: number): Map<number, number> {
    const want = targetDistribution(row, c.temperature ?? 1, c.topK ?? 0, c.topP ?? 1);
    const h = histogram(s, logits, params({ ...c, seed }), N);
    for (let v = 0; v < V; v++) {
      if (!want.has(v)) expect(h[v], `token ${v} is outside the kept set`).toBe(0);
      else expect(Math.abs(h[v]! - want.get(v)!), `token ${v}`).toBeLessThan(TOLERANCE);
    }
    return want;
  }

  it('temperature sampling follows the tempered softmax; higher temperature spreads it', () => {
    for (const temperature of [0.5, 1, 2]) expectDraws({ temperature }, 11);
    const cold = histogram(s, logits, params({ temperature: 0.2 }), 1000);
    const hot = histogram(s, logits, params({ temperature: 5 }), 1000);
    expect(cold[best]!).toBeGreaterThan(hot[best]! + 0.2);
  });

  it('top-k keeps exactly the k most likely tokens, renormalised', () => {
    expect(expectDraws({ topK: 5 }, 12).size).toBe(5);
  });

  it('top-p keeps the smallest most-likely set reaching p', () => {
    expect(expectDraws({ topP: 0.6 }, 13).size).toBeGreaterThan(1);
    // Combined with top-k: top-p applies to the top-k distribution.
    const hk = histogram(s, logits, params({ topK: 2, topP: 0.999 }), 500);
    expect(hk.filter((x) => x > 0).length).toBe(2);
    // A large vocabulary where p needs more than the first candidate batch (64).
    const big = new Sampler(300);
    const flat = new Float32Array(300).map((_, i) => (i % 7) * 0.01);
    const kept = targetDistribution(flat, 1, 0, 0.9);
    expect(kept.size).toBeGreaterThan(200);
    const seen = new Set<number>();
    for (let i = 0; i < 300; i++) seen.add(big.sample(flat, 0, params({ topP: 0.9 }), i));
    expect(seen.size).toBeGreaterThan(120);
    for (const v of seen) expect(kept.has(v), `token ${v}`).toBe(true);
  });

  it.each([
    { temperature: 0.5, topK: 5, topP: 1 },
    { temperature: 2, topK: 5, topP: 1 },
    { temperature: 0.5, topK: 0, topP: 0.8 },
    { temperature: 2, topK: 0, topP: 0.8 },
    { temperature: 0.7, topK: 12, topP: 0.6 },
    { temperature: 3, topK: 12, topP: 0.6 },
  ])('temperature with top-k and top-p: only the kept tokens, at their tempered frequencies (%o)', (c) => {
    expectDraws(c, 4242);
  });

  it('temperature applies before top-k and top-p choose', () => {
    // With top-p, a colder distribution keeps fewer tokens; top-k keeps the same k at any temperature.
    const cold = targetDistribution(row, 0.5, 0, 0.8);
    const hot = targetDistribution(row, 2, 0, 0.8);
    expect(cold.size).toBeLessThan(hot.size);
    const seenCold = histogram(s, logits, params({ temperature: 0.5, topP: 0.8 }), 1000);
    const seenHot = histogram(s, logits, params({ temperature: 2, topP: 0.8 }), 1000);
    expect(seenCold.filter((x) => x > 0).length).toBe(cold.size);
    expect(seenHot.filter((x) => x > 0).length).toBe(hot.size);
    // Top-k 5 at temperature 0.5 and 2: the same five tokens, the colder one more peaked on the best.
    const k5cold = histogram(s, logits, params({ temperature: 0.5, topK: 5 }), 1000);
    const k5hot = histogram(s, logits, params({ temperature: 2, topK: 5 }), 1000);
    expect(k5cold.map((x) => (x > 0 ? 1 : 0))).toEqual(k5hot.map((x) => (x > 0 ? 1 : 0)));
    expect(k5cold[best]!).toBeGreaterThan(k5hot[best]! + 0.1);
  });

  it("draws by inverse CDF at the request's uniform: kept tokens best first, the plain softmax in id order", () => {
    // The order is part of the contract: a device that samples returns its candidates best first and the plain
    // draw, and must give the same token as the host for the same uniform.
    const cases = [
      { temperature: 1, topK: 0, topP: 1 },
      { temperature: 0.6, topK: 0, topP: 1 },
      { temperature: 0.6, topK: 7, topP: 1 },
      { temperature: 1.5, topK: 0, topP: 0.7 },
      { temperature: 0.8, topK: 9, topP: 0.5 },
    ];
    for (const c of cases) {
      const want = targetDistribution(row, c.temperature, c.topK, c.topP);
      const ordered = c.topK === 0 && c.topP === 1 ? [...want.keys()].sort((a, b) => a - b) : [...want.keys()];
      const p = params({ ...c, seed: 77 });
      for (let i = 0; i < 200; i++) {
        const u = counterUniform(p.seedLo, p.seedHi, i);
        let acc = 0;
        let expected = ordered[ordered.length - 1]!;
        for (const v of ordered) {
          acc += want.get(v)!;
          if (acc > u) {
            expected = v;
            break;
          }
        }
        expect(s.sample(logits, 1, p, i), `${JSON.stringify(c)} draw ${i}`).toBe(expected);
      }
    }
  });

  it('ties go to the lower id and NaN never wins, in argmax and in top-k', () => {
    expect(argmax(new Float32Array([NaN, 1, 2, NaN]), 0, 4)).toBe(2);
    expect(argmax(new Float32Array([-Infinity, -Infinity]), 0, 2)).toBe(0);
    // Ids 0, 2 and 4 tie at 3, id 1 is NaN (inside the first k the heap starts from): top-k 2 keeps 0 and 2, top-k 3
    // the three, top-k 5 every number and never the NaN.
    const six = new Sampler(6);
    const row6 = new Float32Array([3, NaN, 3, 1, 3, 2]);
    const drawn = (topK: number) => {
      const seen = new Set<number>();
      for (let i = 0; i < 300; i++) seen.add(six.sample(row6, 0, params({ topK, seed: 3 }), i));
      return [...seen].sort();
    };
    expect(drawn(2)).toEqual([0, 2]);
    expect(drawn(3)).toEqual([0, 2, 4]);
    expect(drawn(5)).toEqual([0, 2, 3, 4, 5]);
    expect(Array.from(six.logprobs(row6, 0, 0, 4).topTokenIds)).toEqual([0, 2, 4, 5]);
  });

  it('top-p keeps the smallest set whose probability reaches p exactly', () => {
    // Four equal logits: probabilities of 0.25 each, exact in binary. p = 0.5 keeps two tokens, not three.
    const four = new Sampler(4);
    const flat = new Float32Array([0, 0, 0, 0]);
    const seen = new Set<number>();
    for (let i = 0; i < 200; i++) seen.add(four.sample(flat, 0, params({ topP: 0.5 }), i));
    expect([...seen].sort()).toEqual([0, 1]);
    // Top-k 3 then top-p 0.6: top-p is over the top-k distribution (1/3 each) and keeps two; over all four, three.
    seen.clear();
    for (let i = 0; i < 200; i++) seen.add(four.sample(flat, 0, params({ topK: 3, topP: 0.6 }), i));
    expect([...seen].sort()).toEqual([0, 1]);
  });

  it('same seed and counter, same token; the batch row does not matter', () => {
    const p = params({ seed: 99 });
    const alone = new Float32Array(row);
    for (let i = 0; i < 20; i++) expect(s.sample(logits, 1, p, i)).toBe(s.sample(alone, 0, p, i));
    const a = Array.from({ length: 30 }, (_, i) => s.sample(logits, 1, params({ seed: 1 }), i));
    const b = Array.from({ length: 30 }, (_, i) => s.sample(logits, 1, params({ seed: 2 }), i));
    expect(a).not.toEqual(b);
  });

  it('logprobs are the log-softmax of the raw logits, top-N best first', () => {
    const lp = s.logprobs(logits, 1, 3, 5);
    const max = Math.max(...row);
    const lse = max + Math.log(row.reduce((a, x) => a + Math.exp(x - max), 0));
    expect(lp.tokenId).toBe(3);
    expect(lp.logprob).toBeCloseTo(row[3]! - lse, 5);
    const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => row[b]! - row[a]! || a - b);
    expect(Array.from(lp.topTokenIds)).toEqual(order.slice(0, 5));
    for (let j = 0; j < 5; j++) expect(lp.topLogprobs[j]).toBeCloseTo(row[order[j]!]! - lse, 5);
    expect(s.logprobs(logits, 1, 3, 0).topTokenIds).toHaveLength(0);
  });
});

describe('Sampler on a device-sampled step (forwardSampled contract)', () => {
  // Rows of four shapes: peaked (top-p met by few candidates), flat over a large vocabulary (top-p needs more
  // than the device's candidates: the whole row comes back), ties (broken to the lower id), and the peaked row
  // doubled (the same best tokens as row 0 with other logits: nothing of one row may leak into another's).
  const BIG = 300;
  const s = new Sampler(BIG);
  const peaked = Float32Array.from({ length: BIG }, (_, i) => Math.sin(i * 12.9898) * 6);
  const flat = Float32Array.from({ length: BIG }, (_, i) => (i % 7) * 0.01);
  const ties = Float32Array.from({ length: BIG }, (_, i) => (i % 4 === 0 ? 2 : i % 5 === 0 ? 1.5 : -1));
  const ROWS = 4;
  const logits = new Float32Array(ROWS * BIG);
  logits.set(peaked, 0);
  logits.set(flat, BIG);
  logits.set(ties, 2 * BIG);
  logits.set(
    peaked.map((x) => 2 * x),
    3 * BIG,
  );
  const cases: Partial<SamplerParams>[] = [
    { temperature: 0 },
    { temperature: 0.7 },
    { temperature: 1.3, topK: 1 },
    { temperature: 1, topK: 5 },
    { temperature: 1, topK: 3 }, // fewer than the 4 logprobs: the device returns more candidates than top-k keeps
    { temperature: 0.8, topK: 64 },
    { temperature: 1, topK: 65 },
    { temperature: 1, topP: 0.9 },
    { temperature: 0.5, topP: 0.3 },
    { temperature: 1, topK: 20, topP: 0.8 },
  ];

  it.each(cases)('gives the tokens and logprobs of whole rows: %o', async (c) => {
    const { sampleOnHost } = await import('../helpers/device-sampling.js');
    for (let counter = 0; counter < 60; counter++) {
      const p = params({ ...c, seed: 1234 + counter });
      // Logprobs: 4 best, only the chosen token's (0), or none (-1).
      const logprobs = [4, 0, -1][counter % 3]!;
      const req = { params: p, counter, logprobs };
      const plan = s.plan([...Array<typeof req>(ROWS).fill(req), null]);
      expect(plan.n[ROWS]).toBe(0);
      const rows = new Float32Array((ROWS + 1) * BIG);
      rows.set(logits);
      const device = sampleOnHost(rows, BIG, plan);
      for (let r = 0; r < ROWS; r++) {
        const want = s.sample(rows, r, p, counter);
        expect(s.sample(device, r, p, counter), `row ${r}, counter ${counter}`).toBe(want);
        if (logprobs >= 0) {
          const a = s.logprobs(rows, r, want, logprobs);
          const b = s.logprobs(device, r, want, logprobs);
          expect(Array.from(b.topTokenIds)).toEqual(Array.from(a.topTokenIds));
          expect(b.logprob).toBeCloseTo(a.logprob, 6);
          for (let j = 0; j < logprobs; j++) expect(b.topLogprobs[j]).toBeCloseTo(a.topLogprobs[j]!, 6);
        }
      }
    }
  });

  it('plans, per row, the candidates and sums the host steps read', () => {
    const req = (p: Partial<SamplerParams>, logprobs = -1) => ({
      params: params({ seed: 5, ...p }),
      counter: 9,
      logprobs,
    });
    const plan = s.plan([
      req({ temperature: 0 }), // greedy: the best token
      req({ temperature: 0 }, 0), // and its logprob: the log-sum-exp
      req({ temperature: 0.5 }), // plain softmax: drawn on the device at the request's uniform
      req({ temperature: 1.3, topK: 1 }), // top-k 1 is greedy
      req({ temperature: 1, topP: 0.9 }), // top-p over the vocabulary: 64 candidates and the exp-sum
      req({ temperature: 2, topK: 5 }), // top-k: the k best
      req({ temperature: 1, topK: 5 }, 8), // top-k with more logprobs than k: the larger count
      req({ topK: 100 }), // more candidates than a device returns: the whole row
      req({ temperature: 0 }, 100), // likewise for logprobs
      null,
    ]);
    const {
      SAMPLE_LSE: LSE,
      SAMPLE_EXP_SUM: SUM,
      SAMPLE_PLAIN: PLAIN,
      SAMPLE_TOP_P: TOP_P,
      SAMPLE_FULL_ROW: FULL,
    } = RUNNER;
    expect(Array.from(plan.n)).toEqual([1, 1, 1, 1, 64, 5, 8, 1, 1, 0]);
    expect(Array.from(plan.flags)).toEqual([0, LSE, PLAIN, 0, SUM | TOP_P, 0, LSE, FULL, LSE | FULL, 0]);
    expect(Array.from(plan.invT)).toEqual([0, 0, 2, 0, 1, 0.5, 1, 1, 0, 0]);
    expect(Array.from(plan.topP)).toEqual([1, 1, 1, 1, 0.9, 1, 1, 1, 1, 1]);
    const { seedLo, seedHi } = seedHalves(5);
    expect(Array.from(plan.u)).toEqual([0, 0, counterUniform(seedLo, seedHi, 9), 0, 0, 0, 0, 0, 0, 0]);
  });

  it('asks for whole rows only where candidates cannot answer', async () => {
    const { sampleOnHost } = await import('../helpers/device-sampling.js');
    const plan = s.plan([
      { params: params({ temperature: 0 }), counter: 0, logprobs: -1 },
      { params: params({ topK: 100 }), counter: 0, logprobs: -1 },
      { params: params({ topP: 0.9 }), counter: 0, logprobs: -1 },
      { params: params({ temperature: 0 }), counter: 0, logprobs: 80 },
    ]);
    expect(Array.from(plan.n)).toEqual([1, 1, 64, 1]);
    const rows4 = new Float32Array(4 * BIG);
    rows4.set(peaked, 0);
    rows4.set(peaked, BIG);
    rows4.set(flat, 2 * BIG); // flat: 64 candidates hold about a fifth of the mass, short of 0.9
    rows4.set(peaked, 3 * BIG);
    const device = sampleOnHost(rows4, BIG, plan);
    expect(Array.from(device.fullRows)).toEqual([1, 2, 3]);
    rows4.set(
      Float32Array.from({ length: BIG }, (_, i) => (i === 7 ? 10 : 0)),
      2 * BIG,
    ); // one token holds 98.7%
    expect(Array.from(sampleOnHost(rows4, BIG, plan).fullRows)).toEqual([1, 3]);
  });
});
