/**
 * Token sampling over rows of logits (Float32Array, row-major, `vocabSize` per row).
 *
 * Order of operations (vLLM's): temperature scales the logits, top-k keeps the k largest, top-p keeps the
 * smallest prefix of those (by descending probability) whose probability reaches p, and one token is drawn by
 * inverse CDF from the renormalised rest. Temperature 0, top-k 1 and a top-p small enough to keep one token all
 * pick the arg max (ties: the lowest id), so they equal greedy exactly.
 *
 * Randomness is counter-based: the uniform for a request's i-th generated token is a pure function of
 * (seed, i), so a seeded request yields the same tokens whatever else is in its batch, and after a preemption
 * (recompute) or a prefill/decode split across two engines.
 *
 * Logprobs are the log-softmax of the raw logits (before penalties, temperature, top-k and top-p: vLLM's
 * default, raw_logprobs).
 *
 * Penalties (vLLM's and OpenAI's, `applyPenalties`) change a row before sampling: repetition divides a positive
 * logit (multiplies a negative one) of every token seen in the prompt or the output; frequency subtracts its
 * weight times the token's count in the output; presence subtracts its weight once for a token in the output.
 * The output is the request's generated tokens, those of a resumed request (migration) included. A penalized
 * row is sampled on the host: `plan` asks a device for the whole row.
 *
 * A runner that samples on its device (`ModelRunner.forwardSampled`) returns, instead of whole rows, what
 * this algorithm reads from them: the best candidates in order, the sums, and the plain draw made with the
 * uniform `plan()` gave it. The same steps then run on those (`choose` is shared), so a seed gives the same
 * tokens either way up to floating-point rounding of the sums; where the candidates might not cover top-p,
 * the device returns the whole row and the host path runs.
 */
import { BadArgumentError } from '../errors.js';
import {
  SAMPLE_EXP_SUM,
  SAMPLE_FULL_ROW,
  SAMPLE_LSE,
  SAMPLE_MAX_CANDIDATES,
  SAMPLE_PLAIN,
  SAMPLE_TOP_P,
  type SampledLogits,
  type SamplePlan,
} from './runner.js';

/** Checked sampling parameters of one request (see `SamplingParams` in engine.ts for the public form). */
export interface SamplerParams {
  /** 0: greedy. */
  temperature: number;
  /** 0: all tokens. */
  topK: number;
  /** 1: no nucleus filtering. */
  topP: number;
  /** Low and high 32 bits of the seed. */
  seedLo: number;
  seedHi: number;
}

/** The log-probability of a chosen token, and the `n` most likely tokens (best first) with theirs. */
export interface TokenLogprobs {
  tokenId: number;
  logprob: number;
  topTokenIds: Int32Array;
  topLogprobs: Float32Array;
}

function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** A step's logits: whole rows (nseq x vocabSize), or a device's candidates and sums (forwardSampled). */
export type StepLogits = Float32Array | SampledLogits;

/** One sequence's part in a step's sampling: its parameters, generated-token counter and logprobs (-1: none). */
export interface SampleRowRequest {
  params: SamplerParams;
  counter: number;
  logprobs: number;
  /** The host needs the whole row (penalties apply to it). */
  fullRow?: boolean;
}

/** Checked penalties of one request; neutral values are presence 0, frequency 0, repetition 1. */
export interface PenaltyParams {
  presence: number;
  frequency: number;
  repetition: number;
}

/**
 * Applies penalties in place to `row[0 .. V)` (vLLM's order: repetition, then frequency and presence).
 * `outputCounts`: each output token id's count; `promptTokens`: the prompt's token ids (read for repetition).
 */
export function applyPenalties(
  row: Float32Array,
  p: PenaltyParams,
  outputCounts: ReadonlyMap<number, number>,
  promptTokens: ReadonlySet<number> | null,
): void {
  if (p.repetition !== 1) {
    const repeat = (id: number) => {
      const x = row[id]!;
      row[id] = x > 0 ? x / p.repetition : x * p.repetition;
    };
    if (promptTokens) for (const id of promptTokens) repeat(id);
    for (const id of outputCounts.keys()) if (!promptTokens?.has(id)) repeat(id);
  }
  if (p.frequency !== 0 || p.presence !== 0)
    for (const [id, count] of outputCounts) row[id] = row[id]! - p.frequency * count - p.presence;
}

