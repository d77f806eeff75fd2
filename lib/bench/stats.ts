/**
 * The arithmetic of a serving benchmark, on the timings of its requests: percentiles, throughput, and goodput
 * under service-level objectives (DistServe's measure, as Dynamo, vLLM and SGLang report it).
 *
 * Definitions (per request, from the client's clock):
 *   TTFT  time to first token: from sending the request to the first chunk that carries text.
 *   ITL   inter-token latency: the gaps between successive chunks that carry text (a chunk that carries several
 *         tokens is one gap). Percentiles of ITL are over every gap of every request.
 *   TPOT  time per output token after the first: (E2E - TTFT) / (output tokens - 1), output tokens as the
 *         server's usage counts them. Requests of one token have none.
 *   E2E   end to end: from sending the request to the end of its stream.
 * Per run:
 *   duration     from the first request sent to the last one finished;
 *   throughput   requests (and input / output tokens) completed per second of duration;
 *   SLO met      a request that completed with TTFT <= the TTFT objective and TPOT <= the ITL objective (the
 *                mean gap of that request, as DistServe's TPOT and vLLM's --goodput tpot); a request of one
 *                token is judged on TTFT alone; a failed request never meets it;
 *   goodput      requests that met the SLO per second of duration;
 *   attainment   requests that met the SLO / requests sent.
 * Percentiles interpolate linearly between closest ranks (numpy's default, as vLLM's benchmark reports them).
 */

/** The percentiles a run reports. */
export const PERCENTILES = [50, 90, 99] as const;

/** Service-level objectives of a request. */
export interface Slo {
  ttftMs: number;
  itlMs: number;
}

/** The defaults of DistServe-style goodput for chat: first token within 2 s, 25 ms a token after it. */
export const DEFAULT_SLO: Slo = { ttftMs: 2000, itlMs: 25 };

/** Timings of one request, in milliseconds from the start of its run. */
export interface RequestTiming {
  /** Index of the request in the workload. */
  index: number;
  /** When the workload meant it to be sent (open loop); null in a closed loop. */
  scheduledMs: number | null;
  sentMs: number;
  /** Time to first token; null when no text came. */
  ttftMs: number | null;
  /** Gaps between chunks that carried text, in order. */
  itlMs: number[];
  /** From sending to the end of the stream (or the failure). */
  e2eMs: number;
  /** Output tokens: the server's usage when it sent one, else chunks that carried text. */
  outputTokens: number;
  /** Whether outputTokens is the server's count. */
  usage: boolean;
  /** Prompt tokens as the server counted them; null without usage. */
  promptTokens: number | null;
  /** Of those, the tokens the server found in a prefix cache (usage.prompt_tokens_details.cached_tokens); null when it does not say. */
  cachedTokens: number | null;
  /** Why it failed; null when it completed. */
  error: string | null;
}

export interface Distribution {
  count: number;
  mean: number;
  min: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

export interface RunStats {
  sent: number;
  completed: number;
  failed: number;
  durationS: number;
  requestThroughput: number;
  inputTokenThroughput: number;
  outputTokenThroughput: number;
  ttftMs: Distribution | null;
  itlMs: Distribution | null;
  tpotMs: Distribution | null;
  e2eMs: Distribution | null;
  slo: Slo;
  sloMet: number;
  /** Requests meeting the SLO per second. */
  goodput: number;
  /** sloMet / sent. */
  attainment: number;
  /**
   * Prefix cache hit rate: cached prompt tokens / prompt tokens, over the completed requests whose usage says
   * how many were cached; null when none does.
   */
  cacheHitRate: number | null;
}

/** The median of `values` (any order; the mean of the middle two when their count is even); NaN when empty. */
export function median(values: ArrayLike<number>): number {
  return percentile(Float64Array.from(values).sort(), 50);
}

/** The p-th percentile (0..100) of ascending `sorted`, interpolating linearly between closest ranks. */
export function percentile(sorted: ArrayLike<number>, p: number): number {
  const n = sorted.length;
  if (n === 0) return NaN;
  const rank = (p / 100) * (n - 1);
  const lo = Math.floor(rank);
  const hi = Math.min(n - 1, lo + 1);
  return sorted[lo]! + (sorted[hi]! - sorted[lo]!) * (rank - lo);
}

/** Count, mean, extremes and PERCENTILES of `values`; null when there are none. */
export function distribution(values: ArrayLike<number>): Distribution | null {
  if (values.length === 0) return null;
  const sorted = Float64Array.from(values).sort();
  let sum = 0;
  for (const v of sorted) sum += v;
  return {
    count: sorted.length,
    mean: sum / sorted.length,
    min: sorted[0]!,
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: sorted[sorted.length - 1]!,
  };
}

/** A completed request's time per output token after the first; null with fewer than two tokens. */
export function tpotMs(t: RequestTiming): number | null {
  if (t.error !== null || t.ttftMs === null || t.outputTokens < 2) return null;
  return (t.e2eMs - t.ttftMs) / (t.outputTokens - 1);
}

/** Whether a request completed within the SLO (see the header for the rule). */
export function meetsSlo(t: RequestTiming, slo: Slo): boolean {
  if (t.error !== null || t.ttftMs === null || t.ttftMs > slo.ttftMs) return false;
  const tpot = tpotMs(t);
  return tpot === null || tpot <= slo.itlMs;
}

/**
 * The statistics of one run. `promptTokens[i]` is the prompt length of request i as the workload made it (used
 * where the server sent no usage).
 */
export function runStats(timings: readonly RequestTiming[], promptTokens: ArrayLike<number>, slo: Slo): RunStats {
  const done = timings.filter((t) => t.error === null);
  let start = Infinity;
  let end = -Infinity;
  for (const t of timings) {
    start = Math.min(start, t.sentMs);
    end = Math.max(end, t.sentMs + t.e2eMs);
  }
  const durationS = timings.length ? (end - start) / 1000 : 0;
  const per = (n: number) => (durationS > 0 ? n / durationS : 0);
  let inputTokens = 0;
  let outputTokens = 0;
  let cachedTokens = 0;
  let cacheCountedTokens = 0;
  for (const t of done) {
    inputTokens += t.promptTokens ?? promptTokens[t.index] ?? 0;
    outputTokens += t.outputTokens;
    if (t.cachedTokens !== null && t.promptTokens !== null) {
      cachedTokens += t.cachedTokens;
      cacheCountedTokens += t.promptTokens;
    }
  }
  const met = timings.filter((t) => meetsSlo(t, slo)).length;
  return {
    sent: timings.length,
    completed: done.length,
    failed: timings.length - done.length,
    durationS,
    requestThroughput: per(done.length),
    inputTokenThroughput: per(inputTokens),
    outputTokenThroughput: per(outputTokens),
    ttftMs: distribution(done.flatMap((t) => (t.ttftMs === null ? [] : [t.ttftMs]))),
    itlMs: distribution(done.flatMap((t) => t.itlMs)),
    tpotMs: distribution(done.flatMap((t) => tpotMs(t) ?? [])),
    e2eMs: distribution(done.map((t) => t.e2eMs)),
    slo,
    sloMet: met,
    goodput: per(met),
    attainment: timings.length ? met / timings.length : 0,
    cacheHitRate: cacheCountedTokens > 0 ? cachedTokens / cacheCountedTokens : null,
  };
}
