/**
 * Serving metrics, Prometheus format (prom-client). Every metric name is defined here and only here; code
 * that records a metric goes through `ServeMetrics`, and dashboards and tests read the names from
 * `METRIC_NAMES`.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { ExpertLoadReport } from '../worker/protocol.js';

export const METRIC_NAMES = {
  /**
   * Counter; labels model, endpoint (chat|completions), stream (true|false), status: success (answered 2xx),
   * client_error (4xx: refused request), server_error (5xx, 503 included, or a stream that failed or was cut at
   * shutdown), canceled (the client went away).
   */
  requests: 'tandem_frontend_requests_total',
  /** Gauge: requests being served (accepted, not yet finished). */
  inflightRequests: 'tandem_frontend_inflight_requests',
  /** Gauge: requests accepted that have not received their first token (the queue in front of the workers). */
  queuedRequests: 'tandem_frontend_queued_requests',
  /** Histogram, seconds: request accepted to first generated token. */
  timeToFirstToken: 'tandem_frontend_time_to_first_token_seconds',
  /** Histogram, seconds: between consecutive generated tokens of a request. */
  interTokenLatency: 'tandem_frontend_inter_token_latency_seconds',
  /** Histogram, seconds: request accepted to last token. */
  requestDuration: 'tandem_frontend_request_duration_seconds',
  /** Counter: prompt tokens of accepted requests. */
  inputTokens: 'tandem_frontend_input_tokens_total',
  /** Counter: generated tokens. */
  outputTokens: 'tandem_frontend_output_tokens_total',
  /** Counter: KV cache bytes moved from prefill to decode workers. */
  kvTransferBytes: 'tandem_kv_transfer_bytes_total',
  /** Histogram, seconds: one request's KV transfer, first block posted to last block landed. */
  kvTransferSeconds: 'tandem_kv_transfer_seconds',
  /** Histogram, seconds: one remote prefill on a prefill worker, prompt received to KV landed. */
  remotePrefillSeconds: 'tandem_remote_prefill_seconds',
  /** Counter; label where (local|remote): prompts prefilled by the decode worker or by a prefill worker. */
  prefills: 'tandem_prefills_total',
  /** Gauge: requests waiting in the prefill pool (all prefill workers). */
  prefillQueueDepth: 'tandem_prefill_queue_depth',
  /** Counter; labels pool, reason (signal name, exit_<code>, start_failure): crashed workers restarted. */
  workerRestarts: 'tandem_worker_restarts_total',
  /** Gauge; labels worker, pool: KV blocks in use (by requests, or held for a transfer), from heartbeats. */
  workerKvBlocksUsed: 'tandem_worker_kv_blocks_used',
  /** Gauge; labels worker, pool: the worker's KV pool, in blocks. */
  workerKvBlocksTotal: 'tandem_worker_kv_blocks_total',
  /** Gauge; labels worker, pool: used / total KV blocks, 0..1. */
  workerKvUsage: 'tandem_worker_kv_usage_ratio',
  /** Counter; label worker: prompt tokens of the requests the worker served (decode or aggregated). */
  workerPromptTokens: 'tandem_worker_prompt_tokens_total',
  /**
   * Counter; label worker: of those, tokens served from a prefix cache (the prefill worker's, when remote).
   * Cache hit rate = cached / prompt tokens.
   */
  workerCachedPromptTokens: 'tandem_worker_cached_prompt_tokens_total',
  /**
   * Gauge; labels worker, layer: a mixture-of-experts worker's max / mean tokens per expert in that layer over its
   * window (the last 60 heartbeats; 1 = balanced, or nothing routed). Only for models with experts; no per-expert
   * series (cardinality: workers x layers).
   */
  moeExpertImbalance: 'tandem_moe_expert_imbalance',
  /**
   * Counter; label worker: expert assignments on a mixture-of-experts worker, a token counting once per MoE layer
   * and expert it is routed to (top-k per layer).
   */
  moeTokensRouted: 'tandem_moe_tokens_routed_total',
  /**
   * Counter; labels worker, applied: EPLB decisions on a worker whose pool sets `eplb` (applied "true": a new
   * expert placement was adopted; "false": the gain was below minImbalanceGain and the placement stayed).
   */
  moeEplbDecisions: 'tandem_moe_eplb_decisions_total',
  /** Gauge; label worker: 1 while the worker serves requests but has published no KV event (KV routing is blind). */
  routerKvEventsMissing: 'tandem_router_kv_events_missing',
  /** Counter; label worker: gaps in a worker's KV event numbers (each asks it for a snapshot). */
  routerKvEventGaps: 'tandem_router_kv_event_gaps_total',
  /** Counter; label policy: requests routed. */
  routerDecisions: 'tandem_router_decisions_total',
  /**
   * Counter; label outcome: requests whose worker died mid-stream, re-issued to another worker (migrated), or
   * ended with an error because their migrations were used up (limit_reached) or no worker could take them
   * (no_worker). See lib/frontend/migration.ts.
   */
  requestMigrations: 'tandem_request_migrations_total',
  /** Gauge; label pool (prefill|decode): replicas the planner wants (lib/planner). */
  plannerDesiredReplicas: 'tandem_planner_desired_replicas',
  /** Gauge; label pool: replicas serving now, as the planner's connector reports them. */
  plannerReplicas: 'tandem_planner_replicas',
  /**
   * Counter; labels kind (sla|load), action (hold|add|remove|move|reshape|plan): planner decisions. `plan` is an SLA
   * decision, whatever replicas it set.
   */
  plannerDecisions: 'tandem_planner_decisions_total',
  /** Counter; labels action (add|remove|move|reshape), outcome (done|failed): what the connector carried out. */
  plannerActions: 'tandem_planner_actions_total',
} as const;

