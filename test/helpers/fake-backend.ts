/**
 * A `GenerationBackend` for frontend tests: answers every prompt with `reply` (byte tokens, one per chunk),
 * then EOS; or, with `endless`, bytes until aborted. Records each request and whether its signal fired.
 */
import {
  type GenerationBackend,
  type GenerationChunk,
  type GenerationRequest,
  type TokenLogprobs,
} from '../../lib/frontend/backend.js';

/** The byte tokenizer's EOS id (lib/engine/model/tokenizer-bytes.ts). */
const EOS = 257;

export class FakeBackend implements GenerationBackend {
  reply = 'Hello there! How are you?';
  endless = false;
  up = true;
  failWith: Error | undefined;
  failAfter: number | undefined;
  delayMs = 0;
  requests: GenerationRequest[] = [];
  aborted: string[] = [];
  private waiters: (() => void)[] = [];

  available() {
    return this.up;
  }

  /** Back to the defaults above (the requests seen are kept). */
  reset(): void {
    this.reply = 'Hello there! How are you?';
    this.endless = false;
    this.up = true;
    this.failWith = undefined;
    this.failAfter = undefined;
    this.delayMs = 0;
  }

  /** Resolves once some request's signal has fired. */
  nextAbort(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  async *generate(req: GenerationRequest): AsyncGenerator<GenerationChunk> {
    this.requests.push(req);
    req.signal.addEventListener('abort', () => {
      this.aborted.push(req.requestId);
      for (const w of this.waiters.splice(0)) w();
    });
    if (this.failWith && this.failAfter === undefined) throw this.failWith;
    const ids = [...Buffer.from(this.reply, 'utf8')];
    const max = req.sampling.maxTokens ?? Infinity;
    for (let i = 0; ; i++) {
      if (req.signal.aborted) return;
      if (this.failWith && i === this.failAfter) throw this.failWith;
      if (this.delayMs) await new Promise((r) => setTimeout(r, this.delayMs));
      else await Promise.resolve();
      const id = this.endless ? 97 + (i % 26) : (ids[i] ?? EOS);
      const logprobs: TokenLogprobs[] | undefined =
        req.sampling.logprobs === undefined
          ? undefined
          : [
              {
                tokenId: id,
                logprob: -0.5,
                topTokenIds: Int32Array.from([id, 120, 121].slice(0, Math.max(1, req.sampling.logprobs))),
                topLogprobs: Float32Array.from([-0.5, -1.5, -2.5].slice(0, Math.max(1, req.sampling.logprobs))),
              },
            ];
      const finish = id === EOS ? 'stop' : i + 1 >= max ? 'length' : null;
      yield { tokenIds: [id], ...(logprobs ? { logprobs } : {}), finishReason: finish };
      if (finish) return;
    }
  }
}
