/**
 * Bad input to the CPU runner: every malformed batch, weight or option is a typed error naming what is wrong,
 * nothing is written to the KV pool, and the runner keeps working afterwards.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CpuModelRunner, type NamedTensor } from '../../lib/engine/cpu.js';
import { dummyConfig, dummyWeights, nativeManifest, weightManifest } from '../../lib/engine/model/index.js';
import type { ForwardBatch } from '../../lib/engine/runner.js';
import { BadArgumentError, DisposedError, TandemError } from '../../lib/errors.js';
import { loadBinding } from '../../lib/native/binding.js';
import { forwardBatch, relativeError } from '../helpers/forward-batch.js';
import { LlamaReference } from '../helpers/llama-reference.js';

const config = { ...dummyConfig('tiny'), maxPositionEmbeddings: 64 };
const weights = new Map([...dummyWeights(config, 3)].map((t) => [t.name, t.data]));
const tensors = (): NamedTensor[] => [...weights].map(([name, data]) => ({ name, data }));
const NUM_BLOCKS = 16;
const BLOCK_SIZE = 4;

describe('CpuModelRunner rejects bad input', () => {
  let runner: CpuModelRunner;
  beforeAll(async () => {
    runner = await CpuModelRunner.create({ config, numBlocks: NUM_BLOCKS, blockSize: BLOCK_SIZE, weights: tensors });
  });
  afterAll(() => runner.dispose());

  const good = (): ForwardBatch => forwardBatch([{ blocks: [6, 2], start: 0, tokens: [256, 72, 105, 33, 10] }]);

  /** Expects `batch` to reject with BadArgumentError matching `message`, leaving the pool as it was. */
  async function rejects(batch: ForwardBatch, message: RegExp) {
    const before = runner.kvBuffer.slice();
    const error = await runner.forward(batch).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(BadArgumentError);
    expect((error as TandemError).code).toBe('TANDEM_BAD_ARGUMENT');
    expect((error as Error).message).toMatch(message);
    expect(runner.kvBuffer).toEqual(before);
  }

  it.each([
    [
      'a token id outside the vocabulary',
      (b: ForwardBatch) => (b.tokens[2] = 258),
      /tokens\[2\] = 258 is outside the vocabulary \(0\.\.257\)/,
    ],
    ['a negative token id', (b: ForwardBatch) => (b.tokens[0] = -1), /tokens\[0\] = -1/],
    [
      'a block id past the pool',
      (b: ForwardBatch) => (b.blockTables[1] = NUM_BLOCKS),
      /blockTables\[0\]\[1\] = 16 is not a block of the pool \(0\.\.15\)/,
    ],
    [
      'an unused (-1) entry where a block is needed',
      (b: ForwardBatch) => (b.blockTables[0] = -1),
      /blockTables\[0\]\[0\] = -1/,
    ],
    [
      'contextLens that disagree with the positions',
      (b: ForwardBatch) => (b.contextLens[0] = 7),
      /contextLens\[0\] = 7 must be the last new position \+ 1 \(5\)/,
    ],
    [
      'positions that skip',
      (b: ForwardBatch) => (b.positions[3] = 9),
      /must be consecutive: positions\[3\] = 9 follows 2/,
    ],
    [
      'seqStarts that do not cover the tokens',
      (b: ForwardBatch) => (b.seqStarts[1] = 4),
      /seqStarts\[1\] must equal the number of tokens 5/,
    ],
  ])('%s', async (_, corrupt, message) => {
    const batch = good();
    corrupt(batch);
    await rejects(batch, message);
  });

  it('a position beyond maxPositions', async () => {
    const blocks = Array.from({ length: 16 }, (_, i) => i);
    await rejects(
      forwardBatch([{ blocks, start: 64, tokens: [1] }]),
      /reaches position 64, beyond the model's maxPositions 64/,
    );
  });

  it('a block table too short for the context', async () => {
    await rejects(forwardBatch([{ blocks: [1], start: 0, tokens: [1, 2, 3, 4, 5] }]), /has room for 4/);
  });

  it('a block that receives new tokens and also appears in another sequence', async () => {
    await rejects(
      forwardBatch([
        { blocks: [3], start: 0, tokens: [1, 2] },
        { blocks: [3], start: 0, tokens: [4, 5] },
      ]),
      /block 3 receives new tokens this step but appears 2 times/,
    );
  });

  it('arrays of the wrong type', async () => {
    const batch = good();
    const error = await runner
      .forward({ ...batch, tokens: Array.from(batch.tokens) as never })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(BadArgumentError);
    expect((error as Error).message).toMatch(/tokens must be an Int32Array/);
  });

  it('still computes correctly after all of that', async () => {
    const batch = good();
    const logits = await runner.forward(batch);
    const ref = new LlamaReference(config, weights);
    expect(relativeError(logits, ref.forward(ref.newSequence(), Array.from(batch.tokens)))).toBeLessThan(1e-4);
  });
});

