/** Builds ForwardBatch values for tests from a readable description of each sequence's step. */
import type { ForwardBatch } from '../../lib/engine/runner.js';

export interface SequenceStep {
  /** The sequence's block table (its blocks in position order). */
  blocks: readonly number[];
  /** Position of the first new token (tokens already in the KV cache). */
  start: number;
  /** New tokens. */
  tokens: readonly number[];
}

export function forwardBatch(steps: readonly SequenceStep[], maxBlocksPerSeq?: number): ForwardBatch {
  const mb = maxBlocksPerSeq ?? Math.max(...steps.map((s) => s.blocks.length));
  const tokens: number[] = [];
  const positions: number[] = [];
  const seqStarts = [0];
  const blockTables = new Int32Array(steps.length * mb).fill(-1);
  const contextLens: number[] = [];
  steps.forEach((s, i) => {
    s.tokens.forEach((t, j) => {
      tokens.push(t);
      positions.push(s.start + j);
    });
    seqStarts.push(tokens.length);
    blockTables.set(s.blocks, i * mb);
    contextLens.push(s.start + s.tokens.length);
  });
  return {
    tokens: Int32Array.from(tokens),
    positions: Int32Array.from(positions),
    seqStarts: Int32Array.from(seqStarts),
    blockTables,
    maxBlocksPerSeq: mb,
    contextLens: Int32Array.from(contextLens),
  };
}

/** One sequence's whole prompt from position 0, in blocks 7, 6, ... of a 16-entry block table (the fixture tests'). */
export function promptBatch(promptIds: readonly number[]): ForwardBatch {
  const blocks = Array.from({ length: Math.ceil(promptIds.length / 16) }, (_, i) => 7 - i);
  return forwardBatch([{ blocks, start: 0, tokens: promptIds }], 16);
}

/** Row `i` of an nseq x vocab logits matrix. */
export function logitsRow(logits: Float32Array, vocab: number, i: number): Float32Array {
  return logits.subarray(i * vocab, (i + 1) * vocab);
}

/** max |a - b| / max(1, max |b|): the error relative to the logits' scale. */
export function relativeError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) return Infinity;
  let diff = 0;
  let scale = 1;
  for (let i = 0; i < expected.length; i++) {
    diff = Math.max(diff, Math.abs(actual[i]! - expected[i]!));
    scale = Math.max(scale, Math.abs(expected[i]!));
  }
  return diff / scale;
}
