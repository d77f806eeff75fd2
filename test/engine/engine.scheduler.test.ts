import { describe, expect, it } from 'vitest';
import { PromptTooLongError } from '../../lib/errors.js';
import { KvBlockManager } from '../../lib/engine/block-manager.js';
import { Scheduler, Sequence } from '../../lib/engine/scheduler.js';

const seq = (id: string, n: number, base = 0) =>
  new Sequence(
    id,
    Array.from({ length: n }, (_, i) => base + i),
    null,
  );

describe('Scheduler', () => {
  it('builds the ForwardBatch: chunks under the budget, positions, seqStarts, block tables padded with -1', () => {
    const blocks = new KvBlockManager({ numBlocks: 16, blockSize: 4 });
    const s = new Scheduler(blocks, { maxNumBatchedTokens: 10 });
    const a = seq('a', 6);
    const b = seq('b', 9, 100);
    s.add(a);
    s.add(b);
    const step = s.schedule()!;
    expect(step.seqs).toEqual([a, b]);
    expect(Array.from(step.numNew)).toEqual([6, 4]);
    expect(Array.from(step.samples)).toEqual([1, 0]);
    const batch = step.batch;
    expect(Array.from(batch.tokens)).toEqual([0, 1, 2, 3, 4, 5, 100, 101, 102, 103]);
    expect(Array.from(batch.positions)).toEqual([0, 1, 2, 3, 4, 5, 0, 1, 2, 3]);
    expect(Array.from(batch.seqStarts)).toEqual([0, 6, 10]);
    expect(batch.maxBlocksPerSeq).toBe(2);
    expect(Array.from(batch.blockTables)).toEqual([...a.blockIds, b.blockIds[0], -1]);
    expect(Array.from(batch.contextLens)).toEqual([6, 4]);
    s.complete(step);
    a.append(7);
    // Next: a's decode (position 6) and b's remaining 5 tokens.
    const step2 = s.schedule()!;
    expect(Array.from(step2.numNew)).toEqual([1, 5]);
    expect(Array.from(step2.batch.positions)).toEqual([6, 4, 5, 6, 7, 8]);
    expect(Array.from(step2.batch.contextLens)).toEqual([7, 9]);
    expect(step2.batch.maxBlocksPerSeq).toBe(3);
    expect(Array.from(step2.batch.blockTables)).toEqual([...a.blockIds, -1, ...b.blockIds]);
    expect(Array.from(step2.samples)).toEqual([1, 1]);
  });

  it('preempts the most recently admitted running sequence and requeues it at the front', () => {
    const blocks = new KvBlockManager({ numBlocks: 4, blockSize: 2 });
    const s = new Scheduler(blocks, { maxNumBatchedTokens: 100 });
    const a = seq('a', 4);
    const b = seq('b', 4, 50);
    const c = seq('c', 2, 90);
    s.add(a);
    s.add(b);
    s.add(c);
    const step = s.schedule()!;
    expect(step.seqs).toEqual([a, b]); // c waits: no blocks
    s.complete(step);
    a.append(1);
    b.append(2);
    // a needs a 3rd block: b (admitted later) is preempted.
    const step2 = s.schedule()!;
    expect(step2.preempted).toEqual([b]);
    expect(step2.seqs).toEqual([a]);
    expect(b.numComputed).toBe(0);
    expect(b.blockIds).toEqual([]);
    expect(b.status).toBe('waiting');
    expect(s.numWaiting).toBe(2);
    s.complete(step2);
    s.remove(a);
    // b comes back before c, with its generated token to recompute. Its first block is still cached (eviction
    // took its tail block first), so the recompute starts at position 2.
    const step3 = s.schedule()!;
    expect(step3.seqs[0]).toBe(b);
    expect(Array.from(step3.batch.tokens.subarray(0, step3.numNew[0]!))).toEqual([52, 53, 2]);
    expect(step3.batch.positions[0]).toBe(2);
  });

  it('rejects prompts longer than the pool or maxModelLen', () => {
    const blocks = new KvBlockManager({ numBlocks: 4, blockSize: 2 });
    const s = new Scheduler(blocks, { maxModelLen: 6 });
    expect(() => s.add(seq('x', 7))).toThrow(PromptTooLongError);
    const t = new Scheduler(blocks);
    expect(t.maxModelLen).toBe(8);
    expect(() => t.add(seq('y', 9))).toThrow(/KV pool/);
  });
});
