import { describe, expect, it } from 'vitest';
import { Sampler, argmax, counterUniform, seedHalves, type SamplerParams } from '../../lib/engine/sampler.js';
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
    const n = 20000;
    const bins = new Array(10).fill(0);
    let mean = 0;
    for (let i = 0; i < n; i++) {
      const u = counterUniform(42, 0, i);
      expect(u >= 0 && u < 1).toBe(true);
      bins[Math.floor(u * 10)]++;
      mean += u / n;
    }
    expect(Math.abs(mean - 0.5)).toBeLessThan(0.01);
    for (const b of bins) expect(Math.abs(b / n - 0.1)).toBeLessThan(0.01);
  });

  it('temperature sampling follows the softmax; higher temperature spreads it', () => {
    const n = 20000;
    for (const t of [0.5, 1, 2]) {
      const h = histogram(s, logits, params({ temperature: t }), n);
      const p = softmax(row, t);
      let tv = 0;
      for (let v = 0; v < V; v++) tv += Math.abs(h[v]! - p[v]!) / 2;
      expect(tv).toBeLessThan(0.03);
    }
    const cold = histogram(s, logits, params({ temperature: 0.2 }), 2000);
    const hot = histogram(s, logits, params({ temperature: 5 }), 2000);
    expect(cold[best]!).toBeGreaterThan(hot[best]!);
  });

  it('top-k keeps exactly the k most likely tokens, renormalised', () => {
    const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => row[b]! - row[a]! || a - b);
    const k = 5;
    const h = histogram(s, logits, params({ topK: k }), 20000);
    const kept = new Set(order.slice(0, k));
    for (let v = 0; v < V; v++) if (!kept.has(v)) expect(h[v]).toBe(0);
    const p = softmax(
      Float32Array.from(order.slice(0, k), (v) => row[v]!),
      1,
    );
    for (let j = 0; j < k; j++) expect(Math.abs(h[order[j]!]! - p[j]!)).toBeLessThan(0.02);
  });

  it('top-p keeps the smallest most-likely set reaching p', () => {
    const probs = softmax(row, 1);
    const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => probs[b]! - probs[a]! || a - b);
    const topP = 0.6;
    let cum = 0;
    let m = 0;
    while (cum < topP) cum += probs[order[m++]!]!;
    const h = histogram(s, logits, params({ topP }), 20000);
    const kept = new Set(order.slice(0, m));
    for (let v = 0; v < V; v++) if (!kept.has(v)) expect(h[v]).toBe(0);
    for (let j = 0; j < m; j++) expect(Math.abs(h[order[j]!]! - probs[order[j]!]! / cum)).toBeLessThan(0.02);
    // Combined with top-k: top-p applies to the top-k distribution.
    const hk = histogram(s, logits, params({ topK: 2, topP: 0.999 }), 2000);
    expect(hk.filter((x) => x > 0).length).toBeLessThanOrEqual(2);
    // A large vocabulary where p needs more than the first candidate batch.
    const big = new Sampler(1000);
    const flat = new Float32Array(1000).map((_, i) => (i % 7) * 0.01);
    const seen = new Set<number>();
    for (let i = 0; i < 1500; i++) seen.add(big.sample(flat, 0, params({ topP: 0.9 }), i));
    expect(seen.size).toBeGreaterThan(500);
  });

  /**
   * The distribution the sampler must draw from (vLLM's order): softmax of logits / T, the k best kept (ties: lower
   * id), then the smallest best-first prefix of those whose probability reaches p, renormalised.
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

  // Seeded (counter-based uniforms), so these frequencies are the same on every run: the tolerance only has to
  // cover sampling error, about 0.0035 per token at n = 20000 (0.02 is over five standard errors).
  it.each([
    { temperature: 0.5, topK: 5, topP: 1 },
    { temperature: 2, topK: 5, topP: 1 },
    { temperature: 0.5, topK: 0, topP: 0.8 },
    { temperature: 2, topK: 0, topP: 0.8 },
    { temperature: 0.7, topK: 12, topP: 0.6 },
    { temperature: 3, topK: 12, topP: 0.6 },
  ])('temperature with top-k and top-p: only the kept tokens, at their tempered frequencies (%o)', (c) => {
    const want = targetDistribution(row, c.temperature, c.topK, c.topP);
    const n = 20000;
    const h = histogram(s, logits, params({ ...c, seed: 4242 }), n);
    for (let v = 0; v < V; v++) {
      if (!want.has(v)) expect(h[v], `token ${v} is outside the kept set`).toBe(0);
      else expect(Math.abs(h[v]! - want.get(v)!), `token ${v}`).toBeLessThan(0.02);
    }
  });

  it('temperature applies before top-k and top-p choose', () => {
    // With top-p, a colder distribution keeps fewer tokens; top-k keeps the same k at any temperature.
    expect(targetDistribution(row, 0.5, 0, 0.8).size).toBeLessThan(targetDistribution(row, 2, 0, 0.8).size);
    const cold = histogram(s, logits, params({ temperature: 0.5, topP: 0.8 }), 4000);
    const hot = histogram(s, logits, params({ temperature: 2, topP: 0.8 }), 4000);
    expect(cold.filter((x) => x > 0).length).toBe(targetDistribution(row, 0.5, 0, 0.8).size);
    expect(hot.filter((x) => x > 0).length).toBe(targetDistribution(row, 2, 0, 0.8).size);
    // Top-k 5 at temperature 0.5 and 2: the same five tokens, the colder one more peaked on the best.
    const k5cold = histogram(s, logits, params({ temperature: 0.5, topK: 5 }), 4000);
    const k5hot = histogram(s, logits, params({ temperature: 2, topK: 5 }), 4000);
    expect(k5cold.map((x) => (x > 0 ? 1 : 0))).toEqual(k5hot.map((x) => (x > 0 ? 1 : 0)));
    expect(k5cold[best]!).toBeGreaterThan(k5hot[best]! + 0.1);
  });

  it('top-p keeps the smallest set whose probability reaches p exactly', () => {
    // Four equal logits: probabilities of 0.25 each, exact in binary. p = 0.5 keeps two tokens, not three.
    const four = new Sampler(4);
    const flat = new Float32Array([0, 0, 0, 0]);
    const seen = new Set<number>();
    for (let i = 0; i < 400; i++) seen.add(four.sample(flat, 0, params({ topP: 0.5 }), i));
    expect([...seen].sort()).toEqual([0, 1]);
    // Top-k 3 then top-p 0.6: top-p is over the top-k distribution (1/3 each) and keeps two; over all four, three.
    seen.clear();
    for (let i = 0; i < 400; i++) seen.add(four.sample(flat, 0, params({ topK: 3, topP: 0.6 }), i));
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
  // Rows of three shapes: peaked (top-p met by few candidates), flat over a large vocabulary (top-p needs more
  // than the device's candidates: the whole row comes back), and ties (broken to the lower id).
  const BIG = 300;
  const s = new Sampler(BIG);
  const peaked = Float32Array.from({ length: BIG }, (_, i) => Math.sin(i * 12.9898) * 6);
  const flat = Float32Array.from({ length: BIG }, (_, i) => (i % 7) * 0.01);
  const ties = Float32Array.from({ length: BIG }, (_, i) => (i % 4 === 0 ? 2 : i % 5 === 0 ? 1.5 : -1));
  const logits = new Float32Array(3 * BIG);
  logits.set(peaked, 0);
  logits.set(flat, BIG);
  logits.set(ties, 2 * BIG);
  const cases: Partial<SamplerParams>[] = [
    { temperature: 0 },
    { temperature: 0.7 },
    { temperature: 1.3, topK: 1 },
    { temperature: 1, topK: 5 },
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
      const req = { params: p, counter, logprobs: counter % 3 === 0 ? 4 : -1 };
      const plan = s.plan([req, req, req, null]);
      expect(plan.n[3]).toBe(0);
      const rows4 = new Float32Array(4 * BIG);
      rows4.set(logits);
      const device = sampleOnHost(rows4, BIG, plan);
      for (let r = 0; r < 3; r++) {
        const want = s.sample(rows4, r, p, counter);
        expect(s.sample(device, r, p, counter), `row ${r}, counter ${counter}`).toBe(want);
        if (req.logprobs >= 0) {
          const a = s.logprobs(rows4, r, want, 4);
          const b = s.logprobs(device, r, want, 4);
          expect(Array.from(b.topTokenIds)).toEqual(Array.from(a.topTokenIds));
          expect(b.logprob).toBeCloseTo(a.logprob, 6);
          for (let j = 0; j < 4; j++) expect(b.topLogprobs[j]).toBeCloseTo(a.topLogprobs[j]!, 6);
        }
      }
    }
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