/** A uniform double in [0, 1) (53 random bits) that depends only on (seedLo, seedHi, counter). */
export function counterUniform(seedLo: number, seedHi: number, counter: number): number {
  const c = counter >>> 0;
  const ch = Math.floor(counter / 0x100000000) >>> 0;
  const a = fmix32((seedLo ^ Math.imul(c, 0x9e3779b9)) + 0x632be5ab);
  const b = fmix32(a ^ seedHi ^ Math.imul(ch + 1, 0x85ebca77));
  const hi = fmix32(b + c);
  const lo = fmix32(hi ^ a ^ 0x27d4eb2f);
  return (hi * 0x200000 + (lo >>> 11)) / 0x20000000000000;
}

/** Splits a safe-integer seed into two 32-bit halves. */
export function seedHalves(seed: number): { seedLo: number; seedHi: number } {
  if (!Number.isSafeInteger(seed)) throw new BadArgumentError(`seed must be a safe integer (got ${seed})`);
  return { seedLo: seed >>> 0, seedHi: Math.floor(seed / 0x100000000) >>> 0 };
}

/** Index of the largest of `row[off .. off + n)`; ties go to the lowest index. NaN never wins. */
export function argmax(row: Float32Array, off: number, n: number): number {
  let best = 0;
  let bestV = -Infinity;
  for (let v = 0; v < n; v++) {
    const x = row[off + v]!;
    if (x > bestV) {
      bestV = x;
      best = v;
    }
  }
  return best;
}

/**
 * Samples rows of logits. One instance per engine: it owns scratch buffers sized to the vocabulary, so sampling
 * allocates nothing per token (logprobs allocate their two result arrays).
 */
export class Sampler {
  private readonly heap: Int32Array;
  private readonly weights: Float64Array;
  private readonly values: Float64Array;

  constructor(readonly vocabSize: number) {
    this.heap = new Int32Array(vocabSize);
    this.weights = new Float64Array(vocabSize);
    this.values = new Float64Array(vocabSize);
  }

  /**
   * What a device must return for each row (null: the row is not sampled this step) so that `sample` and
   * `logprobs` can run on a SampledLogits.
   */
  plan(rows: readonly (SampleRowRequest | null)[]): SamplePlan {
    const nseq = rows.length;
    const plan: SamplePlan = {
      n: new Int32Array(nseq),
      flags: new Int32Array(nseq),
      invT: new Float64Array(nseq),
      topP: new Float64Array(nseq).fill(1),
      u: new Float64Array(nseq),
    };
    const V = this.vocabSize;
    for (let i = 0; i < nseq; i++) {
      const r = rows[i];
      if (!r) continue;
      const p = r.params;
      let n = 1;
      let flags = 0;
      if (r.logprobs >= 0) {
        flags |= SAMPLE_LSE;
        n = Math.max(n, Math.min(r.logprobs, V));
      }
      const K = p.topK > 0 ? Math.min(p.topK, V) : V;
      if (p.temperature > 0 && K > 1) {
        plan.invT[i] = 1 / p.temperature;
        if (K === V && p.topP >= 1) {
          flags |= SAMPLE_PLAIN;
          plan.u[i] = counterUniform(p.seedLo, p.seedHi, r.counter);
        } else if (K === V) {
          flags |= SAMPLE_EXP_SUM | SAMPLE_TOP_P;
          plan.topP[i] = p.topP;
          n = Math.max(n, Math.min(V, SAMPLE_MAX_CANDIDATES));
        } else n = Math.max(n, K);
      }
      if (n > SAMPLE_MAX_CANDIDATES || r.fullRow) {
        flags |= SAMPLE_FULL_ROW;
        n = 1;
      }
      plan.n[i] = n;
      plan.flags[i] = flags;
    }
    return plan;
  }

