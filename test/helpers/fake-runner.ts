/**
 * A deterministic fake `ModelRunner` for engine tests.
 *
 * Its "KV pool" stores the token id written at each (block, slot). `forward()` writes every new token at the
 * slot its position names through the sequence's block table, then reads the sequence's whole history back
 * through the block table (positions 0 .. contextLen-1) and derives the logits from a hash of it. So the logits
 * equal `referenceLogits(plain token list)` only when the scheduler's tokens, positions, block tables and
 * context lengths are right, and when no other sequence overwrote a block it still uses. It also checks the
 * ForwardBatch contract (shapes, consecutive positions, contextLens, -1 padding) and throws on any breach.
 */
import type { ForwardBatch, ModelRunner } from '../../lib/engine/runner.js';

export interface FakeRunnerOptions {
  vocabSize?: number;
  blockSize?: number;
  numBlocks?: number;
  maxPositions?: number;
  /** Milliseconds each forward takes (a timer), so tests can act while a step is in flight. */
  delayMs?: number;
  /** Logits are uniform-ish in [-scale, scale]. Default 4. */
  scale?: number;
}

function mix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Hash of a token history (order-sensitive). */
export function historyHash(tokens: ArrayLike<number>, n = tokens.length): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < n; i++) h = mix32(h ^ (tokens[i]! + Math.imul(i, 0x9e3779b9)));
  return mix32(h ^ n);
}

/** The logits the fake returns after `history` (the sequence's tokens through the last new one). */
export function referenceLogits(history: ArrayLike<number>, vocabSize: number, scale = 4): Float32Array {
  const out = new Float32Array(vocabSize);
  fillLogits(out, 0, historyHash(history), vocabSize, scale);
  return out;
}

function fillLogits(out: Float32Array, off: number, h: number, vocabSize: number, scale: number): void {
  for (let v = 0; v < vocabSize; v++)
    out[off + v] = (mix32(h ^ Math.imul(v + 1, 0x27d4eb2f)) / 0x100000000 - 0.5) * 2 * scale;
}

/** Greedy continuation of `prompt` computed from the plain token list (ties: lowest id, as the engine). */
export function referenceGreedy(
  prompt: readonly number[],
  maxTokens: number,
  vocabSize: number,
  stopTokenIds: readonly number[] = [],
): number[] {
  const history = [...prompt];
  const out: number[] = [];
  for (let i = 0; i < maxTokens; i++) {
    const logits = referenceLogits(history, vocabSize);
    let best = 0;
    for (let v = 1; v < vocabSize; v++) if (logits[v]! > logits[best]!) best = v;
    out.push(best);
    history.push(best);
    if (stopTokenIds.includes(best)) break;
  }
  return out;
}

export class FakeRunner implements ModelRunner {
  readonly vocabSize: number;
  readonly blockSize: number;
  readonly numBlocks: number;
  readonly maxPositions: number;
  readonly scale: number;
  delayMs: number;
  /** Token id at each (block, slot); -1 where nothing was written. */
  readonly pool: Int32Array;
  /** Per forward: sequences and tokens. */
  readonly log: { nseq: number; ntokens: number; batch: ForwardBatch }[] = [];
  /** When set, called before each forward; an Error it returns is thrown by that forward. */
  failWhen: ((batch: ForwardBatch) => Error | null) | null = null;
  disposed = false;

  constructor(options: FakeRunnerOptions = {}) {
    this.vocabSize = options.vocabSize ?? 64;
    this.blockSize = options.blockSize ?? 4;
    this.numBlocks = options.numBlocks ?? 256;
    this.maxPositions = options.maxPositions ?? 4096;
    this.delayMs = options.delayMs ?? 0;
    this.scale = options.scale ?? 4;
    this.pool = new Int32Array(this.numBlocks * this.blockSize).fill(-1);
  }

