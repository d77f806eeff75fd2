/**
 * The contract between the engine's scheduler (lib/engine/llm-engine.ts) and whatever runs the model math:
 * the native CPU runner (lib/engine/cpu.ts), the GPU runner, or a fake in tests.
 *
 * One step = one `forward()` over a batch of sequences, each contributing one or more new tokens (a chunk
 * of a prompt, or one decode token). The runner writes the new tokens' K and V into the paged KV pool at
 * the slots their positions name in each sequence's block table, attends over everything the sequence
 * holds so far (causal within the chunk), and returns the logits of each sequence's last new token.
 */

import type { RawForwardArgs } from '../native/binding.js';

/** One step's input. All arrays are owned by the caller and only read during the call. */
export interface ForwardBatch {
  /** New tokens of every sequence, concatenated. */
  tokens: Int32Array;
  /** Position (0-based, within its sequence) of each token in `tokens`. */
  positions: Int32Array;
  /** Length nseq + 1: sequence i's new tokens are tokens[seqStarts[i] .. seqStarts[i + 1]). */
  seqStarts: Int32Array;
  /** nseq x maxBlocksPerSeq block ids (row i: sequence i's blocks in order; unused entries -1). */
  blockTables: Int32Array;
  maxBlocksPerSeq: number;
  /**
   * Per sequence: tokens in its KV cache once this step's tokens are written (its last new token's
   * position + 1). Attention for a token at position p covers positions 0..p.
   */
  contextLens: Int32Array;
}

/** A batch as the native runners' forward calls take it, in their argument order. */
export function forwardArgs(b: ForwardBatch): RawForwardArgs {
  return [b.tokens, b.positions, b.seqStarts, b.blockTables, b.maxBlocksPerSeq, b.contextLens];
}

/**
 * What the sampler needs from each sequence's logits, for runners that sample on the device
 * (`forwardSampled`): per sequence, `n` best candidates (0: the sequence is not sampled this step; at most
 * SAMPLE_MAX_CANDIDATES), `flags` (SAMPLE_* below), 1 / temperature, top-p, and the uniform of the plain draw.
 * Built by `Sampler.plan` (lib/engine/sampler.ts).
 */
export interface SamplePlan {
  n: Int32Array;
  flags: Int32Array;
  invT: Float64Array;
  topP: Float64Array;
  u: Float64Array;
}

/** Log-sum-exp of the raw logits. */
export const SAMPLE_LSE = 1;
/** Sum of exp((logit - max) * invT) over the vocabulary. */
export const SAMPLE_EXP_SUM = 2;
/** Draw by inverse CDF in vocabulary order at `u` (temperature only, no top-k / top-p). */
export const SAMPLE_PLAIN = 4;
/** Top-p over the whole vocabulary: return the whole row when the candidates may not reach top-p. */
export const SAMPLE_TOP_P = 8;
/** Return the whole row. */
export const SAMPLE_FULL_ROW = 16;
export const SAMPLE_MAX_CANDIDATES = 64;

/** A device's answer to a SamplePlan (see `SampledRows` in native/src/engine/cuda_llama.h). */
export interface SampledLogits {
  readonly vocabSize: number;
  /** Candidates per row in topIds / topLogits. */
  readonly maxN: number;
  /** nseq x 4: best id, drawn id (SAMPLE_PLAIN), whole row returned for top-p, 0. */
  readonly ints: Int32Array;
  /** nseq x 4: max logit, sum of exp((l - max) * invT), log-sum-exp, logit of the drawn id. */
  readonly dbl: Float64Array;
  /** nseq x maxN, best first (larger logit, then lower id); -1 past the last. */
  readonly topIds: Int32Array;
  readonly topLogits: Float32Array;
  /** Rows whose whole logits are in `full`, in that order. */
  readonly fullRows: Int32Array;
  readonly full: Float32Array;
}

export interface ModelRunner {
  readonly vocabSize: number;
  /** Tokens per KV block. */
  readonly blockSize: number;
  /** Blocks in the KV pool. */
  readonly numBlocks: number;
  /** Longest sequence (positions) the model supports. */
  readonly maxPositions: number;
  /** Logits of each sequence's last new token: nseq x vocabSize, row-major. */
  forward(batch: ForwardBatch): Promise<Float32Array>;
  /**
   * Optional: the same step, with the sampler's reductions done where the logits are (a GPU), so that only
   * candidates and sums come back. The engine uses it when present.
   */
  forwardSampled?(batch: ForwardBatch, plan: SamplePlan): Promise<SampledLogits>;
  dispose(): Promise<void>;
}

/**
 * Runs the model once over a prompt and once more for one decode token, so that the first real step does
 * not pay for what a runner does on first use (a GPU runner loads its kernels, cuBLAS picks its own and
 * scratch buffers grow: tens of milliseconds). Kernels are chosen by shape: the default prompt (512 tokens,
 * fewer where the pool or the model's positions are smaller) takes the long-prompt attention path (over
 * 256 tokens). Writes K and V only into the pool's first blocks: call it before any request has blocks
 * (their contents are rewritten before any request reads them). Returns the time taken, in milliseconds.
 */
export async function warmUpRunner(runner: ModelRunner, promptTokens = 512): Promise<number> {
  const t0 = performance.now();
  const blocksFor = (tokens: number) => Math.ceil(tokens / runner.blockSize);
  // prompt + one decode token, within the pool and the model's positions
  let prompt = Math.max(1, Math.min(promptTokens, runner.maxPositions - 1));
  while (prompt > 1 && blocksFor(prompt + 1) > runner.numBlocks) prompt = Math.floor(prompt / 2);
  const maxBlocksPerSeq = blocksFor(prompt + 1);
  if (maxBlocksPerSeq > runner.numBlocks) return 0; // a pool of no blocks: nothing can run
  const blockTables = Int32Array.from({ length: maxBlocksPerSeq }, (_, i) => i);
  const step = async (first: number, count: number) => {
    const batch: ForwardBatch = {
      tokens: Int32Array.from({ length: count }, (_, i) => (first + i) % runner.vocabSize),
      positions: Int32Array.from({ length: count }, (_, i) => first + i),
      seqStarts: Int32Array.of(0, count),
      blockTables,
      maxBlocksPerSeq,
      contextLens: Int32Array.of(first + count),
    };
    if (runner.forwardSampled) {
      const plan: SamplePlan = {
        n: Int32Array.of(1),
        flags: Int32Array.of(SAMPLE_LSE),
        invT: Float64Array.of(1),
        topP: Float64Array.of(1),
        u: Float64Array.of(0.5),
      };
      await runner.forwardSampled(batch, plan);
    } else {
      await runner.forward(batch);
    }
  };
  await step(0, prompt);
  await step(prompt, 1);
  return performance.now() - t0;
}
