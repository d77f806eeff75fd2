/**
 * Iteration-level continuous batching over a paged KV pool.
 *
 * Every sequence is "tokens[0 .. numTokens), of which the first numComputed have their KV in the pool"; a step
 * computes the next chunk of each scheduled sequence. A prompt, a decode step and a recompute after preemption
 * are the same thing: a decode is a chunk of one token; a chunk that reaches numTokens yields logits to sample
 * the sequence's next token from.
 *
 * Each step (`schedule()`), under a budget of `maxNumBatchedTokens` tokens and `maxNumSeqs` sequences:
 * 1. running sequences, oldest admitted first, each get their remaining tokens (chunked to the budget left);
 *    when the pool runs out of blocks for one, the most recently admitted running sequence not yet scheduled
 *    this step is preempted (recompute: its blocks are released and it goes back to the front of the waiting
 *    queue, its generated tokens now part of what it must compute), possibly the sequence itself;
 * 2. then, if nothing was preempted, waiting sequences in order are admitted while blocks and budget last, first
 *    taking the longest cached prefix of their tokens from the prefix cache (at least one token is always left
 *    to compute, for its logits).
 * `complete(step)` then records the computed tokens and commits newly full blocks to the prefix cache.
 */
import { BadArgumentError, PromptTooLongError } from '../errors.js';
import { kvBlockHashes } from '../kv/hash.js';
import type { KvBlockManager } from './block-manager.js';
import type { ForwardBatch } from './runner.js';

export const DEFAULT_MAX_NUM_BATCHED_TOKENS = 512;
export const DEFAULT_MAX_NUM_SEQS = 256;

export type SequenceStatus = 'new' | 'waiting' | 'running' | 'done';

export class Sequence<T = unknown> {
  /** Prompt followed by generated tokens; capacity grows by doubling. */
  tokens: Int32Array;
  numTokens: number;
  readonly numPromptTokens: number;
  /** Tokens whose KV is in this sequence's blocks. */
  numComputed = 0;
  blockIds: number[] = [];
  /** Chained hashes of the sequence's full blocks, computed as blocks fill (kept across preemption). */
  readonly blockHashes: bigint[] = [];
  /** Leading blocks already in the prefix cache (committed by this sequence or shared from the cache). */
  numCommittedBlocks = 0;
  /** Prompt tokens found in the prefix cache at first admission. */
  numCachedPromptTokens = 0;
  status: SequenceStatus = 'new';
  /** Set on admission; larger is more recent. */
  admittedAt = -1;
  /** Never preempted (its blocks were given by the caller and must stay the ones it computes into). */
  pinned = false;
  numPreemptions = 0;

  constructor(
    readonly id: string,
    prompt: ArrayLike<number>,
    readonly owner: T,
  ) {
    this.numPromptTokens = prompt.length;
    this.tokens = new Int32Array(Math.max(16, prompt.length * 2));
    for (let i = 0; i < prompt.length; i++) this.tokens[i] = prompt[i]!;
    this.numTokens = prompt.length;
  }

  get numGenerated(): number {
    return this.numTokens - this.numPromptTokens;
  }

  append(token: number): void {
    if (this.numTokens === this.tokens.length) {
      const grown = new Int32Array(this.tokens.length * 2);
      grown.set(this.tokens);
      this.tokens = grown;
    }
    this.tokens[this.numTokens++] = token;
  }

  /** Generated tokens, as a new array. */
  generated(): number[] {
    return Array.from(this.tokens.subarray(this.numPromptTokens, this.numTokens));
  }

  /** Makes `blockHashes` cover the first `n` full blocks. */
  hashBlocks(n: number, blockSize: number): void {
    kvBlockHashes(this.tokens, blockSize, n, this.blockHashes);
  }
}

export interface SchedulerOptions {
  /** Tokens per step over all sequences. Default 512. */
  maxNumBatchedTokens?: number;
  /** Sequences per step. Default 256. */
  maxNumSeqs?: number;
  /** Longest sequence: prompts longer than this are rejected. Default: the whole pool. */
  maxModelLen?: number;
}

/** One step: the sequences scheduled, how many tokens each computes, and the runner's input. */
export interface ScheduledStep<T = unknown> {
  seqs: Sequence<T>[];
  numNew: Int32Array;
  /** Per sequence: 1 when its chunk reaches its last token, so the step's logits row is sampled. */
  samples: Uint8Array;
  batch: ForwardBatch;
  /** Sequences preempted while scheduling this step (now waiting). */
  preempted: Sequence<T>[];
}

export class Scheduler<T = unknown> {
  readonly maxNumBatchedTokens: number;
  readonly maxNumSeqs: number;
  readonly maxModelLen: number;
  private readonly waiting: Sequence<T>[] = [];
  private readonly running: Sequence<T>[] = [];
  private admissions = 0;
  numPreemptions = 0;