  async forward(batch: ForwardBatch): Promise<Float32Array> {
    if (this.disposed) throw new Error('fake runner disposed');
    // Copy: the caller owns the arrays only during the call.
    const copy: ForwardBatch = {
      tokens: batch.tokens.slice(),
      positions: batch.positions.slice(),
      seqStarts: batch.seqStarts.slice(),
      blockTables: batch.blockTables.slice(),
      maxBlocksPerSeq: batch.maxBlocksPerSeq,
      contextLens: batch.contextLens.slice(),
    };
    const nseq = batch.seqStarts.length - 1;
    this.log.push({ nseq, ntokens: batch.tokens.length, batch: copy });
    if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs));
    else await Promise.resolve();
    const injected = this.failWhen?.(copy);
    if (injected) throw injected;
    return this.compute(copy);
  }

  private compute(b: ForwardBatch): Float32Array {
    const bs = this.blockSize;
    const nseq = b.seqStarts.length - 1;
    const mb = b.maxBlocksPerSeq;
    const check = (ok: boolean, what: string) => {
      if (!ok) throw new Error(`fake runner: bad batch: ${what}`);
    };
    check(nseq >= 1, 'no sequences');
    check(b.seqStarts[0] === 0 && b.seqStarts[nseq] === b.tokens.length, 'seqStarts');
    check(b.positions.length === b.tokens.length, 'positions length');
    check(b.blockTables.length === nseq * mb, 'blockTables length');
    check(b.contextLens.length === nseq, 'contextLens length');
    const blocksInBatch = new Map<number, number>();
    for (let i = 0; i < nseq; i++) {
      const s = b.seqStarts[i]!;
      const e = b.seqStarts[i + 1]!;
      check(e > s, `sequence ${i} has no tokens`);
      for (let t = s; t < e; t++) check(b.positions[t] === b.positions[s]! + (t - s), `positions of sequence ${i}`);
      check(b.contextLens[i] === b.positions[e - 1]! + 1, `contextLens[${i}]`);
      const used = Math.ceil(b.contextLens[i]! / bs);
      check(used <= mb, `sequence ${i} needs ${used} blocks > maxBlocksPerSeq`);
      for (let j = 0; j < mb; j++) {
        const id = b.blockTables[i * mb + j]!;
        if (j < used) check(id >= 0 && id < this.numBlocks, `block table ${i}[${j}] = ${id}`);
        else check(id === -1, `padding of block table ${i}[${j}] = ${id}`);
      }
      // A block written by this step belongs to one sequence only.
      for (let p = b.positions[s]!; p < b.contextLens[i]!; p++) {
        const id = b.blockTables[i * mb + Math.floor(p / bs)]!;
        const other = blocksInBatch.get(id);
        check(other === undefined || other === i, `block ${id} written by sequences ${other} and ${i}`);
        blocksInBatch.set(id, i);
      }
    }
    for (let i = 0; i < nseq; i++)
      for (let t = b.seqStarts[i]!; t < b.seqStarts[i + 1]!; t++) {
        const p = b.positions[t]!;
        this.pool[b.blockTables[i * mb + Math.floor(p / bs)]! * bs + (p % bs)] = b.tokens[t]!;
      }
    const out = new Float32Array(nseq * this.vocabSize);
    const history = new Int32Array(this.maxPositions);
    for (let i = 0; i < nseq; i++) {
      const ctx = b.contextLens[i]!;
      for (let p = 0; p < ctx; p++)
        history[p] = this.pool[b.blockTables[i * mb + Math.floor(p / bs)]! * bs + (p % bs)]!;
      fillLogits(out, i * this.vocabSize, historyHash(history, ctx), this.vocabSize, this.scale);
    }
    return out;
  }

  /** The token ids stored in one block. */
  blockContents(blockId: number): Int32Array {
    return this.pool.slice(blockId * this.blockSize, (blockId + 1) * this.blockSize);
  }

  /** "KV transfer": copies blocks `srcIds[i]` of `src` into blocks `dstIds[i]` of this pool. */
  copyBlocksFrom(src: FakeRunner, srcIds: ArrayLike<number>, dstIds: ArrayLike<number>): void {
    const bs = this.blockSize;
    for (let i = 0; i < srcIds.length; i++)
      this.pool.set(src.pool.subarray(srcIds[i]! * bs, (srcIds[i]! + 1) * bs), dstIds[i]! * bs);
  }

  async dispose(): Promise<void> {
    this.disposed = true;
  }
}
