/**
 * The routing decision, made once per request: which decode worker serves it, and whether a prefill worker
 * computes its prompt (and which). Fed by the workers' numbered KV events (lib/kv/events.ts) through the
 * prefix index, and by a load estimate kept here (updated when a request is routed, at its first token and at
 * its end). The cost function is cost.ts; the remote-prefill rule is lib/router/disagg.ts's, applied to the
 * uncached tokens of the chosen decode worker.
 */
import { debuglog } from 'node:util';
import { kvBlockHashLanes } from '../kv/hash.js';
import type { KvEventBatch, KvSnapshot } from '../kv/events.js';
import { DEFAULT_DISAGGREGATION_THRESHOLDS, shouldPrefillRemotely, type DisaggregationThresholds } from './disagg.js';
import { costOf, DEFAULT_COST_WEIGHTS, explainCost, type CostTerms, type CostWeights } from './cost.js';
import { LoadEstimate, type WorkerLoadEstimate } from './load-estimate.js';
import { KvPrefixIndex } from './prefix-index.js';
import {
  createPolicy,
  DEFAULT_ROUTER_POLICY,
  type Candidates,
  type RouterPolicyName,
  type RoutingPolicy,
} from './policies.js';

/** A worker that has finished this many requests of at least one full block without one KV event is reported. */
export const KV_EVENTS_MISSING_AFTER = 4;

/** The graph's `router` section: the policy and the cost function's weights. */
export interface RouterConfig extends CostWeights {
  policy: RouterPolicyName;
}

export interface KvRouterOptions extends Partial<CostWeights> {
  policy?: RouterPolicyName;
  /** Uniforms in [0, 1) for `random` and for the temperature's draw (inject a seeded one in tests). */
  random?: () => number;
  /** Debug log (the formula with live values per candidate). Default: NODE_DEBUG=tandem-router. */
  debug?: ((line: string) => void) & { enabled?: boolean };
  /** Asks a worker for a snapshot of its KV blocks (after a gap in its event numbers, or a new incarnation). */
  requestSnapshot?: (worker: string) => void;
  /** A worker serves requests but publishes no KV events (true), or has published some since (false). */
  onEventsMissing?: (worker: string, missing: boolean) => void;
  /** Worker ids to size the index for (it grows past it). Default 64. */
  maxWorkers?: number;
  /** The load estimate to share with other routers (a launcher's frontends); default one of its own. */
  load?: LoadEstimate;
}

export interface RouteCandidate {
  name: string;
  /** Requests in flight there from the routers sharing this load estimate (load-estimate.ts). */
  inflight: number;
  /** Load the worker reports (running + waiting + prefilling). */
  reportedLoad: number;
  /** Tokens per KV block of its engine. */
  blockSize: number;
}

export interface RouteChoice {
  worker: string;
  blockSize: number;
  /** Leading blocks of the prompt the worker holds, by the index. */
  cachedBlocks: number;
  /** Prompt tokens the worker would compute: the prompt less its cached blocks. */
  uncachedTokens: number;
}

export interface RouteRequest {
  requestId: string;
  promptIds: ArrayLike<number>;
  /** Decode (or aggregated) workers that can serve it. */
  decode: readonly RouteCandidate[];
  /** Prefill workers (none: the decode worker prefills). */
  prefill?: readonly RouteCandidate[];
  /** Requests waiting in the prefill pool, not counting this one. */
  prefillQueueDepth?: number;
  thresholds?: DisaggregationThresholds;
}

export interface RouteDecision {
  decode: RouteChoice;
  /** The prefill worker that computes the prompt; null: the decode worker prefills locally. */
  prefill: RouteChoice | null;
}

export type KvIngest = 'applied' | 'stale' | 'gap';

