/**
 * The request plane in the launcher: a GenerationBackend that sends each request to a decode (or
 * aggregated) worker with the router's decision on its prefill (lib/router: the policy, the prefix index fed
 * by the workers' KV events, the remote-prefill rule), relays prefill requests between workers, and streams
 * the tokens back.
 */
import { TandemError } from '../errors.js';
import {
  KvRouter,
  type LoadEstimate,
  type RouteCandidate,
  type RouterConfig,
  type WorkerLoadEstimate,
} from './index.js';
import type { GenerationBackend, GenerationChunk, GenerationRequest } from '../frontend/backend.js';
import { NoWorkerAvailableError } from '../frontend/backend.js';
import type { ControlPlane, LiveWorker } from '../control/control-plane.js';
import type { DisaggregationThresholds } from './disagg.js';
import { DEFAULT_BLOCK_SIZE, type ServingMode } from '../deploy/graph.js';
import type { ServeMetrics } from '../frontend/metrics.js';
import type { FromWorker, ToWorker } from '../worker/protocol.js';

/** A request that failed in a worker, or whose worker died. */
export class WorkerRequestError extends TandemError {}

export interface RouterOptions {
  /** Policy and cost weights (the graph's `router` section); default the kv policy with default weights. */
  routing?: Partial<RouterConfig>;
  /** The remote-prefill rule's thresholds (the graph's `disaggregation` section). */
  thresholds?: DisaggregationThresholds;
  /** Where warnings go (a worker that publishes no KV events). */
  log?: (line: string) => void;
  /** Uniforms in [0, 1) for the random policy and temperature draws. */
  random?: () => number;
  /** The load estimate shared by the routers of one launcher (lib/router/load-estimate.ts); default its own. */
  load?: LoadEstimate;
}

interface Stream {
  worker: string;
  /** The load entries this request counts in (its decode worker's; its prefill worker's while one runs). */
  workerLoad: WorkerLoadEstimate;
  prefillLoad?: WorkerLoadEstimate;
  promptTokens: number;
  gotFirstToken: boolean;
  prefill?: string;
  chunks: GenerationChunk[];
  wake?: () => void;
  done: boolean;
  error?: Error;
}

export class Router implements GenerationBackend {
  private readonly streams = new Map<string, Stream>();
  /**
   * Remote prefills still running for requests that have ended (served by their decode worker after a timeout,
   * failed there, or left by their client): the decode worker keeps the blocks it lent until the prefill
   * worker's answer, which is relayed to it from here (or until that worker is gone).
   */
  private readonly owedPrefills = new Map<string, { decode: string; prefill: string }>();
  /** The routing decisions and what they are made from (prefix index, load estimate). */
  readonly kv: KvRouter;

  constructor(
    private readonly controlPlane: ControlPlane,
    private readonly send: (worker: string, message: ToWorker) => boolean,
    private readonly mode: ServingMode,
    private readonly metrics?: ServeMetrics,
    private readonly options: RouterOptions = {},
  ) {
    const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
    this.kv = new KvRouter({
      ...options.routing,
      ...(options.random ? { random: options.random } : {}),
      ...(options.load ? { load: options.load } : {}),
      requestSnapshot: (worker) => this.send(worker, { type: 'kvSnapshotRequest' }),
      onEventsMissing: (worker, missing) => {
        metrics?.kvEventsMissingOn(worker, missing);
        if (missing)
          log(
            `WARNING: worker ${worker} serves requests but has published no KV events: KV-aware routing cannot ` +
              'see its cache (is prefix caching off, or are its events lost?)',
          );
      },
    });
    controlPlane.on('removed', (name, reason) => this.workerGone(name, reason));
  }

  private candidate(w: LiveWorker): RouteCandidate {
    const name = w.registration.name;
    return {
      name,
      inflight: this.kv.load.peek(name)?.inflight ?? 0,
      reportedLoad: w.load.running + w.load.waiting + w.load.prefilling,
      blockSize: w.registration.kvPool.blockSize ?? DEFAULT_BLOCK_SIZE,
    };
  }

  private servingWorkers(): LiveWorker[] {
    const roles = this.mode === 'disagg' ? ['decode', 'aggregated'] : ['aggregated', 'decode'];
    for (const role of roles) {
      const found = this.controlPlane.workers(role as 'decode');
      if (found.length) return found;
    }
    return [];
  }

