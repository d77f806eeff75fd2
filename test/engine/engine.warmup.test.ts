import { describe, expect, it } from 'vitest';
import { CpuModelRunner } from '../../lib/engine/cpu.js';
import { dummyConfig } from '../../lib/engine/model/index.js';
import {
  SAMPLE_LSE,
  warmUpRunner,
  type ForwardBatch,
  type ModelRunner,
  type SamplePlan,
  type SampledLogits,
} from '../../lib/engine/runner.js';

/** A runner that records what it is asked to run. */
function recordingRunner(opts: { numBlocks: number; blockSize: number; maxPositions: number; sampled: boolean }) {
  const calls: { kind: 'forward' | 'sampled'; batch: ForwardBatch; plan?: SamplePlan }[] = [];
  const copy = (b: ForwardBatch): ForwardBatch => ({
    tokens: b.tokens.slice(),
    positions: b.positions.slice(),
    seqStarts: b.seqStarts.slice(),
    blockTables: b.blockTables.slice(),
    maxBlocksPerSeq: b.maxBlocksPerSeq,
    contextLens: b.contextLens.slice(),
  });
  const runner: ModelRunner = {
    vocabSize: 100,
    blockSize: opts.blockSize,
    numBlocks: opts.numBlocks,
    maxPositions: opts.maxPositions,
    forward: async (batch) => {
      calls.push({ kind: 'forward', batch: copy(batch) });
      return new Float32Array(100);
    },
    ...(opts.sampled
      ? {
          forwardSampled: async (batch: ForwardBatch, plan: SamplePlan) => {
            calls.push({ kind: 'sampled', batch: copy(batch), plan });
            return {} as SampledLogits;
          },
        }
      : {}),
    dispose: async () => {},
  };
  return { runner, calls };
}

describe('warmUpRunner', () => {
  it('runs a long prompt then one decode token, within the pool, on the path the engine uses', async () => {
    const { runner, calls } = recordingRunner({ numBlocks: 1000, blockSize: 16, maxPositions: 4096, sampled: true });
    await warmUpRunner(runner);
    expect(calls.map((c) => c.kind)).toEqual(['sampled', 'sampled']);
    const [prefill, decode] = calls.map((c) => c.batch);
    expect(prefill!.tokens.length).toBe(512); // over 256: the long-prompt attention path
    expect(Array.from(prefill!.positions.subarray(0, 3))).toEqual([0, 1, 2]);
    expect(Array.from(prefill!.contextLens)).toEqual([512]);
    expect(Array.from(decode!.positions)).toEqual([512]);
    expect(Array.from(decode!.contextLens)).toEqual([513]);
    expect(decode!.maxBlocksPerSeq).toBe(Math.ceil(513 / 16));
    expect(Array.from(decode!.blockTables)).toEqual(Array.from({ length: 33 }, (_, i) => i));
    expect(calls[0]!.plan!.flags[0]).toBe(SAMPLE_LSE);
    for (const c of calls) expect(Math.max(...c.batch.tokens)).toBeLessThan(runner.vocabSize);
  });

  it('fits small pools and short models, and uses forward() where there is no forwardSampled', async () => {
    const small = recordingRunner({ numBlocks: 5, blockSize: 16, maxPositions: 4096, sampled: false });
    await warmUpRunner(small.runner);
    expect(small.calls.map((c) => c.kind)).toEqual(['forward', 'forward']);
    expect(small.calls[1]!.batch.contextLens[0]!).toBeLessThanOrEqual(5 * 16);
    expect(Math.max(...small.calls[1]!.batch.blockTables)).toBeLessThan(5);

    const short = recordingRunner({ numBlocks: 1000, blockSize: 16, maxPositions: 100, sampled: false });
    await warmUpRunner(short.runner);
    expect(short.calls[1]!.batch.positions[0]).toBeLessThan(100);

    const none = recordingRunner({ numBlocks: 0, blockSize: 16, maxPositions: 100, sampled: false });
    expect(await warmUpRunner(none.runner)).toBe(0);
    expect(none.calls).toEqual([]);
  });

  it('leaves no trace: a warmed CPU runner gives the same logits as a fresh one', async () => {
    const make = () =>
      CpuModelRunner.create({ config: dummyConfig('tiny'), numBlocks: 8, weights: 'dummy:tiny', threads: 2 });
    const [fresh, warmed] = await Promise.all([make(), make()]);
    try {
      expect(await warmUpRunner(warmed)).toBeGreaterThan(0);
      // A prompt over the blocks the warm-up wrote, in another order.
      const batch: ForwardBatch = {
        tokens: Int32Array.of(256, 17, 3, 99, 5),
        positions: Int32Array.of(0, 1, 2, 3, 4),
        seqStarts: Int32Array.of(0, 5),
        blockTables: Int32Array.of(1, 0),
        maxBlocksPerSeq: 2,
        contextLens: Int32Array.of(5),
      };
      expect(Array.from(await warmed.forward(batch))).toEqual(Array.from(await fresh.forward(batch)));
    } finally {
      await Promise.all([fresh.dispose(), warmed.dispose()]);
    }
  });
});
