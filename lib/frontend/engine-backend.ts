/**
 * A GenerationBackend over one in-process Engine: what an aggregated worker runs behind its request plane,
 * and what tests use to drive the frontend against the real engine.
 */
import type { Engine } from '../engine/engine.js';
import type { GenerationBackend, GenerationChunk, GenerationRequest } from './backend.js';

export function engineBackend(engine: Engine): GenerationBackend {
  return {
    available: () => true,
    async *generate({
      requestId,
      promptIds,
      sampling,
      resume,
      signal,
    }: GenerationRequest): AsyncGenerator<GenerationChunk> {
      const handle = engine.addRequest({
        requestId,
        promptTokenIds: promptIds,
        sampling,
        ...(resume ? { resume } : {}),
      });
      // Aborting a finished request is a no-op, so the listener needs no bookkeeping of its own.
      const abort = () => handle.abort();
      if (signal.aborted) abort();
      else signal.addEventListener('abort', abort, { once: true });
      try {
        for await (const out of handle) {
          const chunk: GenerationChunk = { tokenIds: out.tokenIds, finishReason: out.finishReason };
          if (out.logprobs) chunk.logprobs = out.logprobs;
          if (out.cachedPromptTokens !== undefined) chunk.cachedTokens = out.cachedPromptTokens;
          yield chunk;
        }
      } finally {
        signal.removeEventListener('abort', abort);
        // The consumer stopped early (stop string, client gone): free the engine's blocks now.
        abort();
      }
    },
  };
}
