/**
 * `LlmEngine`: the reference `Engine` (engine.ts), driving a `ModelRunner` (runner.ts) with the scheduler
 * (scheduler.ts), the KV block manager (block-manager.ts) and the sampler (sampler.ts).
 *
 * The step loop runs while there is work and idles otherwise: schedule, one `forward()` in flight, then apply
 * the step (record computed tokens, commit full blocks to the prefix cache, sample, check stop conditions,
 * stream outputs). Between steps it yields to the event loop, so new requests and aborts get in.
 *
 * A request aborted or failed while its step is in flight ends for its caller at once, but its blocks are only
 * released once the step completes: the runner may still be writing into them.
 * A runner error fails the requests of that step (EngineRequestError, `cause` = the runner's error), releases
 * their blocks, and the loop goes on with the rest.
 */
import { BadArgumentError, CanceledError, DisposedError, EngineRequestError, KvCacheFullError } from '../errors.js';
import { kvBlockHashes } from '../kv/hash.js';
import { KvBlockManager, type KvEvent } from './block-manager.js';
import type {
  BlockAllocation,
  Engine,
  EngineInfo,
  EngineOutput,
  EngineRequest,
  EngineStats,
  FinishReason,
  PrefillResult,
  RequestHandle,
  RequestResult,
} from './engine.js';
import type { ModelRunner } from './runner.js';
import {
  applyPenalties,
  Sampler,
  seedHalves,
  type PenaltyParams,
  type SamplerParams,
  type StepLogits,
  type TokenLogprobs,
} from './sampler.js';
import { Scheduler, Sequence, type ScheduledStep } from './scheduler.js';

export interface LlmEngineOptions {
  /** Tokens per step over all sequences (chunked prefill budget). Default 512. */
  maxNumBatchedTokens?: number;
  /** Sequences per step. Default 256. */
  maxNumSeqs?: number;
  /** Reuse full KV blocks across requests with the same prefix. Default true. */
  enablePrefixCaching?: boolean;
  /** Longest sequence (prompt + generated); capped by the runner's maxPositions and the pool. */
  maxModelLen?: number;
  /** Default `detokenize` for requests with stop strings. */
  detokenize?: (tokenIds: readonly number[]) => string;
  /** Dispose the runner with the engine. Default true. */
  ownsRunner?: boolean;
}

type RequestKind = 'generate' | 'prefill';

/** Extra tokens decoded around the longest stop string, so a match split over several tokens is seen. */
const STOP_WINDOW_SLACK = 8;

/** Outputs of one request, consumed by async iteration and/or `result()`. */
class RequestStream implements RequestHandle {
  private readonly queue: EngineOutput[] = [];
  private head = 0;
  private wake: (() => void) | null = null;
  private ended = false;
  private error: unknown = undefined;
  private final: RequestResult | undefined;
  private resultPromise: Promise<RequestResult> | undefined;
  private settle: { resolve: (r: RequestResult) => void; reject: (e: unknown) => void } | undefined;

  constructor(
    readonly requestId: string,
    private readonly onAbort: () => void,
  ) {}

  push(out: EngineOutput): void {
    this.queue.push(out);
    this.notify();
  }

  end(final: RequestResult): void {
    this.ended = true;
    this.final = final;
    this.settle?.resolve(final);
    this.notify();
  }

  fail(error: unknown): void {
    this.ended = true;
    this.error = error;
    this.settle?.reject(error);
    this.notify();
  }

  abort(): void {
    this.onAbort();
  }

  result(): Promise<RequestResult> {
    if (!this.resultPromise) {
      if (this.final) this.resultPromise = Promise.resolve(this.final);
      else if (this.ended) this.resultPromise = Promise.reject(this.error);
      else
        this.resultPromise = new Promise<RequestResult>((resolve, reject) => {
          this.settle = { resolve, reject };
        });
    }
    return this.resultPromise;
  }