interface WorkerState {
  id: number;
  incarnation: number | undefined;
  /** The last batch applied (or included in the snapshot applied). */
  seq: number;
  awaitingSnapshot: boolean;
  /** Its entry in the (possibly shared) load estimate. */
  load: WorkerLoadEstimate;
  /** KV batches and snapshots with blocks received: 0 means the worker has never said it holds anything. */
  eventsSeen: number;
  /** Requests with at least one full block finished on it. */
  servedWithBlocks: number;
  missingReported: boolean;
}

interface Admission {
  worker: string;
  /** The entry the request's load was added to (released there, even after the worker left). */
  load: WorkerLoadEstimate;
  queuedPrefillBlocks: number;
  decodeBlocks: number;
  /** The prompt fills at least one block: serving it stores a block (a KV event) unless it was cached. */
  fullBlock: boolean;
}

const defaultDebug = debuglog('tandem-router');

export class KvRouter {
  readonly index: KvPrefixIndex;
  readonly policyName: RouterPolicyName;
  /** Requests in flight and cost.ts's load terms per worker; shared by the routers of one launcher. */
  readonly load: LoadEstimate;
  private readonly weights: CostWeights;
  private readonly policy: RoutingPolicy;
  private readonly debug: KvRouterOptions['debug'];
  private readonly workers = new Map<string, WorkerState>();
  private readonly freeIds: number[] = [];
  private nextId = 0;
  private readonly admissions = new Map<string, Admission[]>();
  private overlapScratch: Int32Array;
  private laneScratch = new Uint32Array(512);
  /** Inside route(): the hash memo is valid. */
  private deciding = false;
  /** The last prompt hashed (by identity) and its lanes, a view of laneScratch: valid for one decision. */
  private hashMemo: { prompt: ArrayLike<number> | null; length: number; blockSize: number; lanes: Uint32Array } = {
    prompt: null,
    length: 0,
    blockSize: 0,
    lanes: new Uint32Array(0),
  };
  private scratch: Candidates & { cached: Int32Array } = {
    n: 0,
    costs: new Float64Array(0),
    inflight: new Float64Array(0),
    reportedLoad: new Float64Array(0),
    cached: new Int32Array(0),
  };
  private stateScratch: WorkerState[] = [];

  constructor(private readonly options: KvRouterOptions = {}) {
    this.weights = {
      prefillWeight: options.prefillWeight ?? DEFAULT_COST_WEIGHTS.prefillWeight,
      temperature: options.temperature ?? DEFAULT_COST_WEIGHTS.temperature,
    };
    this.policyName = options.policy ?? DEFAULT_ROUTER_POLICY;
    this.policy = createPolicy(this.policyName, this.weights, options.random ?? Math.random);
    this.debug = options.debug ?? defaultDebug;
    this.index = new KvPrefixIndex({ maxWorkers: options.maxWorkers ?? 64 });
    this.load = options.load ?? new LoadEstimate();
    this.overlapScratch = new Int32Array(this.index.maxWorkers);
  }

  private state(name: string): WorkerState {
    let s = this.workers.get(name);
    if (!s) {
      const id = this.freeIds.pop() ?? this.nextId++;
      this.index.ensureWorkers(id + 1);
      s = {
        id,
        incarnation: undefined,
        seq: 0,
        awaitingSnapshot: false,
        load: this.load.of(name),
        eventsSeen: 0,
        servedWithBlocks: 0,
        missingReported: false,
      };
      this.workers.set(name, s);
    }
    return s;
  }

  /** Blocks the index holds for `worker`. */
  blocksOf(worker: string): number {
    const s = this.workers.get(worker);
    return s ? this.index.blocksOfWorker(s.id) : 0;
  }

  /** The load estimate of `worker` (cost.ts's terms less the request's own). */
  loadOf(worker: string): { queuedPrefillBlocks: number; decodeBlocks: number } {
    const e = this.load.peek(worker);
    return { queuedPrefillBlocks: e?.queuedPrefillBlocks ?? 0, decodeBlocks: e?.decodeBlocks ?? 0 };
  }