  constructor(
    readonly blocks: KvBlockManager,
    options: SchedulerOptions = {},
  ) {
    const int = (name: string, v: number) => {
      if (!Number.isSafeInteger(v) || v < 1)
        throw new BadArgumentError(`Scheduler: ${name} must be a positive integer (got ${v})`);
      return v;
    };
    this.maxNumBatchedTokens = int(
      'maxNumBatchedTokens',
      options.maxNumBatchedTokens ?? DEFAULT_MAX_NUM_BATCHED_TOKENS,
    );
    this.maxNumSeqs = int('maxNumSeqs', options.maxNumSeqs ?? DEFAULT_MAX_NUM_SEQS);
    const poolTokens = blocks.numBlocks * blocks.blockSize;
    this.maxModelLen = Math.min(int('maxModelLen', options.maxModelLen ?? poolTokens), poolTokens);
  }

  get numWaiting(): number {
    return this.waiting.length;
  }

  get numRunning(): number {
    return this.running.length;
  }

  /** Throws PromptTooLongError when a prompt of `n` tokens can never be computed here. */
  checkPromptLength(n: number): void {
    if (n < 1) throw new BadArgumentError('the prompt is empty (at least one token is required)');
    if (n > this.maxModelLen) {
      const poolTokens = this.blocks.numBlocks * this.blocks.blockSize;
      const what =
        this.maxModelLen === poolTokens
          ? `the KV pool (${this.blocks.numBlocks} blocks of ${this.blocks.blockSize} tokens)`
          : `the model's context (${this.maxModelLen} positions)`;
      throw new PromptTooLongError(`prompt of ${n} tokens is longer than ${what}`, n, this.maxModelLen);
    }
  }

  /** Queues a sequence (at the back). It may already hold blocks (given by the caller) and computed tokens. */
  add(seq: Sequence<T>): void {
    this.checkPromptLength(seq.numTokens);
    seq.status = 'waiting';
    this.waiting.push(seq);
  }

  /**
   * Takes a sequence out of the queues. Its blocks are released unless `keepBlocks` (then the caller owns
   * them: `seq.blockIds`).
   */
  remove(seq: Sequence<T>, keepBlocks = false): void {
    const list = seq.status === 'running' ? this.running : seq.status === 'waiting' ? this.waiting : null;
    if (list) {
      const i = list.indexOf(seq);
      if (i >= 0) list.splice(i, 1);
    }
    seq.status = 'done';
    if (!keepBlocks) this.releaseBlocks(seq);
  }

  /** Plans the next step, or returns null when there is nothing to compute. */
  schedule(): ScheduledStep<T> | null {
    const bs = this.blocks.blockSize;
    let budget = this.maxNumBatchedTokens;
    const seqs: Sequence<T>[] = [];
    const counts: number[] = [];
    const preempted: Sequence<T>[] = [];

    for (let i = 0; i < this.running.length && budget > 0 && seqs.length < this.maxNumSeqs;) {
      const seq = this.running[i]!;
      const n = Math.min(seq.numTokens - seq.numComputed, budget);
      if (n <= 0) {
        i++;
        continue;
      }
      const need = Math.ceil((seq.numComputed + n) / bs) - seq.blockIds.length;
      let got = need <= 0;
      while (!got) {
        const ids = this.blocks.allocate(need);
        if (ids) {
          for (const id of ids) seq.blockIds.push(id);
          got = true;
          break;
        }
        const victim = this.pickVictim(i);
        if (victim < 0) break;
        const v = this.running[victim]!;
        this.preempt(victim);
        preempted.push(v);
        if (v === seq) break;
      }
      if (!got) {
        // Preempted itself, or pinned with nothing to preempt: skip it this step.
        if (this.running[i] === seq) i++;
        continue;
      }
      seqs.push(seq);
      counts.push(n);
      budget -= n;
      i++;
    }

    if (preempted.length === 0) {
      while (
        this.waiting.length > 0 &&
        budget > 0 &&
        seqs.length < this.maxNumSeqs &&
        this.running.length < this.maxNumSeqs
      ) {
        const seq = this.waiting[0]!;
        const matched = this.matchPrefix(seq);
        const n = Math.min(seq.numTokens - seq.numComputed, budget);
        const need = Math.ceil((seq.numComputed + n) / bs) - seq.blockIds.length;
        if (need > 0) {
          const ids = this.blocks.allocate(need);
          if (!ids) {
            this.unmatchPrefix(seq, matched);
            break;
          }
          for (const id of ids) seq.blockIds.push(id);
        }
        this.waiting.shift();
        seq.status = 'running';
        seq.admittedAt = this.admissions++;
        this.running.push(seq);
        if (n > 0) {
          seqs.push(seq);
          counts.push(n);
          budget -= n;
        }
      }
    }

    if (seqs.length === 0) return null;
    return this.build(seqs, counts, preempted);
  }