  [Symbol.asyncIterator](): AsyncIterator<EngineOutput> {
    return {
      next: async (): Promise<IteratorResult<EngineOutput>> => {
        for (;;) {
          if (this.head < this.queue.length) {
            const value = this.queue[this.head]!;
            this.queue[this.head++] = undefined as unknown as EngineOutput;
            if (this.head > 1024 && this.head * 2 > this.queue.length) {
              this.queue.splice(0, this.head);
              this.head = 0;
            }
            return { value, done: false };
          }
          if (this.ended) {
            if (this.error !== undefined) throw this.error;
            return { value: undefined, done: true };
          }
          await new Promise<void>((resolve) => (this.wake = resolve));
        }
      },
      return: async (): Promise<IteratorResult<EngineOutput>> => ({ value: undefined, done: true }),
    };
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }
}

interface LiveRequest {
  id: string;
  kind: RequestKind;
  seq: Sequence<LiveRequest>;
  sampling: SamplerParams;
  maxTokens: number;
  /** Stops end the request only after this many generated tokens. */
  minTokens: number;
  stopTokenIds: Set<number> | null;
  stop: readonly string[] | null;
  stopWindow: number;
  detokenize: ((ids: readonly number[]) => string) | undefined;
  /** -1: no logprobs. */
  logprobs: number;
  /** Output tokens generated elsewhere before this engine took the request over (ResumeState). */
  resumedTokens: number;
  /** Null: no penalties. Else the counts of output tokens (resumed ones included) and, for repetition, the prompt's. */
  penalties: { params: PenaltyParams; outputCounts: Map<number, number>; promptTokens: Set<number> | null } | null;
  logprobList: TokenLogprobs[] | undefined;
  finished: boolean;
  finishReason: FinishReason | null;
  stopReason: number | string | undefined;
  stream: RequestStream | undefined;
  prefill: { resolve: (r: PrefillResult) => void; reject: (e: unknown) => void } | undefined;
}

export class LlmEngine implements Engine {
  readonly info: EngineInfo;
  private readonly blocks: KvBlockManager;
  private readonly scheduler: Scheduler<LiveRequest>;
  private readonly sampler: Sampler;
  private readonly requests = new Map<string, LiveRequest>();
  private readonly listeners = new Set<(event: KvEvent) => void>();
  private readonly detokenize: ((ids: readonly number[]) => string) | undefined;
  private readonly ownsRunner: boolean;
  private nextId = 0;
  /** Scratch row for penalized sampling (allocated on first use). */
  private penaltyRow: Float32Array | undefined;
  private loop: Promise<void> = Promise.resolve();
  /** True from `kick` until the loop finds nothing to schedule (set and cleared synchronously). */
  private looping = false;
  /** Work arrived while the loop was running (it may have been past its last look): run it again. */
  private kicked = false;
  /** Sequences of the step in flight. */
  private inFlight: Set<Sequence<LiveRequest>> | null = null;
  private disposed = false;
  private readonly counters = { steps: 0, computedTokens: 0, generatedTokens: 0, failedSteps: 0 };

  constructor(
    private readonly runner: ModelRunner,
    options: LlmEngineOptions = {},
  ) {
    this.blocks = new KvBlockManager({
      numBlocks: runner.numBlocks,
      blockSize: runner.blockSize,
      enablePrefixCaching: options.enablePrefixCaching ?? true,
      onEvent: (event) => this.emit(event),
    });
    const maxModelLen = Math.min(options.maxModelLen ?? runner.maxPositions, runner.maxPositions);
    this.scheduler = new Scheduler(this.blocks, {
      maxNumBatchedTokens: options.maxNumBatchedTokens,
      maxNumSeqs: options.maxNumSeqs,
      maxModelLen,
    });
    this.sampler = new Sampler(runner.vocabSize);
    this.detokenize = options.detokenize;
    this.ownsRunner = options.ownsRunner ?? true;
    this.info = Object.freeze({
      vocabSize: runner.vocabSize,
      blockSize: runner.blockSize,
      numBlocks: runner.numBlocks,
      maxModelLen: this.scheduler.maxModelLen,
    });
  }

