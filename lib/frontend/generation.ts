/**
 * One request's generation, between the backend's token chunks and the text the client sees: decodes tokens
 * into text deltas, matches stop strings on that text (holding back the tail that could still become one) and
 * ends the backend request through its AbortController on a match, and records time to first token and
 * inter-token latency.
 */
import type { StreamDecoder, TextTokenizer } from '../engine/tokenizer.js';
import type { FinishReason, GenerationChunk, TokenLogprobs } from './backend.js';
import type { ServeMetrics } from './metrics.js';
import { HttpError } from './errors.js';
import type { CheckedRequest } from './request.js';

/** Text generated since the last delta, and the logprobs of the tokens that came with it. */
export interface Delta {
  text: string;
  tokens: TokenLogprobs[];
}

export interface GenerationContext {
  tokenizer: TextTokenizer;
  metrics: ServeMetrics;
  modelName: string;
}

/**
 * The backend's next chunk, or the end of the iteration once `signal` fires: a backend may take its time to end
 * an aborted request (a worker that is gone), and the client's answer must not wait for it.
 */
export function nextChunk(
  chunks: AsyncIterator<GenerationChunk>,
  signal: AbortSignal,
): Promise<IteratorResult<GenerationChunk>> {
  const done: IteratorResult<GenerationChunk> = { done: true, value: undefined };
  if (signal.aborted) return Promise.resolve(done);
  let onAbort!: () => void;
  const aborted = new Promise<IteratorResult<GenerationChunk>>((resolve) => {
    onAbort = () => resolve(done);
    signal.addEventListener('abort', onAbort, { once: true });
  });
  return Promise.race([chunks.next(), aborted]).finally(() => signal.removeEventListener('abort', onAbort));
}

export class Generation {
  completionTokens = 0;
  /** Prompt tokens the backend served from a prefix cache (its first chunk says). */
  cachedTokens = 0;
  finishReason: 'stop' | 'length' | null = null;
  private readonly decoder: StreamDecoder;
  private pending = '';
  private readonly holdBack: number;
  private lastTokenAt = 0;
  private firstTokenAt = 0;

  constructor(
    private readonly context: GenerationContext,
    private readonly request: CheckedRequest,
    private readonly controller: AbortController,
    private readonly startedAt: number,
  ) {
    this.decoder = context.tokenizer.decoder();
    this.holdBack = Math.max(0, ...request.stop.map((s) => s.length - 1));
  }

  get gotFirstToken(): boolean {
    return this.firstTokenAt !== 0;
  }

  /** Fires when the request ends early: stop string, client gone, shutdown. */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** True once the request was ended by anything other than its own finish (client gone, shutdown). */
  get cut(): boolean {
    return this.controller.signal.aborted && this.finishReason === null;
  }

  /**
   * Yields deltas (text and the logprobs of the tokens that arrived with it) until the request finishes or is
   * cut (then the iteration just ends: see `cut`).
   */
  async *run(chunks: AsyncIterator<GenerationChunk>, first: IteratorResult<GenerationChunk>): AsyncGenerator<Delta> {
    const signal = this.controller.signal;
    for (let next = first; !next.done; next = await nextChunk(chunks, signal)) {
      if (this.cut) return;
      const delta = this.take(next.value);
      if (delta.text || delta.tokens.length) yield delta;
      if (this.finishReason) return;
    }
    if (this.cut) return;
    // The backend ended without a finish reason: treat as a natural end.
    const rest = this.finish('stop');
    if (rest.text) yield rest;
  }

  private take(chunk: GenerationChunk): Delta {
    const now = performance.now();
    const n = chunk.tokenIds.length;
    const { metrics, modelName } = this.context;
    if (chunk.cachedTokens !== undefined) this.cachedTokens = chunk.cachedTokens;
    if (n) {
      if (!this.firstTokenAt) {
        this.firstTokenAt = now;
        metrics.firstToken(modelName, (now - this.startedAt) / 1000);
        for (let i = 1; i < n; i++) metrics.interToken(modelName, 0);
      } else {
        for (let i = 0; i < n; i++) metrics.interToken(modelName, (now - this.lastTokenAt) / 1000 / n);
      }
      this.lastTokenAt = now;
      this.completionTokens += n;
    }
    const tokens = this.request.logprobs === undefined ? [] : (chunk.logprobs ?? []);
    this.pending += this.decoder.push(chunk.tokenIds);
    const stopped = this.matchStop();
    if (stopped) return { text: stopped, tokens };
    if (chunk.finishReason) {
      if (chunk.finishReason === 'abort')
        throw new HttpError(500, 'the backend aborted the request', 'server_error', null, 'aborted');
      return { ...this.finish(chunk.finishReason), tokens };
    }
    // Emit all but the tail that could be the start of a stop string; never split a surrogate pair.
    let cut = this.pending.length - this.holdBack;
    if (cut > 0 && /[\uD800-\uDBFF]/.test(this.pending[cut - 1] ?? '')) cut--;
    if (cut <= 0) return { text: '', tokens };
    const text = this.pending.slice(0, cut);
    this.pending = this.pending.slice(cut);
    return { text, tokens };
  }

  /** On a stop string: the text before it (possibly ''), the request marked finished and the backend stopped. */
  private matchStop(): string | undefined {
    // min_tokens: no stop string before that many tokens (vLLM's rule, as the engine's for stop tokens).
    if (this.completionTokens <= (this.request.sampling.minTokens ?? 0)) return undefined;
    let at = -1;
    for (const s of this.request.stop) {
      const i = this.pending.indexOf(s);
      if (i >= 0 && (at < 0 || i < at)) at = i;
    }
    if (at < 0) return undefined;
    const text = this.pending.slice(0, at);
    this.pending = '';
    this.finishReason = 'stop';
    this.controller.abort(new Error('stop string matched'));
    return text;
  }

  private finish(reason: FinishReason): Delta {
    this.pending += this.decoder.flush();
    const stopped = this.matchStop();
    if (stopped !== undefined) return { text: stopped, tokens: [] };
    const text = this.pending;
    this.pending = '';
    this.finishReason = reason === 'length' ? 'length' : 'stop';
    return { text, tokens: [] };
  }
}