describe('CpuModelRunner weights', () => {
  const base = { config, numBlocks: NUM_BLOCKS, blockSize: BLOCK_SIZE };

  it('a missing tensor fails create(), naming it', async () => {
    const some = tensors().filter((t) => t.name !== 'model.layers.1.mlp.up_proj.weight');
    await expect(CpuModelRunner.create({ ...base, weights: some })).rejects.toThrow(
      /1 weight tensor\(s\) not set: model\.layers\.1\.mlp\.up_proj\.weight/,
    );
  });

  it('a tensor of the wrong size fails create(), naming it and the shape it needs', async () => {
    const wrong = tensors().map((t) =>
      t.name === 'model.layers.0.self_attn.k_proj.weight' ? { name: t.name, data: t.data.subarray(1) } : t,
    );
    const error = await CpuModelRunner.create({ ...base, weights: wrong }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(BadArgumentError);
    expect((error as Error).message).toMatch(
      /tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has 2047 elements; this config needs 2048 \(shape \[32, 64\]\)/,
    );
  });

  it('an unknown tensor fails create(); a tied model says why lm_head is not wanted', async () => {
    const extra = [...tensors(), { name: 'model.layers.2.input_layernorm.weight', data: new Float32Array(64) }];
    await expect(CpuModelRunner.create({ ...base, weights: extra })).rejects.toThrow(
      /tensor 'model\.layers\.2\.input_layernorm\.weight' is not part of this model/,
    );
    const tied = { ...config, tieWordEmbeddings: true };
    await expect(CpuModelRunner.create({ ...base, config: tied, weights: tensors() })).rejects.toThrow(
      /'lm_head\.weight' is not part of this model \(this config ties lm_head/,
    );
  });

  it('the raw binding rejects a forward before every weight is set, then works once they are', async () => {
    const { binding } = loadBinding();
    const raw = new binding.CpuLlama({
      ...config,
      tensors: nativeManifest(weightManifest(config)),
      numBlocks: NUM_BLOCKS,
      blockSize: BLOCK_SIZE,
      layout: 'block-major',
      kvBuffer: new Uint8Array(NUM_BLOCKS * config.numLayers * 2 * BLOCK_SIZE * config.numKvHeads * config.headDim * 4),
    });
    try {
      const batch = forwardBatch([{ blocks: [0], start: 0, tokens: [1, 2] }]);
      const call = () =>
        raw.forward(
          batch.tokens,
          batch.positions,
          batch.seqStarts,
          batch.blockTables,
          batch.maxBlocksPerSeq,
          batch.contextLens,
        );
      await expect(call()).rejects.toMatchObject({
        code: 'TANDEM_BAD_ARGUMENT',
        message: /not set, first 'model\.embed_tokens\.weight'/,
      });
      expect(() => raw.ready()).toThrow(/weight tensor\(s\) not set/);
      expect(raw.missingWeights().length).toBe(weights.size);
      for (const [name, data] of weights) raw.setWeight(name, data);
      expect(raw.missingWeights()).toEqual([]);
      raw.ready();
      expect((await call()).length).toBe(config.vocabSize);
    } finally {
      await raw.dispose();
    }
  });

  it('bad options are BadArgumentErrors', async () => {
    await expect(CpuModelRunner.create({ ...base, numBlocks: 0, weights: [] })).rejects.toThrow(BadArgumentError);
    await expect(CpuModelRunner.create({ ...base, layout: 'sideways' as never, weights: [] })).rejects.toThrow(
      /layout must be one of/,
    );
    await expect(CpuModelRunner.create({ ...base, threads: 0, weights: [] })).rejects.toThrow(
      /threads must be a positive integer/,
    );
    await expect(CpuModelRunner.create({ ...base, kvBuffer: new Uint8Array(100), weights: [] })).rejects.toThrow(
      /kvBuffer holds 100 bytes; the pool needs 32768 \(16 blocks x 2048 bytes\)/,
    );
    await expect(CpuModelRunner.create({ ...base, kernel: 'sse9' as never, weights: [] })).rejects.toThrow(
      /kernel must be one of/,
    );
  });
});

describe('CpuModelRunner disposal', () => {
  it('forward after dispose rejects with DisposedError; dispose is idempotent', async () => {
    const runner = await CpuModelRunner.create({
      config,
      numBlocks: NUM_BLOCKS,
      blockSize: BLOCK_SIZE,
      weights: tensors,
    });
    await runner.dispose();
    expect(runner.disposed).toBe(true);
    await expect(runner.forward(forwardBatch([{ blocks: [0], start: 0, tokens: [1] }]))).rejects.toThrow(DisposedError);
    await runner.dispose();
  });

  it('dispose while passes are queued: each settles (result or DisposedError), nothing hangs', async () => {
    const runner = await CpuModelRunner.create({
      config,
      numBlocks: NUM_BLOCKS,
      blockSize: BLOCK_SIZE,
      weights: tensors,
    });
    const pending = Array.from({ length: 8 }, () =>
      runner.forward(
        forwardBatch([{ blocks: [0, 1, 2, 3], start: 0, tokens: Array.from({ length: 16 }, (_, i) => i) }]),
      ),
    );
    await runner.dispose();
    const settled = await Promise.allSettled(pending);
    for (const s of settled)
      if (s.status === 'rejected') expect(s.reason).toBeInstanceOf(DisposedError);
      else expect(s.value.length).toBe(config.vocabSize);
    expect(settled.some((s) => s.status === 'rejected')).toBe(true);
  });
});