  addRequest(request: EngineRequest): RequestHandle {
    const req = this.newRequest(request, 'generate');
    req.stream = new RequestStream(req.id, () => this.abort(req.id));
    this.scheduler.add(req.seq);
    this.requests.set(req.id, req);
    this.kick();
    return req.stream;
  }

  abort(requestId: string): boolean {
    const req = this.requests.get(requestId);
    if (!req || req.finished) return false;
    this.finish(req, 'abort');
    return true;
  }

  allocateBlocks(promptTokenIds: ArrayLike<number>): BlockAllocation {
    this.checkLive();
    const prompt = this.checkTokens(promptTokenIds, 'promptTokenIds');
    this.scheduler.checkPromptLength(prompt.length);
    const bs = this.info.blockSize;
    const full = Math.floor(prompt.length / bs);
    const matched = this.blocks.matchPrefix(kvBlockHashes(prompt, bs, full), prompt, full);
    const need = Math.ceil(prompt.length / bs) - matched.length;
    const fresh = this.blocks.allocate(need);
    if (!fresh) {
      this.blocks.free(matched);
      throw new KvCacheFullError(
        `allocateBlocks: ${need} free KV blocks needed for a prompt of ${prompt.length} tokens, ` +
          `${this.blocks.numAllocatable} available of ${this.info.numBlocks}`,
      );
    }
    const blockIds = new Int32Array(matched.length + need);
    blockIds.set(matched);
    blockIds.set(fresh, matched.length);
    return { blockIds, cachedTokens: matched.length * bs };
  }

  prefillOnly(request: EngineRequest, blockIds?: ArrayLike<number>): Promise<PrefillResult> {
    this.refuseResume(request, 'prefillOnly');
    const req = this.newRequest(request, 'prefill');
    const seq = req.seq;
    const bs = this.info.blockSize;
    if (blockIds !== undefined) {
      const ids = this.checkOwnedBlocks(blockIds, seq.numPromptTokens);
      seq.blockIds = ids;
      seq.pinned = true;
      // Leading blocks that already hold this prompt's prefix (cache hits from allocateBlocks) are not recomputed.
      const maxCached = Math.floor((seq.numPromptTokens - 1) / bs);
      seq.hashBlocks(maxCached, bs);
      let cached = 0;
      while (cached < maxCached && this.blocks.hashOf(ids[cached]!) === seq.blockHashes[cached]) cached++;
      this.checkWritable(ids, cached);
      seq.numComputed = cached * bs;
      seq.numCommittedBlocks = cached;
      seq.numCachedPromptTokens = cached * bs;
    }
    const done = new Promise<PrefillResult>((resolve, reject) => (req.prefill = { resolve, reject }));
    this.scheduler.add(seq);
    this.requests.set(req.id, req);
    this.kick();
    return done;
  }

  decodeFromBlocks(
    request: EngineRequest,
    blockIds: ArrayLike<number>,
    firstToken: number,
    firstLogprobs?: TokenLogprobs,
  ): RequestHandle {
    this.refuseResume(request, 'decodeFromBlocks');
    const req = this.newRequest(request, 'generate');
    const seq = req.seq;
    const n = seq.numPromptTokens;
    this.checkTokens([firstToken], 'firstToken');
    const ids = this.checkOwnedBlocks(blockIds, n);
    const full = Math.floor(n / this.info.blockSize);
    seq.hashBlocks(full, this.info.blockSize);
    for (let i = 0; i < full; i++) {
      const h = this.blocks.hashOf(ids[i]!);
      if (h !== undefined && h !== seq.blockHashes[i])
        throw new BadArgumentError(`block ${ids[i]} holds a cached prefix of another prompt`);
    }
    this.checkWritable(ids, full);
    seq.blockIds = ids;
    seq.numComputed = n;
    seq.numCachedPromptTokens = n;
    // The transferred prompt blocks now serve this engine's prefix cache too.
    this.scheduler.commitFullBlocks(seq, Math.floor(n / this.info.blockSize));
    req.stream = new RequestStream(req.id, () => this.abort(req.id));
    this.requests.set(req.id, req);
    let lp: TokenLogprobs | undefined;
    if (req.logprobs >= 0)
      lp = firstLogprobs ?? {
        tokenId: firstToken,
        logprob: NaN,
        topTokenIds: new Int32Array(0),
        topLogprobs: new Float32Array(0),
      };
    this.acceptToken(req, firstToken, lp);
    if (!req.finished) {
      this.scheduler.add(seq);
      this.kick();
    }
    return req.stream;
  }