  available(): boolean {
    return this.servingWorkers().length > 0;
  }

  generate(request: GenerationRequest): AsyncIterable<GenerationChunk> {
    const { requestId, signal } = request;
    const prefillWorkers = this.mode === 'disagg' ? this.controlPlane.workers('prefill') : [];
    const decision = this.kv.route({
      requestId,
      promptIds: request.promptIds,
      decode: this.servingWorkers().map((w) => this.candidate(w)),
      // A migrated request is prefilled where it lands: its prompt and the output streamed so far (protocol.ts).
      prefill: request.resume ? [] : prefillWorkers.map((w) => this.candidate(w)),
      prefillQueueDepth: this.prefillQueueDepth(),
      ...(this.options.thresholds ? { thresholds: this.options.thresholds } : {}),
    });
    if (!decision) throw new NoWorkerAvailableError();
    this.metrics?.routed(this.kv.policyName);
    const name = decision.decode.worker;
    const stream: Stream = {
      worker: name,
      workerLoad: this.kv.load.of(name),
      promptTokens: request.promptIds.length,
      gotFirstToken: false,
      chunks: [],
      done: false,
    };
    this.streams.set(requestId, stream);
    stream.workerLoad.inflight++;
    const sent = this.send(name, {
      type: 'generate',
      requestId,
      promptIds: [...request.promptIds],
      sampling: request.sampling,
      prefill: decision.prefill ? { worker: decision.prefill.worker } : null,
      // Request migration (lib/frontend/migration.ts): the output a worker that died had streamed.
      ...(request.resume ? { resume: { outputTokenIds: [...request.resume.outputTokenIds] } } : {}),
    });
    if (!sent) {
      this.finish(requestId);
      throw new NoWorkerAvailableError(`worker ${name} cannot take requests now`);
    }
    const onAbort = () => {
      this.send(name, { type: 'abort', requestId });
      if (stream.prefill) this.send(stream.prefill, { type: 'abort', requestId });
    };
    signal.addEventListener('abort', onAbort, { once: true });
    const self = this;
    return {
      async *[Symbol.asyncIterator]() {
        try {
          for (;;) {
            while (stream.chunks.length) {
              const chunk = stream.chunks.shift()!;
              yield chunk;
              if (chunk.finishReason) return;
            }
            if (stream.error) throw stream.error;
            if (stream.done) return;
            await new Promise<void>((resolve) => (stream.wake = resolve));
            stream.wake = undefined;
          }
        } finally {
          signal.removeEventListener('abort', onAbort);
          if (!stream.done) onAbort(); // the consumer stopped early: free the worker's blocks
          self.finish(requestId);
        }
      },
    };
  }

  private finish(requestId: string): void {
    const s = this.streams.get(requestId);
    if (!s) return;
    this.streams.delete(requestId);
    this.kv.complete(requestId);
    s.workerLoad.inflight--;
    // A request can end before its prefill worker's prefillDone arrives (that comes on another channel).
    if (s.prefill) {
      s.prefillLoad!.inflight--;
      this.metrics?.setPrefillQueueDepth(this.prefillQueueDepth());
      this.owedPrefills.set(requestId, { decode: s.worker, prefill: s.prefill });
    }
    s.prefill = undefined;
    s.prefillLoad = undefined;
  }

  /**
   * The request ended on its decode worker's side (it failed there, or the worker is gone). A remote prefill
   * still running for it is of no use: its prefill worker is told to stop.
   */
  private fail(requestId: string, error: Error): void {
    this.push(requestId, (s) => {
      s.error = error;
      s.done = true;
      if (s.prefill) this.send(s.prefill, { type: 'abort', requestId });
    });
  }

  private push(requestId: string, update: (s: Stream) => void): void {
    const s = this.streams.get(requestId);
    if (!s) return;
    update(s);
    s.wake?.();
  }

