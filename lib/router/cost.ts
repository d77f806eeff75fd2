/**
 * The KV-aware router's cost function, the whole of it. For a request of `requestBlocks` blocks and a
 * candidate worker w:
 *
 *   cost(w) = prefillWeight * (uncachedBlocks(w) + queuedPrefillBlocks(w)) + decodeBlocks(w)
 *
 *   uncachedBlocks(w)      = requestBlocks - cachedBlocks(w): the blocks w would compute for this request
 *                            (cachedBlocks from the prefix index: leading blocks of the request w holds)
 *   queuedPrefillBlocks(w) = uncached blocks of the requests routed to w that have no first token yet
 *   decodeBlocks(w)        = blocks the requests routed to w and not finished occupy there: each request's
 *                            uncached blocks (what it found cached is shared with the requests before it, so
 *                            a popular prefix counts once, as the KV pool holds it once)
 *
 * The lowest cost wins; ties go to fewer requests in flight, then to the lighter reported load, then to the
 * first candidate. The load terms are the routers' estimate (load-estimate.ts: shared by the routers of one
 * launcher), updated when a request is routed, at its first token and at its end.
 *
 * With `temperature` > 0 the choice is a draw instead: P(w) ∝ exp(-cost(w) / (temperature * maxCost)), costs
 * normalised by the largest one so that the temperature does not depend on the size of the requests. A higher
 * temperature spreads load more evenly at the expense of cache hits.
 */

/** Weight of a block to compute against a block held in decode. Dynamo's default overlap weight is 1 too. */
export const DEFAULT_PREFILL_WEIGHT = 1;
/** 0: always the cheapest worker. */
export const DEFAULT_ROUTER_TEMPERATURE = 0;

export interface CostWeights {
  prefillWeight: number;
  temperature: number;
}

export const DEFAULT_COST_WEIGHTS: Readonly<CostWeights> = Object.freeze({
  prefillWeight: DEFAULT_PREFILL_WEIGHT,
  temperature: DEFAULT_ROUTER_TEMPERATURE,
});

/** What the cost of one candidate is made of (the live values a debug log prints). */
export interface CostTerms {
  uncachedBlocks: number;
  queuedPrefillBlocks: number;
  decodeBlocks: number;
}

/** The formula above, on plain numbers (the router's hot path allocates nothing per candidate). */
export function costOf(
  prefillWeight: number,
  uncachedBlocks: number,
  queuedPrefillBlocks: number,
  decodeBlocks: number,
): number {
  return prefillWeight * (uncachedBlocks + queuedPrefillBlocks) + decodeBlocks;
}

export function workerCost(terms: CostTerms, weights: CostWeights = DEFAULT_COST_WEIGHTS): number {
  return costOf(weights.prefillWeight, terms.uncachedBlocks, terms.queuedPrefillBlocks, terms.decodeBlocks);
}

/** The formula with one candidate's live values, as the debug log writes it. */
export function explainCost(worker: string, terms: CostTerms, weights: CostWeights = DEFAULT_COST_WEIGHTS): string {
  return (
    `cost(${worker}) = ${weights.prefillWeight} * (uncached ${terms.uncachedBlocks} + queued prefill ` +
    `${terms.queuedPrefillBlocks}) + decode ${terms.decodeBlocks} = ${workerCost(terms, weights)}`
  );
}

/**
 * The index of the chosen candidate. `costs[i]`, `inflight[i]` and `reportedLoad[i]` describe candidate i of
 * `n`; `random` draws uniforms in [0, 1) (only with a temperature).
 */
export function chooseByCost(
  n: number,
  costs: ArrayLike<number>,
  inflight: ArrayLike<number>,
  reportedLoad: ArrayLike<number>,
  temperature: number,
  random: () => number,
): number {
  if (n <= 1) return 0;
  if (temperature > 0) {
    let maxCost = 0;
    for (let i = 0; i < n; i++) maxCost = Math.max(maxCost, costs[i]!);
    const scale = temperature * (maxCost > 0 ? maxCost : 1);
    let minCost = Infinity;
    for (let i = 0; i < n; i++) minCost = Math.min(minCost, costs[i]!);
    // Shifted by the minimum: the same distribution, and exp never overflows.
    let total = 0;
    const weights = new Float64Array(n);
    for (let i = 0; i < n; i++) total += weights[i] = Math.exp(-(costs[i]! - minCost) / scale);
    let u = random() * total;
    for (let i = 0; i < n; i++) {
      u -= weights[i]!;
      if (u < 0) return i;
    }
    return n - 1;
  }
  let best = 0;
  for (let i = 1; i < n; i++) {
    const dc = costs[i]! - costs[best]!;
    if (dc < 0) best = i;
    else if (dc === 0) {
      const df = inflight[i]! - inflight[best]!;
      if (df < 0 || (df === 0 && reportedLoad[i]! < reportedLoad[best]!)) best = i;
    }
  }
  return best;
}