/** Cumulative readings the planner takes each interval and differences (lib/planner/observe.ts). */
export interface PlannerReadings {
  /** Requests finished (with or without a first token). */
  finished: number;
  inputTokens: number;
  outputTokens: number;
  ttftSeconds: { sum: number; count: number };
  itlSeconds: { sum: number; count: number };
  /** Requests waiting for their first token now. */
  queued: number;
  /** Requests waiting in the prefill pool now. */
  prefillQueue: number;
  /**
   * Each mixture-of-experts worker's expert load as its last heartbeat reported it (per-layer imbalance over its
   * window, cumulative tokens routed); absent or empty for dense models.
   */
  expertLoad?: Record<string, ExpertLoadReport>;
}

export type RequestStatus = 'success' | 'client_error' | 'server_error' | 'canceled';
export type Endpoint = 'chat' | 'completions';

// Latency buckets from 1 ms to 1 min: a tiny CPU model answers in milliseconds, a long prompt on a large
// model in tens of seconds.
const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
const ITL_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];
const DURATION_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
const TRANSFER_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1];

/** The serving metrics of one process, in their own registry (so that several frontends can share a process). */
export class ServeMetrics {
  readonly registry = new Registry();
  private readonly requests = new Counter({
    name: METRIC_NAMES.requests,
    help: 'Completion requests by endpoint and outcome',
    labelNames: ['model', 'endpoint', 'stream', 'status'] as const,
    registers: [this.registry],
  });
  private readonly inflight = new Gauge({
    name: METRIC_NAMES.inflightRequests,
    help: 'Requests being served',
    registers: [this.registry],
  });
  private readonly queued = new Gauge({
    name: METRIC_NAMES.queuedRequests,
    help: 'Requests waiting for their first token',
    registers: [this.registry],
  });
  private readonly ttft = new Histogram({
    name: METRIC_NAMES.timeToFirstToken,
    help: 'Time to first token, seconds',
    labelNames: ['model'] as const,
    buckets: TTFT_BUCKETS,
    registers: [this.registry],
  });
  private readonly itl = new Histogram({
    name: METRIC_NAMES.interTokenLatency,
    help: 'Inter-token latency, seconds',
    labelNames: ['model'] as const,
    buckets: ITL_BUCKETS,
    registers: [this.registry],
  });
  private readonly duration = new Histogram({
    name: METRIC_NAMES.requestDuration,
    help: 'Request duration, seconds',
    labelNames: ['model'] as const,
    buckets: DURATION_BUCKETS,
    registers: [this.registry],
  });
  private readonly inputTokens = new Counter({
    name: METRIC_NAMES.inputTokens,
    help: 'Prompt tokens',
    labelNames: ['model'] as const,
    registers: [this.registry],
  });
  private readonly outputTokens = new Counter({
    name: METRIC_NAMES.outputTokens,
    help: 'Generated tokens',
    labelNames: ['model'] as const,
    registers: [this.registry],
  });
  private readonly kvBytes = new Counter({
    name: METRIC_NAMES.kvTransferBytes,
    help: 'KV cache bytes transferred from prefill to decode workers',
    registers: [this.registry],
  });
  private readonly kvSeconds = new Histogram({
    name: METRIC_NAMES.kvTransferSeconds,
    help: 'KV cache transfer time per request, seconds',
    buckets: TRANSFER_BUCKETS,
    registers: [this.registry],
  });
  private readonly remotePrefillSeconds = new Histogram({
    name: METRIC_NAMES.remotePrefillSeconds,
    help: 'Remote prefill time per request on the prefill worker (compute and KV transfer), seconds',
    buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry],
  });
  private readonly prefills = new Counter({
    name: METRIC_NAMES.prefills,
    help: 'Prompts prefilled locally (decode worker) or remotely (prefill worker)',
    labelNames: ['where'] as const,
    registers: [this.registry],
  });
  private readonly prefillQueue = new Gauge({
    name: METRIC_NAMES.prefillQueueDepth,
    help: 'Requests waiting in the prefill pool',
    registers: [this.registry],
  });

  private readonly workerRestarts = new Counter({
    name: METRIC_NAMES.workerRestarts,
    help: 'Crashed workers restarted, by pool and reason (signal, exit code, or start_failure)',
    labelNames: ['pool', 'reason'] as const,
    registers: [this.registry],
  });
  private readonly workerKvUsed = new Gauge({
    name: METRIC_NAMES.workerKvBlocksUsed,
    help: 'KV cache blocks in use on each worker',
    labelNames: ['worker', 'pool'] as const,
    registers: [this.registry],
  });
  private readonly workerKvTotal = new Gauge({
    name: METRIC_NAMES.workerKvBlocksTotal,
    help: 'KV cache blocks of each worker',
    labelNames: ['worker', 'pool'] as const,
    registers: [this.registry],
  });
  private readonly workerKvUsage = new Gauge({
    name: METRIC_NAMES.workerKvUsage,
    help: "Share of each worker's KV cache blocks in use, 0..1",
    labelNames: ['worker', 'pool'] as const,
    registers: [this.registry],
  });
  private readonly workerPromptTokens = new Counter({
    name: METRIC_NAMES.workerPromptTokens,
    help: 'Prompt tokens of the requests each worker served',
    labelNames: ['worker'] as const,
    registers: [this.registry],
  });
  private readonly workerCachedPromptTokens = new Counter({
    name: METRIC_NAMES.workerCachedPromptTokens,
    help: 'Prompt tokens served from a prefix cache, by the worker that served the request',
    labelNames: ['worker'] as const,
    registers: [this.registry],
  });
  private readonly kvEventsMissing = new Gauge({
    name: METRIC_NAMES.routerKvEventsMissing,
    help: 'Workers serving requests without publishing KV events (1): the KV-aware router cannot see their cache',
    labelNames: ['worker'] as const,
    registers: [this.registry],
  });
  private readonly kvEventGaps = new Counter({
    name: METRIC_NAMES.routerKvEventGaps,
    help: "Gaps in workers' KV event numbers (each asks the worker for a snapshot)",
    labelNames: ['worker'] as const,
    registers: [this.registry],
  });
  private readonly routerDecisions = new Counter({
    name: METRIC_NAMES.routerDecisions,
    help: 'Requests routed, by routing policy',
    labelNames: ['policy'] as const,
    registers: [this.registry],
  });
  private readonly migrations = new Counter({
    name: METRIC_NAMES.requestMigrations,
    help: 'Requests whose worker died mid-stream, by outcome (migrated, limit_reached, no_worker)',
    labelNames: ['outcome'] as const,
    registers: [this.registry],
  });
  private readonly plannerDesired = new Gauge({
    name: METRIC_NAMES.plannerDesiredReplicas,
    help: 'Replicas the planner wants, by pool',
    labelNames: ['pool'] as const,
    registers: [this.registry],
  });
  private readonly plannerReplicas = new Gauge({
    name: METRIC_NAMES.plannerReplicas,
    help: 'Replicas serving now, by pool, as the planner sees them',
    labelNames: ['pool'] as const,
    registers: [this.registry],
  });
  private readonly plannerDecisions = new Counter({
    name: METRIC_NAMES.plannerDecisions,
    help: 'Planner decisions, by kind (sla, load) and action (hold, add, remove, move, reshape, plan)',
    labelNames: ['kind', 'action'] as const,
    registers: [this.registry],
  });
  private readonly plannerActions = new Counter({
    name: METRIC_NAMES.plannerActions,
    help: 'Planner actions carried out by its connector, by action and outcome (done, failed)',
    labelNames: ['action', 'outcome'] as const,
    registers: [this.registry],
  });
  /** Pool of each worker with KV series, so that its series can be dropped by name. */
  private readonly workerPools = new Map<string, string>();

  constructor() {
    // Series that exist before the first event, so that a scrape shows every metric from the start.
    for (const where of ['local', 'remote']) this.prefills.inc({ where }, 0);
    for (const outcome of ['migrated', 'limit_reached', 'no_worker']) this.migrations.inc({ outcome }, 0);
  }

  requestStarted(): void {
    this.inflight.inc();
    this.queued.inc();
  }
  /** Once per request, when its first token arrives; `seconds` since the request was accepted. */
  firstToken(model: string, seconds: number): void {
    this.queued.dec();
    this.ttft.observe({ model }, seconds);
  }
  interToken(model: string, seconds: number): void {
    this.itl.observe({ model }, seconds);
  }
  tokens(model: string, input: number, output: number): void {
    if (input) this.inputTokens.inc({ model }, input);
    if (output) this.outputTokens.inc({ model }, output);
  }
  /** Once per started request; `gotFirstToken` false when it ended while still queued. */
  requestFinished(model: string, seconds: number, gotFirstToken: boolean): void {
    this.inflight.dec();
    if (!gotFirstToken) this.queued.dec();
    this.duration.observe({ model }, seconds);
  }
  /** Every completion request, accepted or not. */
  countRequest(model: string, endpoint: Endpoint, stream: boolean, status: RequestStatus): void {
    this.requests.inc({ model, endpoint, stream: String(stream), status });
  }
  /** One remote prefill: KV bytes moved, the transfer's time and, where known, the whole prefill's. */
  kvTransfer(bytes: number, seconds: number, prefillSeconds?: number): void {
    this.kvBytes.inc(bytes);
    this.kvSeconds.observe(seconds);
    if (prefillSeconds !== undefined) this.remotePrefillSeconds.observe(prefillSeconds);
  }
  prefill(where: 'local' | 'remote'): void {
    this.prefills.inc({ where });
  }
  setPrefillQueueDepth(depth: number): void {
    this.prefillQueue.set(depth);
  }
  /** A crashed worker of `pool` is being restarted; `reason`: signal name, exit_<code> or start_failure. */
  workerRestart(pool: string, reason: string): void {
    this.workerRestarts.inc({ pool, reason });
  }
  /** A worker's KV pool as its last heartbeat (or registration) reported it. */
  workerKvBlocks(worker: string, pool: string, used: number, total: number): void {
    const labels = { worker, pool };
    this.workerPools.set(worker, pool);
    this.workerKvUsed.set(labels, used);
    this.workerKvTotal.set(labels, total);
    this.workerKvUsage.set(labels, total > 0 ? used / total : 0);
  }
  /** A request's prompt on the worker that serves it: its length and the part a prefix cache held. */
  promptCache(worker: string, promptTokens: number, cachedTokens: number): void {
    this.workerPromptTokens.inc({ worker }, promptTokens);
    this.workerCachedPromptTokens.inc({ worker }, cachedTokens);
  }
  kvEventsMissingOn(worker: string, missing: boolean): void {
    this.kvEventsMissing.set({ worker }, missing ? 1 : 0);
  }
  kvEventGap(worker: string): void {
    this.kvEventGaps.inc({ worker });
  }
  routed(policy: string): void {
    this.routerDecisions.inc({ policy });
  }
  private readonly moeImbalance = new Gauge({
    name: METRIC_NAMES.moeExpertImbalance,
    help: 'Max / mean tokens per expert of each MoE layer over the worker window (1 = balanced)',
    labelNames: ['worker', 'layer'] as const,
    registers: [this.registry],
  });
  private readonly moeTokensRouted = new Counter({
    name: METRIC_NAMES.moeTokensRouted,
    help: 'Tokens routed to experts on each MoE worker (once per MoE layer and expert chosen)',
    labelNames: ['worker'] as const,
    registers: [this.registry],
  });
  private readonly moeEplbDecisions = new Counter({
    name: METRIC_NAMES.moeEplbDecisions,
    help: 'EPLB decisions on each MoE worker with online expert balancing (applied: a new placement adopted)',
    labelNames: ['worker', 'applied'] as const,
    registers: [this.registry],
  });
  /** Per MoE worker: its layers reported, and its last heartbeat's report. */
  private readonly moeWorkers = new Map<
    string,
    { layers: number; tokensRouted: number; imbalance: number[]; eplb?: { decisions: number; applied: number } }
  >();

  /** A MoE worker's heartbeat: its per-layer imbalance and its cumulative tokens routed. */
  expertLoad(worker: string, report: ExpertLoadReport): void {
    const seen = this.moeWorkers.get(worker) ?? { layers: 0, tokensRouted: 0, imbalance: [] };
    report.imbalance.forEach((v, layer) => this.moeImbalance.set({ worker, layer: String(layer) }, v));
    // The worker's totals are cumulative; a smaller one is a new process under the same name (restart).
    const since = (now: number, before: number) => (now >= before ? now - before : now);
    const delta = since(report.tokensRouted, seen.tokensRouted);
    if (delta > 0) this.moeTokensRouted.inc({ worker }, delta);
    if (report.eplb) {
      const restarted = report.eplb.decisions < (seen.eplb?.decisions ?? 0);
      const applied = restarted ? report.eplb.applied : report.eplb.applied - (seen.eplb?.applied ?? 0);
      const kept = (restarted ? report.eplb.decisions : report.eplb.decisions - (seen.eplb?.decisions ?? 0)) - applied;
      if (applied > 0) this.moeEplbDecisions.inc({ worker, applied: 'true' }, applied);
      if (kept > 0) this.moeEplbDecisions.inc({ worker, applied: 'false' }, kept);
    }
    this.moeWorkers.set(worker, {
      layers: Math.max(seen.layers, report.imbalance.length),
      tokensRouted: report.tokensRouted,
      imbalance: [...report.imbalance],
      ...(report.eplb && { eplb: { ...report.eplb } }),
    });
  }

  /** A worker left: its series go with it (a restarted worker registers afresh). */
  dropWorker(worker: string): void {
    const moe = this.moeWorkers.get(worker);
    if (moe) {
      this.moeWorkers.delete(worker);
      for (let layer = 0; layer < moe.layers; layer++) this.moeImbalance.remove({ worker, layer: String(layer) });
      this.moeTokensRouted.remove({ worker });
      for (const applied of ['true', 'false']) this.moeEplbDecisions.remove({ worker, applied });
    }
    const pool = this.workerPools.get(worker);
    if (pool === undefined) return;
    this.workerPools.delete(worker);
    const labels = { worker, pool };
    for (const gauge of [this.workerKvUsed, this.workerKvTotal, this.workerKvUsage]) gauge.remove(labels);
  }

  /** A request whose worker died: re-issued elsewhere, or ended (lib/frontend/migration.ts). */
  requestMigration(outcome: 'migrated' | 'limit_reached' | 'no_worker'): void {
    this.migrations.inc({ outcome });
  }

  /** The planner's view of a pool: replicas wanted and serving. */
  plannerPool(pool: string, desired: number, serving: number): void {
    this.plannerDesired.set({ pool }, desired);
    this.plannerReplicas.set({ pool }, serving);
  }
  plannerDecision(kind: string, action: string): void {
    this.plannerDecisions.inc({ kind, action });
  }
  plannerAction(action: string, outcome: 'done' | 'failed'): void {
    this.plannerActions.inc({ action, outcome });
  }

  /** What the planner observes, as cumulative totals read from the metrics themselves (no text scraping). */
  async plannerReadings(): Promise<PlannerReadings> {
    const sumValues = async (m: Counter | Gauge) => (await m.get()).values.reduce((a, v) => a + v.value, 0);
    const histogram = async (h: Histogram) => {
      let sum = 0;
      let count = 0;
      for (const v of (await h.get()).values) {
        if (v.metricName?.endsWith('_sum')) sum += v.value;
        else if (v.metricName?.endsWith('_count')) count += v.value;
      }
      return { sum, count };
    };
    const duration = await histogram(this.duration);
    return {
      finished: duration.count,
      inputTokens: await sumValues(this.inputTokens),
      outputTokens: await sumValues(this.outputTokens),
      ttftSeconds: await histogram(this.ttft),
      itlSeconds: await histogram(this.itl),
      queued: await sumValues(this.queued),
      prefillQueue: await sumValues(this.prefillQueue),
      expertLoad: Object.fromEntries(
        [...this.moeWorkers].map(([worker, m]) => [
          worker,
          { imbalance: [...m.imbalance], tokensRouted: m.tokensRouted },
        ]),
      ),
    };
  }

  /** The Prometheus text exposition of every metric. */
  text(): Promise<string> {
    return this.registry.metrics();
  }
  get contentType(): string {
    return this.registry.contentType;
  }
}