  /** A message from worker `from`. */
  onMessage(from: string, m: FromWorker): void {
    switch (m.type) {
      case 'tokens':
        this.push(m.requestId, (s) => {
          if (!s.gotFirstToken && m.tokenIds.length > 0) {
            s.gotFirstToken = true;
            this.kv.firstToken(m.requestId);
          }
          if (m.cachedTokens !== undefined) this.metrics?.promptCache(from, s.promptTokens, m.cachedTokens);
          s.chunks.push({
            tokenIds: m.tokenIds,
            finishReason: m.finishReason,
            ...(m.logprobs ? { logprobs: m.logprobs } : {}),
            ...(m.cachedTokens !== undefined ? { cachedTokens: m.cachedTokens } : {}),
          });
          if (m.finishReason) s.done = true;
        });
        return;
      case 'kvEvents':
        if (this.kv.onKvEvents(from, m.batch) === 'gap') this.metrics?.kvEventGap(from);
        return;
      case 'kvSnapshot':
        this.kv.onKvSnapshot(from, m.snapshot);
        return;
      case 'failed':
        this.fail(m.requestId, new WorkerRequestError(m.code, `${from}: ${m.message}`));
        return;
      case 'needPrefill': {
        const s = this.streams.get(m.requestId);
        const target = this.controlPlane.get(m.prefillWorker);
        if (!s || !target) {
          this.send(from, { type: 'prefillFailed', requestId: m.requestId, reason: 'prefill worker gone' });
          return;
        }
        s.prefill = m.prefillWorker;
        s.prefillLoad = this.kv.load.of(m.prefillWorker);
        s.prefillLoad.inflight++;
        this.metrics?.setPrefillQueueDepth(this.prefillQueueDepth());
        const ok = this.send(m.prefillWorker, {
          type: 'prefill',
          requestId: m.requestId,
          promptIds: m.promptIds,
          sampling: m.sampling,
          target: { worker: from, blockIds: m.blockIds, cachedTokens: m.cachedTokens },
        });
        if (!ok) this.prefillEnded(m.requestId, false, 'prefill worker unreachable');
        return;
      }
      case 'prefillDone': {
        if (m.ok) {
          this.metrics?.kvTransfer(m.bytes, (m.transferMs ?? m.ms) / 1000, m.ms / 1000);
          this.metrics?.prefill('remote');
        }
        const owed = this.owedPrefills.get(m.requestId);
        if (owed) {
          // The request ended first; its decode worker keeps the blocks it lent until it hears the prefill
          // worker is done with them (a prefill that succeeded tells it itself, with its KV notification).
          this.owedPrefills.delete(m.requestId);
          if (!m.ok) this.send(owed.decode, { type: 'prefillFailed', requestId: m.requestId, reason: m.error ?? '' });
        } else this.prefillEnded(m.requestId, m.ok, m.error ?? '');
        return;
      }
      case 'abandonPrefill': {
        const s = this.streams.get(m.requestId);
        if (s?.prefill) this.send(s.prefill, { type: 'abort', requestId: m.requestId });
        return;
      }
      case 'localPrefill':
        this.metrics?.prefill('local');
        return;
      default:
        return;
    }
  }

  private prefillQueueDepth(): number {
    return this.controlPlane
      .workers('prefill')
      .reduce((n, w) => n + (this.kv.load.peek(w.registration.name)?.inflight ?? 0), 0);
  }

  private prefillEnded(requestId: string, ok: boolean, reason: string): void {
    const s = this.streams.get(requestId);
    if (!s || !s.prefill) return;
    s.prefillLoad!.inflight--;
    s.prefill = undefined;
    s.prefillLoad = undefined;
    this.metrics?.setPrefillQueueDepth(this.prefillQueueDepth());
    // On failure the decode worker computes the prompt itself (it holds the blocks it allocated).
    if (!ok) this.send(s.worker, { type: 'prefillFailed', requestId, reason });
  }

  private workerGone(name: string, reason: string): void {
    this.kv.removeWorker(name);
    for (const [requestId, owed] of this.owedPrefills) {
      if (owed.prefill === name)
        this.send(owed.decode, {
          type: 'prefillFailed',
          requestId,
          reason: `prefill worker ${name} stopped (${reason})`,
        });
      if (owed.prefill === name || owed.decode === name) this.owedPrefills.delete(requestId);
    }
    for (const [requestId, s] of this.streams) {
      if (s.worker === name) {
        this.fail(requestId, new WorkerRequestError('TANDEM_WORKER_GONE', `worker ${name} stopped (${reason})`));
      } else if (s.prefill === name) {
        this.prefillEnded(requestId, false, `prefill worker ${name} stopped (${reason})`);
      }
    }
  }
}