  releaseBlocks(blockIds: ArrayLike<number>): void {
    this.blocks.free(blockIds);
    this.kick();
  }

  onKvEvent(listener: (event: KvEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  stats(): EngineStats {
    const b = this.blocks;
    return {
      running: this.scheduler.numRunning,
      waiting: this.scheduler.numWaiting,
      numBlocks: b.numBlocks,
      usedBlocks: b.numUsed,
      cachedBlocks: b.numCached,
      kvUsage: b.numUsed / b.numBlocks,
      steps: this.counters.steps,
      computedTokens: this.counters.computedTokens,
      generatedTokens: this.counters.generatedTokens,
      prefixCacheHitBlocks: b.hitBlocks,
      prefixCacheQueriedBlocks: b.queriedBlocks,
      preemptions: this.scheduler.numPreemptions,
      failedSteps: this.counters.failedSteps,
    };
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    for (const req of [...this.requests.values()]) this.fail(req, new DisposedError('the engine was disposed'));
    await this.loop;
    if (this.ownsRunner) await this.runner.dispose();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }

  // ---- request setup ----

  private checkLive(): void {
    if (this.disposed) throw new DisposedError('the engine was disposed');
  }

  private checkTokens(ids: ArrayLike<number>, what: string): Int32Array {
    if (ids === null || typeof ids !== 'object' || typeof ids.length !== 'number')
      throw new BadArgumentError(`${what} must be an array of token ids`);
    const V = this.info.vocabSize;
    const out = new Int32Array(ids.length);
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= V)
        throw new BadArgumentError(`${what}[${i}] = ${id} is not a token id (0..${V - 1})`);
      out[i] = id;
    }
    return out;
  }

  /** Blocks from index `from` on will be written: none may hold a cached (immutable, shareable) prefix. */
  private checkWritable(ids: number[], from: number): void {
    for (let i = from; i < ids.length; i++)
      if (this.blocks.hashOf(ids[i]!) !== undefined)
        throw new BadArgumentError(
          `block ${ids[i]} (index ${i}) holds a cached prefix and would be written; pass fresh blocks from there on`,
        );
  }

  /** Blocks a caller hands over: in use, distinct, enough for `tokens` tokens. */
  private checkOwnedBlocks(blockIds: ArrayLike<number>, tokens: number): number[] {
    const ids = Array.from(blockIds);
    const need = Math.ceil(tokens / this.info.blockSize);
    if (ids.length < need)
      throw new BadArgumentError(`${ids.length} blocks given for ${tokens} tokens; ${need} are needed`);
    const seen = new Set<number>();
    for (const id of ids) {
      if (!Number.isSafeInteger(id) || id < 0 || id >= this.info.numBlocks)
        throw new BadArgumentError(`block id ${id} is out of range (0..${this.info.numBlocks - 1})`);
      if (seen.has(id)) throw new BadArgumentError(`block id ${id} is listed twice`);
      if (this.blocks.refCount(id) <= 0)
        throw new BadArgumentError(`block ${id} is not allocated (get blocks from allocateBlocks or prefillOnly)`);
      seen.add(id);
    }
    return ids;
  }

