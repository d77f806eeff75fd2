/**
 * `Engine`: what a Tandem worker hosts. The built-in reference engine (`LlmEngine`, lib/engine/llm-engine.ts)
 * implements it over a `ModelRunner`; an external engine (vLLM, TensorRT-LLM) fits behind the same interface
 * through a bridge that maps these calls onto its own scheduler and hands its KV pool to the transfer runtime.
 *
 * The contract, for an implementer:
 * - Requests carry token ids, never text. `addRequest` returns at once; outputs stream through the handle
 *   (async iteration), one `EngineOutput` per generated token (or more when the engine emits several at once),
 *   the last one with a `finishReason`. A failed request makes the iteration throw a typed error; the engine
 *   itself keeps serving.
 * - `abort(id)` ends a request at once (its stream ends with finishReason 'abort'; `prefillOnly` rejects with
 *   CanceledError) and releases its KV blocks, or as soon as the step in flight completes.
 * - KV blocks are numbered 0 .. numBlocks-1 in the pool the worker registers with the transfer runtime.
 *   Block ownership is explicit for disaggregation: `allocateBlocks` and `prefillOnly` hand blocks to the
 *   caller, `decodeFromBlocks` (and `prefillOnly` with given blocks) takes the caller's blocks over, and
 *   `releaseBlocks` gives them back. A block the caller owns is never handed to anyone else.
 * - KV events (`onKvEvent`): blocks stored into / removed from the prefix cache with their chained prefix hashes
 *   (`kvBlockHash` in lib/kv/hash.ts), for a KV-aware router.
 *
 * Disaggregated flow (ARCHITECTURE.md): the decode worker D calls `allocateBlocks(prompt)` and sends the block
 * ids to the prefill worker P; P runs `prefillOnly(req)`, writes its blocks into D's (transfer runtime), calls
 * `releaseBlocks` on its own and tells D the first token; D calls `decodeFromBlocks(req, blockIds, firstToken)`.
 */
import type { KvEvent } from './block-manager.js';
import type { TokenLogprobs } from './sampler.js';

export type { KvEvent, KvBlocksRemovedEvent, KvBlocksStoredEvent } from './block-manager.js';
export type { TokenLogprobs } from './sampler.js';

export interface SamplingParams {
  /** 0 picks the most likely token (greedy). Default 1. */
  temperature?: number;
  /** Keep only the k most likely tokens; 0 (default) or -1 keeps all. */
  topK?: number;
  /** Nucleus: keep the most likely tokens whose probability reaches p, in (0, 1]. Default 1 (all). */
  topP?: number;
  /** Same seed, same output (whatever else the engine is running). Default: a random seed per request. */
  seed?: number;
  /** Generated tokens at most. Default: up to the engine's maxModelLen. */
  maxTokens?: number;
  /**
   * vLLM's min_tokens: a stop token id or stop string ends the request only once at least this many tokens
   * precede it (the earliest stop is token minTokens + 1). At most maxTokens; default 0. A stop token sampled
   * earlier stays in the output as an ordinary token (vLLM masks it out of sampling instead; here the rule is
   * in the stop check, which the CPU and GPU runners share). maxTokens and the context limit still end it.
   */
  minTokens?: number;
  /** Generation stops after any of these ids (the id is part of the output). Add the model's EOS ids here. */
  stopTokenIds?: readonly number[];
  /**
   * Generation stops once the generated text contains any of these strings (matched on the text that the
   * request's `detokenize` gives; the output keeps the token that completed the match, and `stopReason` names
   * the string, so that the caller can cut the text before it).
   */
  stop?: readonly string[];
  /** Return the log-probability of each generated token and of the N most likely tokens (0: chosen only). */
  logprobs?: number;
  /** OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit of every token in the output. Default 0. */
  presencePenalty?: number;
  /** OpenAI's frequency penalty, in [-2, 2]: subtracted from a token's logit once per time it is in the output. Default 0. */
  frequencyPenalty?: number;
  /**
   * vLLM's (and HF's) repetition penalty, > 0: the logit of every token in the prompt or the output is divided by
   * it when positive, multiplied by it when not. Default 1 (none).
   */
  repetitionPenalty?: number;
}

/**
 * The output a request had already generated elsewhere before it came here (request migration: its worker
 * died mid-stream). Those tokens are output, not prompt: the sampler's counter continues after them (a seeded
 * request draws what it would have drawn), maxTokens, minTokens and stop checks count them, and the prompt's
 * length (usage) stays the original one. The stream and `result()` carry only the tokens generated here.
 */
export interface ResumeState {
  /** Output tokens already streamed to the client, in order; fewer than maxTokens, no stop among them. */
  outputTokenIds: ArrayLike<number>;
}

export interface EngineRequest {
  /** Unique among live requests; default a generated id. */
  requestId?: string;
  promptTokenIds: ArrayLike<number>;
  sampling?: SamplingParams;
  /** Continue a request from output generated elsewhere (`addRequest` only). */
  resume?: ResumeState;
  /** Text of generated token ids, for stop strings; default the engine's. Required when `sampling.stop` is set. */
  detokenize?: (tokenIds: readonly number[]) => string;
}

/** 'stop': a stop token or string; 'length': maxTokens or the context limit; 'abort': aborted. */
export type FinishReason = 'stop' | 'length' | 'abort';

