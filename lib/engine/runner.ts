/**
 * The contract between the engine's scheduler (lib/engine/llm-engine.ts) and whatever runs the model math:
 * the native CPU runner (lib/engine/cpu.ts), the GPU runner, or a fake in tests.
 *
 * One step = one `forward()` over a batch of sequences, each contributing one or more new tokens (a chunk
 * of a prompt, or one decode token). The runner writes the new tokens' K and V into the paged KV pool at
 * the slots their positions name in each sequence's block table, attends over everything the sequence
 * holds so far (causal within the chunk), and returns the logits of each sequence's last new token.
 */

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
  dispose(): Promise<void>;
}
