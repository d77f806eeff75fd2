/**
 * What the frontend talks to: token ids in, token ids out. The frontend tokenizes, applies chat templates,
 * checks requests and handles stop strings; a backend (the router in front of the workers, or one engine in
 * process) only generates. It is the seam between the HTTP side and the request plane.
 */
import { TandemError } from '../errors.js';
import type { FinishReason, SamplingParams, TokenLogprobs } from '../engine/engine.js';

export type { FinishReason, SamplingParams, TokenLogprobs } from '../engine/engine.js';

export interface GenerationRequest {
  /** Unique among live requests (the frontend's completion id). */
  requestId: string;
  promptIds: readonly number[];
  /**
   * The frontend sets temperature, topP, topK, seed, maxTokens, minTokens, stopTokenIds (the model's EOS) and
   * logprobs. It never sets `stop`: stop strings are matched on text, in the frontend, which aborts the request on
   * a match.
   */
  sampling: SamplingParams;
  /**
   * Request migration: the output already streamed to the client by a worker that died. The worker continues
   * after it, counting it as output (see ResumeState in lib/engine/engine.ts); chunks carry only new tokens.
   */
  resume?: { outputTokenIds: readonly number[] };
  /** Fires when the client went away or the frontend stopped the request (stop string): free everything. */
  signal: AbortSignal;
}

export interface GenerationChunk {
  /** Newly generated token ids, in order (may be empty on the last chunk). */
  tokenIds: number[];
  /** Aligned with tokenIds when the request asked for logprobs. */
  logprobs?: TokenLogprobs[];
  /** Set on the last chunk. 'abort' on a request the frontend did not abort is reported as a server error. */
  finishReason?: FinishReason | null;
  /** On the first chunk: prompt tokens served from a prefix cache rather than computed. */
  cachedTokens?: number;
}

export interface GenerationBackend {
  /**
   * Starts a request. Throws (or the iteration throws before its first chunk) NoWorkerAvailableError when
   * nothing can serve it, BadArgumentError or PromptTooLongError when it can never be served.
   */
  generate(request: GenerationRequest): AsyncIterable<GenerationChunk>;
  /** False when no worker can take a request now; the frontend answers 503 without calling generate. */
  available(): boolean;
}

/** No worker can serve the request now (none registered, or all gone). HTTP 503. */
export class NoWorkerAvailableError extends TandemError {
  constructor(message = 'no worker is available to serve the request') {
    super('TANDEM_NO_WORKER', message);
  }
}