export interface EngineOutput {
  requestId: string;
  /** Newly generated tokens (usually one; none on the final output of an abort). */
  tokenIds: number[];
  /** Aligned with `tokenIds` when the request asked for logprobs. */
  logprobs?: TokenLogprobs[];
  /** Set on the last output of the request. */
  finishReason: FinishReason | null;
  /** The stop token id or stop string that ended the request. */
  stopReason?: number | string;
  /**
   * On the request's first output: prompt tokens served from the prefix cache rather than computed (for a
   * request decoded from given blocks, the whole prompt: it was computed elsewhere).
   */
  cachedPromptTokens?: number;
}

export interface RequestResult {
  requestId: string;
  /** Every token generated here, in order (after `resume.outputTokenIds`, when resumed). */
  tokenIds: number[];
  logprobs?: TokenLogprobs[];
  finishReason: FinishReason;
  stopReason?: number | string;
  promptTokens: number;
  /** Prompt tokens served from the prefix cache on first admission. */
  cachedPromptTokens: number;
}

/**
 * A live request. Iterate it once for its outputs; or await `result()` for everything at the end. Leaving the
 * iteration early does not abort the request: call `abort()`.
 */
export interface RequestHandle extends AsyncIterable<EngineOutput> {
  readonly requestId: string;
  /** All outputs gathered; rejects with the request's typed error if it fails. */
  result(): Promise<RequestResult>;
  abort(): void;
}

/** KV blocks handed to the caller: `blockIds` covers the prompt; the first `cachedTokens` are already computed. */
export interface BlockAllocation {
  blockIds: Int32Array;
  cachedTokens: number;
}

export interface PrefillResult {
  requestId: string;
  firstToken: number;
  logprobs?: TokenLogprobs;
  /** The blocks holding the prompt's KV, now owned by the caller (release with `releaseBlocks`). */
  blockIds: Int32Array;
  /** Prompt tokens that came from the prefix cache rather than being computed. */
  cachedTokens: number;
  /** Non-null when the first token already ends the request (stop token or string, maxTokens 1, context). */
  finishReason: FinishReason | null;
  stopReason?: number | string;
}

export interface EngineInfo {
  vocabSize: number;
  blockSize: number;
  numBlocks: number;
  /** Longest sequence (prompt + generated) the engine serves. */
  maxModelLen: number;
}

export interface EngineStats {
  running: number;
  waiting: number;
  numBlocks: number;
  /** Blocks referenced by a request or by a caller. */
  usedBlocks: number;
  /** Blocks holding a cached prefix (some may also be used). */
  cachedBlocks: number;
  /** usedBlocks / numBlocks. */
  kvUsage: number;
  steps: number;
  /** Tokens run through the model (prompt chunks, recomputes, decodes). */
  computedTokens: number;
  generatedTokens: number;
  /** Prefix cache blocks found / looked up since start. */
  prefixCacheHitBlocks: number;
  prefixCacheQueriedBlocks: number;
  preemptions: number;
  failedSteps: number;
}

export interface Engine {
  readonly info: EngineInfo;
  /**
   * Queues a request; throws PromptTooLongError (never servable) or BadArgumentError at once (also for a
   * `resume` that could not have happened: a token id outside the vocabulary, maxTokens or the context already
   * reached, a stop token that would have ended the request).
   */
  addRequest(request: EngineRequest): RequestHandle;
  /** Aborts a live request; false when there is none of that id. */
  abort(requestId: string): boolean;
  /**
   * Blocks for a prompt whose KV will be filled from elsewhere: its cached prefix from the prefix cache, the
   * rest fresh. Throws KvCacheFullError when there are not enough free blocks now (nothing taken).
   */
  allocateBlocks(promptTokenIds: ArrayLike<number>): BlockAllocation;
  /**
   * Computes the prompt (into `blockIds` when given: blocks the caller owns, covering the prompt; else blocks
   * the engine allocates, using the prefix cache) and returns the first token without decoding further. The
   * blocks stay allocated, owned by the caller, until `releaseBlocks`. On failure or abort they are released.
   */
  prefillOnly(request: EngineRequest, blockIds?: ArrayLike<number>): Promise<PrefillResult>;
  /**
   * Decodes a request whose prompt KV is already in `blockIds` (owned by the caller, covering the prompt;
   * ownership passes to the request) after `firstToken`, the token sampled from the prompt elsewhere. The
   * stream starts with `firstToken`, with `firstLogprobs` when the request asks for logprobs (the prefill side's
   * `PrefillResult.logprobs`; without it, that entry has logprob NaN and no top tokens).
   */
  decodeFromBlocks(
    request: EngineRequest,
    blockIds: ArrayLike<number>,
    firstToken: number,
    firstLogprobs?: TokenLogprobs,
  ): RequestHandle;
  /** Gives back blocks the caller owns. */
  releaseBlocks(blockIds: ArrayLike<number>): void;
  /** Subscribes to KV events; returns the unsubscribe function. */
  onKvEvent(listener: (event: KvEvent) => void): () => void;
  stats(): EngineStats;
  /** Fails every live request with DisposedError, waits for the step in flight, releases the runner. */
  dispose(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}