  /**
   * Records a step's computed tokens and commits every newly full block to the prefix cache. The caller then
   * appends sampled tokens (`seq.append`) for the sequences with `samples[i]`.
   */
  complete(step: ScheduledStep<T>): void {
    const bs = this.blocks.blockSize;
    for (let i = 0; i < step.seqs.length; i++) {
      const seq = step.seqs[i]!;
      if (seq.status === 'done') continue;
      seq.numComputed += step.numNew[i]!;
      this.commitFullBlocks(seq, Math.floor(seq.numComputed / bs));
    }
  }

  /** Commits `seq`'s first `fullBlocks` blocks (whose KV is computed) to the prefix cache. */
  commitFullBlocks(seq: Sequence<T>, fullBlocks: number): void {
    if (fullBlocks <= seq.numCommittedBlocks) return;
    seq.hashBlocks(fullBlocks, this.blocks.blockSize);
    this.blocks.commit(seq.blockIds, seq.blockHashes, seq.tokens, seq.numCommittedBlocks, fullBlocks);
    seq.numCommittedBlocks = fullBlocks;
  }

  /** Releases a sequence's blocks and forgets what it had computed. */
  private releaseBlocks(seq: Sequence<T>): void {
    if (seq.blockIds.length > 0) this.blocks.free(seq.blockIds);
    seq.blockIds = [];
    seq.numComputed = 0;
    seq.numCommittedBlocks = 0;
  }

  /** The running sequence to preempt for `running[current]`: the latest admitted after it, else itself. */
  private pickVictim(current: number): number {
    for (let j = this.running.length - 1; j > current; j--) if (!this.running[j]!.pinned) return j;
    return this.running[current]!.pinned ? -1 : current;
  }

  private preempt(index: number): void {
    const seq = this.running[index]!;
    this.running.splice(index, 1);
    this.releaseBlocks(seq);
    seq.status = 'waiting';
    seq.numPreemptions++;
    this.numPreemptions++;
    this.waiting.unshift(seq);
  }

  /** On a sequence holding no blocks: takes the cached prefix of its tokens. Returns the blocks taken. */
  private matchPrefix(seq: Sequence<T>): number {
    if (seq.blockIds.length > 0 || seq.numComputed > 0 || !this.blocks.enablePrefixCaching) return 0;
    const bs = this.blocks.blockSize;
    const maxBlocks = Math.floor((seq.numTokens - 1) / bs);
    seq.hashBlocks(maxBlocks, bs);
    const ids = this.blocks.matchPrefix(seq.blockHashes, seq.tokens, maxBlocks);
    seq.blockIds = ids;
    seq.numComputed = ids.length * bs;
    seq.numCommittedBlocks = ids.length;
    if (seq.admittedAt < 0) seq.numCachedPromptTokens = Math.min(seq.numComputed, seq.numPromptTokens);
    return ids.length;
  }

  private unmatchPrefix(seq: Sequence<T>, matched: number): void {
    if (matched === 0) return;
    this.releaseBlocks(seq);
  }

  private build(seqs: Sequence<T>[], counts: number[], preempted: Sequence<T>[]): ScheduledStep<T> {
    const bs = this.blocks.blockSize;
    const nseq = seqs.length;
    let total = 0;
    let maxBlocksPerSeq = 1;
    for (let i = 0; i < nseq; i++) {
      total += counts[i]!;
      const s = seqs[i]!;
      maxBlocksPerSeq = Math.max(maxBlocksPerSeq, Math.ceil((s.numComputed + counts[i]!) / bs));
    }
    const tokens = new Int32Array(total);
    const positions = new Int32Array(total);
    const seqStarts = new Int32Array(nseq + 1);
    const blockTables = new Int32Array(nseq * maxBlocksPerSeq).fill(-1);
    const contextLens = new Int32Array(nseq);
    const numNew = Int32Array.from(counts);
    const samples = new Uint8Array(nseq);
    let t = 0;
    for (let i = 0; i < nseq; i++) {
      const s = seqs[i]!;
      const n = counts[i]!;
      seqStarts[i] = t;
      tokens.set(s.tokens.subarray(s.numComputed, s.numComputed + n), t);
      for (let j = 0; j < n; j++) positions[t + j] = s.numComputed + j;
      t += n;
      const ctx = s.numComputed + n;
      contextLens[i] = ctx;
      const used = Math.ceil(ctx / bs);
      for (let b = 0; b < used; b++) blockTables[i * maxBlocksPerSeq + b] = s.blockIds[b]!;
      samples[i] = ctx === s.numTokens ? 1 : 0;
    }
    seqStarts[nseq] = t;
    return {
      seqs,
      numNew,
      samples,
      preempted,
      batch: { tokens, positions, seqStarts, blockTables, maxBlocksPerSeq, contextLens },
    };
  }
}