  /** A migrated request is prefilled (prompt and resumed output) where it lands: `addRequest` only. */
  private refuseResume(request: EngineRequest, what: string): void {
    if (request?.resume !== undefined)
      throw new BadArgumentError(
        `${what}: resume is served by addRequest only (prompt and resumed output prefill here)`,
      );
  }

  private newRequest(request: EngineRequest, kind: RequestKind): LiveRequest {
    this.checkLive();
    if (request === null || typeof request !== 'object') throw new BadArgumentError('request must be an object');
    const id = request.requestId ?? `req-${this.nextId++}`;
    if (typeof id !== 'string' || id.length === 0) throw new BadArgumentError('requestId must be a non-empty string');
    if (this.requests.has(id)) throw new BadArgumentError(`request ${JSON.stringify(id)} is already live`);
    const prompt = this.checkTokens(request.promptTokenIds, 'promptTokenIds');
    this.scheduler.checkPromptLength(prompt.length);

    const s = request.sampling ?? {};
    const fail = (m: string): never => {
      throw new BadArgumentError(`request ${JSON.stringify(id)}: sampling.${m}`);
    };
    const temperature = s.temperature ?? 1;
    if (typeof temperature !== 'number' || !Number.isFinite(temperature) || temperature < 0)
      fail(`temperature must be a finite number >= 0 (got ${temperature})`);
    const topK = s.topK ?? 0;
    if (!Number.isSafeInteger(topK) || topK < -1) fail(`topK must be an integer >= -1 (got ${topK})`);
    const topP = s.topP ?? 1;
    if (typeof topP !== 'number' || !(topP > 0 && topP <= 1)) fail(`topP must be in (0, 1] (got ${topP})`);
    const seed = s.seed ?? Math.floor(Math.random() * 0x20000000000000);
    const { seedLo, seedHi } = seedHalves(seed);
    const maxTokens = s.maxTokens ?? Number.MAX_SAFE_INTEGER;
    if (!Number.isSafeInteger(maxTokens) || maxTokens < 1)
      fail(`maxTokens must be a positive integer (got ${maxTokens})`);
    const minTokens = s.minTokens ?? 0;
    if (!Number.isSafeInteger(minTokens) || minTokens < 0 || minTokens > maxTokens)
      fail(`minTokens must be an integer in 0 .. maxTokens (${maxTokens}) (got ${minTokens})`);
    let stopTokenIds: Set<number> | null = null;
    if (s.stopTokenIds && s.stopTokenIds.length > 0) {
      stopTokenIds = new Set(this.checkTokens(s.stopTokenIds, 'sampling.stopTokenIds'));
    }
    let stop: readonly string[] | null = null;
    let stopWindow = 0;
    const detokenize = request.detokenize ?? this.detokenize;
    if (s.stop && s.stop.length > 0) {
      for (const str of s.stop)
        if (typeof str !== 'string' || str.length === 0) fail('stop must hold non-empty strings');
      if (!detokenize) fail('stop needs a detokenize function (on the request or the engine)');
      stop = [...s.stop];
      // A UTF-16 unit is at most 3 UTF-8 bytes; a byte-level tokenizer spends a token per byte.
      stopWindow = 3 * Math.max(...stop.map((x) => x.length)) + STOP_WINDOW_SLACK;
    }
    const logprobs = s.logprobs ?? -1;
    if (!Number.isSafeInteger(logprobs) || logprobs < -1) fail(`logprobs must be an integer >= 0 (got ${logprobs})`);
    const presence = s.presencePenalty ?? 0;
    const frequency = s.frequencyPenalty ?? 0;
    const repetition = s.repetitionPenalty ?? 1;
    for (const [name, v] of [
      ['presencePenalty', presence],
      ['frequencyPenalty', frequency],
    ] as const)
      if (typeof v !== 'number' || !(v >= -2 && v <= 2)) fail(`${name} must be a number in [-2, 2] (got ${v})`);
    if (typeof repetition !== 'number' || !Number.isFinite(repetition) || !(repetition > 0))
      fail(`repetitionPenalty must be a finite number > 0 (got ${repetition})`);
    const penalized = presence !== 0 || frequency !== 0 || repetition !== 1;

    const req: LiveRequest = {
      id,
      kind,
      seq: undefined as unknown as Sequence<LiveRequest>,
      sampling: { temperature, topK: topK < 0 ? 0 : topK, topP, seedLo, seedHi },
      maxTokens,
      minTokens,
      stopTokenIds,
      stop,
      stopWindow,
      detokenize,
      logprobs,
      resumedTokens: 0,
      penalties: penalized
        ? {
            params: { presence, frequency, repetition },
            outputCounts: new Map(),
            promptTokens: repetition !== 1 ? new Set(prompt) : null,
          }
        : null,
      logprobList: logprobs >= 0 ? [] : undefined,
      finished: false,
      finishReason: null,
      stopReason: undefined,
      stream: undefined,
      prefill: undefined,
    };
    req.seq = new Sequence(id, prompt, req);
    if (request.resume !== undefined) this.resume(req, request.resume);
    return req;
  }

