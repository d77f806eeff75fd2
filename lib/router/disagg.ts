/**
 * Conditional disaggregation: whether a request's prompt is prefilled by a prefill worker (remote) or by the
 * decode worker that will decode it (local). The whole rule is `shouldPrefillRemotely`; the router calls it
 * once per request, and the graph's `disaggregation` section overrides its thresholds.
 */

export interface DisaggregationThresholds {
  /**
   * Prompts whose uncached part is shorter than this prefill locally. Below a few hundred tokens the decode
   * worker computes the prompt faster than a remote prefill costs in queueing, a request round trip and a
   * KV transfer, and a short prefill barely delays the decode batch it joins.
   */
  minRemotePrefillTokens: number;
  /**
   * Requests that may wait in the prefill pool per available prefill worker. At or beyond it the pool is
   * saturated: waiting there would cost more time to first token than prefilling locally.
   */
  maxPrefillQueue: number;
}

/** Same spirit as Dynamo's defaults (max_local_prefill_length, max_prefill_queue_size), in Tandem's units. */
export const DEFAULT_MIN_REMOTE_PREFILL_TOKENS = 512;
export const DEFAULT_MAX_PREFILL_QUEUE = 2;

export const DEFAULT_DISAGGREGATION_THRESHOLDS: Readonly<DisaggregationThresholds> = Object.freeze({
  minRemotePrefillTokens: DEFAULT_MIN_REMOTE_PREFILL_TOKENS,
  maxPrefillQueue: DEFAULT_MAX_PREFILL_QUEUE,
});

export interface PrefillSituation {
  /** Prompt tokens the decode worker would have to compute: the prompt less its prefix already cached there. */
  uncachedPromptTokens: number;
  /** Requests waiting in the prefill pool (all its workers together), not counting this one. */
  prefillQueueDepth: number;
  /** Prefill workers registered and answering. */
  prefillWorkersAvailable: number;
}

/**
 * Prefill remotely if, and only if, all three hold:
 *
 *   prefillWorkersAvailable >= 1
 *   uncachedPromptTokens    >= minRemotePrefillTokens
 *   prefillQueueDepth       <  maxPrefillQueue * prefillWorkersAvailable
 *
 * Otherwise the decode worker prefills locally: there is no prefill worker, the uncached prompt is too short
 * to pay for the transfer, or the prefill pool is saturated.
 */
export function shouldPrefillRemotely(
  { uncachedPromptTokens, prefillQueueDepth, prefillWorkersAvailable }: PrefillSituation,
  thresholds: DisaggregationThresholds = DEFAULT_DISAGGREGATION_THRESHOLDS,
): boolean {
  return (
    prefillWorkersAvailable >= 1 &&
    uncachedPromptTokens >= thresholds.minRemotePrefillTokens &&
    prefillQueueDepth < thresholds.maxPrefillQueue * prefillWorkersAvailable
  );
}