  /**
   * The token drawn from row `row` of `logits` for generated-token number `counter` of a request.
   */
  sample(logits: StepLogits, row: number, p: SamplerParams, counter: number): number {
    if (!(logits instanceof Float32Array)) return this.sampleFromDevice(logits, row, p, counter);
    const V = this.vocabSize;
    const off = row * V;
    if (p.temperature === 0) return argmax(logits, off, V);
    const K = p.topK > 0 ? Math.min(p.topK, V) : V;
    if (K === 1) return argmax(logits, off, V);
    const u = counterUniform(p.seedLo, p.seedHi, counter);
    const invT = 1 / p.temperature;

    if (K === V && p.topP >= 1) {
      // Plain softmax: inverse CDF in vocabulary order, two passes, no sort.
      const max = logits[off + argmax(logits, off, V)]!;
      let sum = 0;
      for (let v = 0; v < V; v++) sum += Math.exp((logits[off + v]! - max) * invT);
      const target = u * sum;
      let acc = 0;
      let last = 0;
      for (let v = 0; v < V; v++) {
        const w = Math.exp((logits[off + v]! - max) * invT);
        if (w > 0) last = v;
        acc += w;
        if (acc > target) return v;
      }
      return last;
    }

    const idx = this.heap;
    const vals = this.values;
    // Denominator for top-p when top-k keeps everything: the whole vocabulary.
    let fullSum = -1;
    const wholeSum = (max: number) => {
      if (fullSum < 0) {
        fullSum = 0;
        for (let v = 0; v < V; v++) fullSum += Math.exp((logits[off + v]! - max) * invT);
      }
      return fullSum;
    };
    let k = K === V ? Math.min(V, 64) : K;
    for (;;) {
      this.topIndices(logits, off, k);
      for (let j = 0; j < k; j++) vals[j] = logits[off + idx[j]!]!;
      const token = this.choose(idx, vals, k, K === V, p, u, invT, wholeSum, k < K);
      if (token >= 0) return token;
      k = Math.min(K, k * 4);
    }
  }

  /**
   * Top-k / top-p over the k best candidates (`ids`, `vals` best first): keeps the shortest prefix whose weight
   * reaches top-p (of the whole vocabulary's when `whole`, else of the k), draws by inverse CDF at `u`. -1 when
   * the k do not reach top-p and `canGrow` (the caller retries with more).
   */
  private choose(
    ids: Int32Array,
    vals: Float64Array,
    k: number,
    whole: boolean,
    p: SamplerParams,
    u: number,
    invT: number,
    wholeSum: (max: number) => number,
    canGrow: boolean,
  ): number {
    const w = this.weights;
    const max = vals[0]!;
    let kept = 0;
    for (let j = 0; j < k; j++) kept += w[j] = Math.exp((vals[j]! - max) * invT);
    let m = k;
    if (p.topP < 1) {
      // Top-p is over the top-k distribution: when top-k is active, `kept` is all of it.
      const need = p.topP * (whole ? wholeSum(max) : kept);
      let cum = 0;
      m = -1;
      for (let j = 0; j < k; j++) {
        cum += w[j]!;
        if (cum >= need) {
          m = j + 1;
          break;
        }
      }
      if (m < 0) {
        if (canGrow) return -1;
        m = k; // rounding: keep all
      }
    }
    let total = 0;
    for (let j = 0; j < m; j++) total += w[j]!;
    const target = u * total;
    let acc = 0;
    for (let j = 0; j < m; j++) {
      acc += w[j]!;
      if (acc > target) return ids[j]!;
    }
    return ids[m - 1]!;
  }

  /** `sample` on a device's candidates and sums (see `plan`). */
  private sampleFromDevice(s: SampledLogits, row: number, p: SamplerParams, counter: number): number {
    const full = fullRowOf(s, row);
    if (full >= 0) return this.sample(s.full, full, p, counter);
    const V = this.vocabSize;
    const best = s.ints[row * 4]!;
    if (p.temperature === 0) return best;
    const K = p.topK > 0 ? Math.min(p.topK, V) : V;
    if (K === 1) return best;
    if (K === V && p.topP >= 1) return s.ints[row * 4 + 1]!;
    const u = counterUniform(p.seedLo, p.seedHi, counter);
    const invT = 1 / p.temperature;
    const n = s.maxN;
    let k = 0;
    while (k < n && s.topIds[row * n + k]! >= 0) {
      this.heap[k] = s.topIds[row * n + k]!;
      this.values[k] = s.topLogits[row * n + k]!;
      k++;
    }
    if (K < V) k = Math.min(k, K);
    const expSum = s.dbl[row * 4 + 1]!;
    return this.choose(this.heap, this.values, k, K === V, p, u, invT, () => expSum, false);
  }