  /**
   * Appends a migrated request's earlier output to its sequence as generated tokens, so that everything that
   * counts output (the sampler's counter, maxTokens, minTokens, stop strings' window) continues from there.
   * Refuses output the request could not have produced without ending.
   */
  private resume(req: LiveRequest, resume: EngineRequest['resume']): void {
    const fail = (m: string): never => {
      throw new BadArgumentError(`request ${JSON.stringify(req.id)}: resume${m}`);
    };
    if (resume === null || typeof resume !== 'object') fail(' must be an object { outputTokenIds }');
    const output = this.checkTokens(resume!.outputTokenIds, 'resume.outputTokenIds');
    const seq = req.seq;
    if (output.length >= req.maxTokens)
      fail(`.outputTokenIds holds ${output.length} tokens: maxTokens (${req.maxTokens}) was already reached`);
    if (seq.numPromptTokens + output.length >= this.info.maxModelLen)
      fail(
        `.outputTokenIds: prompt (${seq.numPromptTokens}) and output (${output.length}) already reach the context ` +
          `limit (${this.info.maxModelLen})`,
      );
    for (let i = 0; i < output.length; i++) {
      // Token i + 1 of the output: a stop there (past minTokens) would have ended the request.
      if (i + 1 > req.minTokens && req.stopTokenIds?.has(output[i]!))
        fail(`.outputTokenIds[${i}] = ${output[i]} is a stop token: the request had ended there`);
      seq.append(output[i]!);
      this.countOutput(req, output[i]!);
    }
    req.resumedTokens = output.length;
  }

  // ---- the step loop ----

  private kick(): void {
    if (this.disposed) return;
    if (this.looping) {
      // The loop may already have found nothing to do and be on its way out: make it look again.
      this.kicked = true;
      return;
    }
    this.looping = true;
    this.kicked = false;
    this.loop = this.runLoop();
  }

  private async runLoop(): Promise<void> {
    try {
      await this.steps();
    } catch (e) {
      // A bug in scheduling or bookkeeping: fail what is live rather than leave callers hanging.
      for (const req of [...this.requests.values()]) this.fail(req, e);
    } finally {
      this.inFlight = null;
      this.looping = false;
      if (this.kicked) this.kick();
    }
  }

