/**
 * What the planner sees of the serving system over one interval: the frontend's metrics (ServeMetrics'
 * cumulative totals, differenced between two readings), each worker's KV usage (its heartbeats) and each
 * mixture-of-experts worker's expert load (its heartbeats' load window, as /metrics shows it).
 *
 *   rate = finished requests / seconds      isl, osl = input, output tokens / finished requests
 *   ttftMs, itlMs = the interval's means    queued, prefillQueue = now
 * An interval with no finished request keeps the last ISL and OSL (a quiet minute does not make prompts short).
 */
import type { PlannerReadings } from '../frontend/metrics.js';
import type { LoadSample } from './forecast.js';

export interface PlannerWindow extends LoadSample {
  /** Length of the interval. */
  seconds: number;
  /** Requests finished in it. */
  requests: number;
  /** Mean TTFT and ITL of the interval; null when it had none. */
  ttftMs: number | null;
  itlMs: number | null;
  /** Requests waiting for their first token, and in the prefill pool, at its end. */
  queued: number;
  prefillQueue: number;
  /** Each worker's used / total KV blocks at its end. */
  kvUsage: Record<string, number>;
  /**
   * Each mixture-of-experts worker's expert load at its end: `imbalance[layer]`, max / mean tokens per expert over
   * the worker's load window (the last EXPERT_LOAD_WINDOW_HEARTBEATS heartbeats; 1 when balanced or idle), and
   * `tokensRouted` in this interval (expert assignments: a token counts once per MoE layer and expert). Empty for
   * dense models.
   */
  expertLoad: Record<string, { imbalance: number[]; tokensRouted: number }>;
}

export class MetricsWindow {
  private last?: { atMs: number; readings: PlannerReadings };
  private isl = 1;
  private osl = 1;

  constructor(
    private readonly read: () => Promise<PlannerReadings>,
    private readonly kvUsage: () => Record<string, number>,
    private readonly now: () => number = () => performance.now(),
  ) {}

  /** Starts the first interval (the totals so far are not part of any). */
  async start(): Promise<void> {
    this.last = { atMs: this.now(), readings: await this.read() };
  }

  /** Ends the current interval and starts the next. */
  async next(): Promise<PlannerWindow> {
    if (!this.last) await this.start();
    const readings = await this.read();
    const atMs = this.now();
    const prev = this.last!;
    this.last = { atMs, readings };
    const seconds = Math.max(1e-3, (atMs - prev.atMs) / 1000);
    const requests = readings.finished - prev.readings.finished;
    if (requests > 0) {
      this.isl = (readings.inputTokens - prev.readings.inputTokens) / requests;
      this.osl = (readings.outputTokens - prev.readings.outputTokens) / requests;
    }
    const mean = (now: { sum: number; count: number }, then: { sum: number; count: number }) =>
      now.count > then.count ? ((now.sum - then.sum) / (now.count - then.count)) * 1000 : null;
    return {
      seconds,
      requests,
      rate: requests / seconds,
      isl: this.isl,
      osl: this.osl,
      ttftMs: mean(readings.ttftSeconds, prev.readings.ttftSeconds),
      itlMs: mean(readings.itlSeconds, prev.readings.itlSeconds),
      queued: readings.queued,
      prefillQueue: readings.prefillQueue,
      kvUsage: this.kvUsage(),
      expertLoad: Object.fromEntries(
        Object.entries(readings.expertLoad ?? {}).map(([worker, report]) => {
          const before = prev.readings.expertLoad?.[worker]?.tokensRouted ?? 0;
          // A worker's total is cumulative; a smaller one is a new process under the same name.
          const routed = report.tokensRouted >= before ? report.tokensRouted - before : report.tokensRouted;
          return [worker, { imbalance: [...report.imbalance], tokensRouted: routed }];
        }),
      ),
    };
  }
}