  /** The worker is gone: its blocks leave the index, its id is free again. */
  removeWorker(name: string): void {
    const s = this.workers.get(name);
    if (!s) return;
    this.index.dropWorker(s.id);
    this.workers.delete(name);
    this.load.forget(name);
    this.freeIds.push(s.id);
    if (s.missingReported) this.options.onEventsMissing?.(name, false);
  }

  /**
   * A batch of KV events from `worker`. Applied when it is the next in its incarnation's numbering; a gap or a
   * new incarnation asks for a snapshot (the old incarnation's blocks leave the index at once), and batches are
   * ignored until it comes.
   */
  onKvEvents(worker: string, batch: KvEventBatch): KvIngest {
    const s = this.state(worker);
    if (s.incarnation !== batch.incarnation) {
      this.resync(worker, s, batch.incarnation);
      return 'gap';
    }
    if (s.awaitingSnapshot || batch.seq <= s.seq) return 'stale';
    if (batch.seq !== s.seq + 1) {
      this.resync(worker, s, batch.incarnation);
      return 'gap';
    }
    s.seq = batch.seq;
    this.ingest(s.id, batch);
    this.sawEvents(worker, s);
    return 'applied';
  }

  /** Applies a batch's events to the index for worker id `w` (no numbering checks: the benchmark's entry). */
  ingest(w: number, batch: Pick<KvEventBatch, 'kinds' | 'counts' | 'lanes'>): void {
    const { kinds, counts, lanes } = batch;
    let from = 0;
    for (let e = 0; e < kinds.length; e++) {
      const count = counts[e]!;
      this.index.apply(w, kinds[e] === 1, lanes, from, count);
      from += count;
    }
  }

  /** A worker's snapshot (on registration, or asked for): its blocks replace whatever the index had for it. */
  onKvSnapshot(worker: string, snapshot: KvSnapshot): void {
    const s = this.state(worker);
    this.index.dropWorker(s.id);
    this.index.apply(s.id, true, snapshot.lanes);
    s.incarnation = snapshot.incarnation;
    s.seq = snapshot.seq;
    s.awaitingSnapshot = false;
    if (snapshot.lanes.length > 0 || snapshot.seq > 0) this.sawEvents(worker, s);
  }

  private resync(worker: string, s: WorkerState, incarnation: number): void {
    if (s.incarnation !== incarnation) {
      // A new incarnation: the process restarted, its cache is gone.
      this.index.dropWorker(s.id);
      s.incarnation = incarnation;
      s.seq = 0;
    }
    if (s.awaitingSnapshot) return;
    s.awaitingSnapshot = true;
    this.options.requestSnapshot?.(worker);
  }

  private sawEvents(worker: string, s: WorkerState): void {
    s.eventsSeen++;
    if (s.missingReported) {
      s.missingReported = false;
      this.options.onEventsMissing?.(worker, false);
    }
  }

  /**
   * Chooses the decode worker, and a prefill worker when remote prefill pays off (disagg.ts's rule on the
   * chosen decode worker's uncached tokens and the prefill pool's queue); records the load it adds.
   */
  route(request: RouteRequest): RouteDecision | undefined {
    // The prompt is hashed once for both choices; the memo lives for this decision only (a caller may reuse and
    // mutate its array between decisions).
    this.hashMemo.prompt = null;
    this.deciding = true;
    try {
      return this.decide(request);
    } finally {
      this.deciding = false;
      this.hashMemo.prompt = null;
    }
  }