  /**
   * Row `row` of a step's logits as a view of its whole row; undefined when a device returned only candidates
   * for it (its plan did not ask for the whole row).
   */
  row(logits: StepLogits, row: number): Float32Array | undefined {
    const V = this.vocabSize;
    if (logits instanceof Float32Array) return logits.subarray(row * V, (row + 1) * V);
    const full = fullRowOf(logits, row);
    return full < 0 ? undefined : logits.full.subarray(full * V, (full + 1) * V);
  }

  /** Log-softmax of row `row`'s raw logits at `tokenId`, and the `n` best tokens with theirs. */
  logprobs(logits: StepLogits, row: number, tokenId: number, n: number): TokenLogprobs {
    if (!(logits instanceof Float32Array)) {
      const full = fullRowOf(logits, row);
      if (full >= 0) return this.logprobs(logits.full, full, tokenId, n);
      return deviceLogprobs(logits, row, tokenId, n);
    }
    const V = this.vocabSize;
    const off = row * V;
    const max = logits[off + argmax(logits, off, V)]!;
    let sum = 0;
    for (let v = 0; v < V; v++) sum += Math.exp(logits[off + v]! - max);
    const lse = max + Math.log(sum);
    const k = Math.max(0, Math.min(n, V));
    const topTokenIds = new Int32Array(k);
    const topLogprobs = new Float32Array(k);
    if (k > 0) {
      this.topIndices(logits, off, k);
      for (let j = 0; j < k; j++) {
        const id = this.heap[j]!;
        topTokenIds[j] = id;
        topLogprobs[j] = logits[off + id]! - lse;
      }
    }
    return { tokenId, logprob: logits[off + tokenId]! - lse, topTokenIds, topLogprobs };
  }

  /**
   * Leaves the `k` largest of `logits[off .. off + V)` in `heap[0 .. k)`, best first (ties: lower id first):
   * a size-k min-heap over the row, then heap-sorted in place. O(V log k).
   */
  private topIndices(logits: Float32Array, off: number, k: number): void {
    const h = this.heap;
    const V = this.vocabSize;
    // `worse(a, b)`: a ranks below b.
    const worse = (a: number, b: number) => {
      const la = logits[off + a]!;
      const lb = logits[off + b]!;
      return la < lb || (la === lb && a > b) || (la !== la && lb === lb);
    };
    const siftDown = (start: number, size: number) => {
      let i = start;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= size) return;
        const r = l + 1;
        let c = l;
        if (r < size && worse(h[r]!, h[l]!)) c = r;
        if (!worse(h[c]!, h[i]!)) return;
        const t = h[i]!;
        h[i] = h[c]!;
        h[c] = t;
        i = c;
      }
    };
    for (let v = 0; v < k; v++) h[v] = v;
    for (let i = (k >> 1) - 1; i >= 0; i--) siftDown(i, k);
    for (let v = k; v < V; v++) {
      if (worse(h[0]!, v)) {
        h[0] = v;
        siftDown(0, k);
      }
    }
    // Heap sort: repeatedly move the worst to the end, leaving best first.
    for (let end = k - 1; end > 0; end--) {
      const t = h[0]!;
      h[0] = h[end]!;
      h[end] = t;
      siftDown(0, end);
    }
  }
}

/** Index in `s.full` of row `row`'s whole logits, or -1. */
function fullRowOf(s: SampledLogits, row: number): number {
  const rows = s.fullRows;
  for (let i = 0; i < rows.length; i++) if (rows[i] === row) return i;
  return -1;
}

/** `Sampler.logprobs` from a device's log-sum-exp and candidates (the plan asked for at least n). */
function deviceLogprobs(s: SampledLogits, row: number, tokenId: number, n: number): TokenLogprobs {
  const lse = s.dbl[row * 4 + 2]!;
  const base = row * s.maxN;
  let avail = 0;
  while (avail < s.maxN && s.topIds[base + avail]! >= 0) avail++;
  const k = Math.max(0, Math.min(n, avail));
  const topTokenIds = new Int32Array(k);
  const topLogprobs = new Float32Array(k);
  let logit = tokenId === s.ints[row * 4 + 1] ? s.dbl[row * 4 + 3]! : NaN;
  for (let j = 0; j < avail; j++) {
    const id = s.topIds[base + j]!;
    if (j < k) {
      topTokenIds[j] = id;
      topLogprobs[j] = s.topLogits[base + j]! - lse;
    }
    if (id === tokenId) logit = s.topLogits[base + j]!;
  }
  return { tokenId, logprob: logit - lse, topTokenIds, topLogprobs };
}