  private async steps(): Promise<void> {
    while (!this.disposed) {
      this.kicked = false;
      const step = this.scheduler.schedule();
      if (!step) return;
      this.inFlight = new Set(step.seqs);
      let logits: StepLogits | undefined;
      let error: unknown;
      try {
        const nseq = step.seqs.length;
        if (this.runner.forwardSampled) {
          // Sampling's reductions where the logits are: only candidates and sums come back.
          const plan = this.sampler.plan(
            step.seqs.map((seq, i) =>
              step.samples[i]
                ? {
                    params: seq.owner.sampling,
                    counter: seq.numGenerated,
                    logprobs: seq.owner.logprobs,
                    fullRow: seq.owner.penalties !== null,
                  }
                : null,
            ),
          );
          logits = await this.runner.forwardSampled(step.batch, plan);
          if (!(logits.ints instanceof Int32Array) || logits.ints.length < nseq * 4)
            throw new BadArgumentError(`the model runner returned sampling results for fewer than ${nseq} sequences`);
        } else {
          logits = await this.runner.forward(step.batch);
          const want = nseq * this.info.vocabSize;
          if (!(logits instanceof Float32Array) || logits.length < want)
            throw new BadArgumentError(
              `the model runner returned ${logits instanceof Float32Array ? logits.length : typeof logits} logits; ${want} expected`,
            );
        }
      } catch (e) {
        error = e;
      }
      this.inFlight = null;
      this.applyStep(step, error === undefined ? logits : undefined, error);
      // Let new requests, aborts and I/O in between steps.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  }

  private applyStep(step: ScheduledStep<LiveRequest>, logits: StepLogits | undefined, error: unknown): void {
    this.counters.steps++;
    // Requests that ended while the step was in flight give their blocks back now.
    for (const seq of step.seqs) if (seq.owner.finished && seq.status !== 'done') this.scheduler.remove(seq);

    if (!logits) {
      this.counters.failedSteps++;
      for (const seq of step.seqs) {
        const req = seq.owner;
        if (req.finished) continue;
        const message = error instanceof Error ? error.message : String(error);
        this.fail(req, new EngineRequestError(`request ${req.id} failed: ${message}`, req.id, { cause: error }));
      }
      return;
    }

    this.scheduler.complete(step);
    for (let i = 0; i < step.seqs.length; i++) {
      const seq = step.seqs[i]!;
      const req = seq.owner;
      if (req.finished) continue;
      this.counters.computedTokens += step.numNew[i]!;
      if (!step.samples[i]) continue;
      const token = req.penalties
        ? this.sampler.sample(this.penalizedRow(logits, i, req), 0, req.sampling, seq.numGenerated)
        : this.sampler.sample(logits, i, req.sampling, seq.numGenerated);
      const lp = req.logprobs >= 0 ? this.sampler.logprobs(logits, i, token, req.logprobs) : undefined;
      this.acceptToken(req, token, lp);
    }
  }

  /** Row `i` of a step's logits with `req`'s penalties applied, in a scratch row (the raw row stays for logprobs). */
  private penalizedRow(logits: StepLogits, i: number, req: LiveRequest): Float32Array {
    const raw = this.sampler.row(logits, i);
    if (!raw) throw new BadArgumentError(`the model runner returned no whole row for penalized request ${req.id}`);
    this.penaltyRow ??= new Float32Array(this.info.vocabSize);
    this.penaltyRow.set(raw);
    const p = req.penalties!;
    applyPenalties(this.penaltyRow, p.params, p.outputCounts, p.promptTokens);
    return this.penaltyRow;
  }

  private countOutput(req: LiveRequest, token: number): void {
    const counts = req.penalties?.outputCounts;
    if (counts) counts.set(token, (counts.get(token) ?? 0) + 1);
  }

  /** Appends a generated token, checks stop conditions, and streams it (finishing the request if it stops). */
  private acceptToken(req: LiveRequest, token: number, lp: TokenLogprobs | undefined): void {
    const seq = req.seq;
    seq.append(token);
    this.countOutput(req, token);
    this.counters.generatedTokens++;
    if (lp && req.logprobList) req.logprobList.push(lp);

    let reason: FinishReason | null = null;
    // A stop ends the request only once minTokens tokens precede it.
    const stopsApply = seq.numGenerated > req.minTokens;
    if (stopsApply && req.stopTokenIds?.has(token)) {
      reason = 'stop';
      req.stopReason = token;
    } else if (stopsApply && req.stop) {
      const from = Math.max(seq.numPromptTokens, seq.numTokens - req.stopWindow);
      let text: string;
      try {
        text = req.detokenize!(Array.from(seq.tokens.subarray(from, seq.numTokens)));
      } catch (e) {
        this.fail(req, new BadArgumentError(`request ${req.id}: detokenize threw: ${(e as Error)?.message ?? e}`));
        return;
      }
      for (const s of req.stop)
        if (text.includes(s)) {
          reason = 'stop';
          req.stopReason = s;
          break;
        }
    }
    if (!reason && (seq.numGenerated >= req.maxTokens || seq.numTokens >= this.info.maxModelLen)) reason = 'length';

    if (req.kind === 'prefill') {
      this.finishPrefill(req, token, lp, reason);
      return;
    }
    const out: EngineOutput = { requestId: req.id, tokenIds: [token], finishReason: reason };
    if (seq.numGenerated === 1) out.cachedPromptTokens = seq.numCachedPromptTokens;
    if (lp) out.logprobs = [lp];
    if (reason && req.stopReason !== undefined) out.stopReason = req.stopReason;
    req.stream!.push(out);
    if (reason) this.finish(req, reason);
  }

  private finishPrefill(req: LiveRequest, token: number, lp: TokenLogprobs | undefined, reason: FinishReason | null) {
    req.finished = true;
    req.finishReason = reason;
    this.requests.delete(req.id);
    const seq = req.seq;
    this.scheduler.remove(seq, true);
    const result: PrefillResult = {
      requestId: req.id,
      firstToken: token,
      blockIds: Int32Array.from(seq.blockIds),
      cachedTokens: seq.numCachedPromptTokens,
      finishReason: reason,
    };
    if (lp) result.logprobs = lp;
    if (req.stopReason !== undefined) result.stopReason = req.stopReason;
    req.prefill!.resolve(result);
  }

  /** Ends a request normally or by abort; its blocks go back now, or after the step in flight. */
  private finish(req: LiveRequest, reason: FinishReason): void {
    req.finished = true;
    req.finishReason = reason;
    this.requests.delete(req.id);
    this.releaseSequence(req);
    if (req.prefill) {
      req.prefill.reject(new CanceledError(`request ${req.id} was aborted`));
      return;
    }
    const stream = req.stream!;
    if (reason === 'abort') stream.push({ requestId: req.id, tokenIds: [], finishReason: 'abort' });
    const result: RequestResult = {
      requestId: req.id,
      tokenIds: req.seq.generated().slice(req.resumedTokens),
      finishReason: reason,
      promptTokens: req.seq.numPromptTokens,
      cachedPromptTokens: req.seq.numCachedPromptTokens,
    };
    if (req.logprobList) result.logprobs = req.logprobList;
    if (req.stopReason !== undefined && reason === 'stop') result.stopReason = req.stopReason;
    stream.end(result);
  }

  private fail(req: LiveRequest, error: unknown): void {
    req.finished = true;
    this.requests.delete(req.id);
    this.releaseSequence(req);
    if (req.prefill) req.prefill.reject(error);
    else req.stream!.fail(error);
  }

  private releaseSequence(req: LiveRequest): void {
    const seq = req.seq;
    if (this.inFlight?.has(seq)) return; // applyStep releases it
    if (seq.status === 'done') return;
    if (seq.status === 'new') {
      if (seq.blockIds.length > 0) this.blocks.free(seq.blockIds);
      seq.blockIds = [];
      seq.status = 'done';
    } else this.scheduler.remove(seq);
    this.kick();
  }

  private emit(event: KvEvent): void {
    for (const listener of this.listeners) {
      try {
        listener(event);
      } catch (e) {
        process.emitWarning(`KV event listener threw: ${(e as Error)?.message ?? String(e)}`);
      }
    }
  }
}