  private decide(request: RouteRequest): RouteDecision | undefined {
    const decode = this.choose(request.decode, request.promptIds, 'decode', request.requestId);
    if (!decode) return undefined;
    const prefillWorkers = request.prefill ?? [];
    let prefill: RouteChoice | null = null;
    if (
      prefillWorkers.length > 0 &&
      shouldPrefillRemotely(
        {
          uncachedPromptTokens: decode.uncachedTokens,
          prefillQueueDepth: request.prefillQueueDepth ?? 0,
          prefillWorkersAvailable: prefillWorkers.length,
        },
        request.thresholds ?? DEFAULT_DISAGGREGATION_THRESHOLDS,
      )
    )
      prefill = this.choose(prefillWorkers, request.promptIds, 'prefill', request.requestId) ?? null;
    const promptTokens = request.promptIds.length;
    const decodeUncached = Math.ceil(promptTokens / decode.blockSize) - decode.cachedBlocks;
    const admissions: Admission[] = [
      {
        worker: decode.worker,
        load: this.state(decode.worker).load,
        queuedPrefillBlocks: prefill ? 0 : decodeUncached,
        decodeBlocks: decodeUncached,
        fullBlock: promptTokens >= decode.blockSize,
      },
    ];
    if (prefill)
      admissions.push({
        worker: prefill.worker,
        load: this.state(prefill.worker).load,
        queuedPrefillBlocks: Math.ceil(promptTokens / prefill.blockSize) - prefill.cachedBlocks,
        decodeBlocks: 0,
        fullBlock: promptTokens >= prefill.blockSize,
      });
    this.admit(request.requestId, admissions);
    return { decode, prefill };
  }

  /** One worker among `candidates` for the prompt, by the policy. */
  choose(
    candidates: readonly RouteCandidate[],
    promptIds: ArrayLike<number>,
    pool: string,
    requestId = '',
  ): RouteChoice | undefined {
    const n = candidates.length;
    if (n === 0) return undefined;
    const d = this.decisionScratch(n);
    const states = this.stateScratch;
    // One walk of the index per block size among the candidates (a pool normally has one).
    let walkedBlockSize = 0;
    let walked: Int32Array = this.overlapScratch;
    let otherSizes: Map<number, Int32Array> | undefined;
    for (let i = 0; i < n; i++) {
      const c = candidates[i]!;
      const s = (states[i] = this.state(c.name));
      const bs = c.blockSize;
      let overlaps: Int32Array | undefined;
      if (bs === walkedBlockSize) overlaps = walked;
      else overlaps = otherSizes?.get(bs);
      if (!overlaps) {
        overlaps = this.walk(promptIds, bs, walkedBlockSize === 0 ? this.overlapScratch : undefined);
        if (walkedBlockSize === 0) {
          walkedBlockSize = bs;
          walked = overlaps;
        } else (otherSizes ??= new Map()).set(bs, overlaps);
      }
      const requestBlocks = Math.ceil(promptIds.length / bs);
      const cached = overlaps[s.id]!;
      d.cached[i] = cached;
      d.costs[i] = costOf(
        this.weights.prefillWeight,
        requestBlocks - cached,
        s.load.queuedPrefillBlocks,
        s.load.decodeBlocks,
      );
      d.inflight[i] = c.inflight;
      d.reportedLoad[i] = c.reportedLoad;
    }
    if (!this.deciding) this.hashMemo.prompt = null;
    const at = this.policy.choose(d, pool, candidates);
    const chosen = candidates[at]!;
    const cachedBlocks = d.cached[at]!;
    if (this.debug && this.debug.enabled !== false) {
      for (let i = 0; i < n; i++) {
        const c = candidates[i]!;
        const terms: CostTerms = {
          uncachedBlocks: Math.ceil(promptIds.length / c.blockSize) - d.cached[i]!,
          queuedPrefillBlocks: states[i]!.load.queuedPrefillBlocks,
          decodeBlocks: states[i]!.load.decodeBlocks,
        };
        this.debug(`route ${requestId} ${pool}: ${explainCost(c.name, terms, this.weights)}`);
      }
      this.debug(`route ${requestId} ${pool}: ${this.policyName} chose ${chosen.name} (${cachedBlocks} cached blocks)`);
    }
    return {
      worker: chosen.name,
      blockSize: chosen.blockSize,
      cachedBlocks,
      uncachedTokens: Math.max(0, promptIds.length - cachedBlocks * chosen.blockSize),
    };
  }

  /**
   * Leading blocks of the prompt (in blocks of `blockSize`) each worker id holds; into `out` when given. The
   * engine keeps each worker's holdings prefix-closed, so the index bisects the chain (a few probes) instead of
   * probing every block.
   */
  private walk(promptIds: ArrayLike<number>, blockSize: number, out?: Int32Array): Int32Array {
    const full = Math.floor(promptIds.length / blockSize);
    const lanes = this.hashes(promptIds, blockSize, full);
    let target = out ?? new Int32Array(this.index.maxWorkers);
    if (target.length < this.index.maxWorkers) target = new Int32Array(this.index.maxWorkers);
    if (out && target !== out) this.overlapScratch = target;
    this.index.overlapsPrefixClosed(lanes, full, target);
    return target;
  }

  /**
   * The prompt's chained block hashes, computed once per request and block size: the decode and the prefill
   * choice of one decision reuse them (hashing a 2,000-token prompt costs more than bisecting the index).
   */
  private hashes(promptIds: ArrayLike<number>, blockSize: number, full: number): Uint32Array {
    const memo = this.hashMemo;
    if (memo.prompt === promptIds && memo.length === promptIds.length && memo.blockSize === blockSize)
      return memo.lanes;
    if (this.laneScratch.length < 2 * full) this.laneScratch = new Uint32Array(4 * full);
    memo.lanes = kvBlockHashLanes(promptIds, blockSize, full, this.laneScratch);
    memo.prompt = promptIds;
    memo.length = promptIds.length;
    memo.blockSize = blockSize;
    return memo.lanes;
  }

  /** Per-decision arrays, reused (a decision allocates nothing per candidate). */
  private decisionScratch(n: number): Candidates & { cached: Int32Array } {
    if (this.scratch.costs.length < n) {
      const size = Math.max(n, 2 * this.scratch.costs.length);
      this.scratch = {
        n,
        costs: new Float64Array(size),
        inflight: new Float64Array(size),
        reportedLoad: new Float64Array(size),
        cached: new Int32Array(size),
      };
      this.stateScratch = new Array<WorkerState>(size);
    }
    this.scratch.n = n;
    return this.scratch;
  }

  private admit(requestId: string, admissions: Admission[]): void {
    this.release(requestId, false);
    for (const a of admissions) {
      a.load.queuedPrefillBlocks += a.queuedPrefillBlocks;
      a.load.decodeBlocks += a.decodeBlocks;
    }
    this.admissions.set(requestId, admissions);
  }

  /** The request's first token came: its prompt is computed, its prefill no longer queued anywhere. */
  firstToken(requestId: string): void {
    for (const a of this.admissions.get(requestId) ?? []) {
      a.load.queuedPrefillBlocks -= a.queuedPrefillBlocks;
      a.queuedPrefillBlocks = 0;
    }
  }

  /** The request ended (finished, failed or aborted): its load leaves the estimate. */
  complete(requestId: string): void {
    this.release(requestId, true);
  }

  private release(requestId: string, served: boolean): void {
    const admissions = this.admissions.get(requestId);
    if (!admissions) return;
    this.admissions.delete(requestId);
    for (const a of admissions) {
      a.load.queuedPrefillBlocks -= a.queuedPrefillBlocks;
      a.load.decodeBlocks -= a.decodeBlocks;
      const s = this.workers.get(a.worker);
      if (!s || s.load !== a.load || !served || !a.fullBlock) continue;
      // KV routing's most common silent failure: a worker that serves but never says what it caches.
      s.servedWithBlocks++;
      if (s.eventsSeen === 0 && !s.missingReported && s.servedWithBlocks >= KV_EVENTS_MISSING_AFTER) {
        s.missingReported = true;
        this.options.onEventsMissing?.(a.worker, true);
      }
    }
  }
}
