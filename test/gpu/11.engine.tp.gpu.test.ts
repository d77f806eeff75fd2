import { describe, expect, it } from 'vitest';
import { ParallelLayoutError, TandemError } from '../../lib/errors.js';
import { CudaModelRunner } from '../../lib/engine/cuda.js';
import { loadModelConfig, type ModelConfig } from '../../lib/engine/model/config.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { gpuGate } from '../helpers/gpu.js';
import { BF16_TOLERANCE, hfFixture, relativeL2Error as relativeError } from '../helpers/gpu-logits.js';
import {
  batchOf,
  CLEAR_MARGIN,
  expectMalformedBatchRefusedThenDisposeSettles,
  expectStepsAgree,
  expectSameWeights,
  greedy,
  twoSequenceSteps,
} from '../helpers/parallel.js';

// Tensor parallelism in the GPU engine (issue 25): TP 2 and TP 4 as ranks on ONE device (each rank its own
// CudaDevice thread and stream, summing through the local communicator, native/src/engine/cuda_llama_tp.h) against
// TP 1 on the same device: the same weights bit for bit (each rank's slice of the TP 1 tensors, from the checkpoint
// and from the dummy generator), logits within bf16 tolerance, identical greedy tokens. Skipped without a GPU.
const gate = await gpuGate(1);

// TP 1 and TP n hold the same bf16 weights; they differ only in fp32 summation order (the all-reduces add the ranks'
// partial sums; one rank sums inside its GEMM), which bf16 activations then round: a relative logit error of a few
// 1e-3 at most. 1e-2 still catches a wrong slice or a missed reduction (errors of order 1).
const TP_TOLERANCE = 1e-2;
// Against transformers' fp32 logits, as test/gpu/05.engine.gpu.test.ts.

describe.skipIf(!gate.run)('GPU engine, tensor parallel ranks on one device', () => {
  describe.each(['hf-tiny-llama', 'hf-tiny-qwen2'])('%s', (name) => {
    const { dir, expected } = hfFixture(name);
    const config = loadModelConfig(dir);

    it.each([2, 4])(
      'TP %i reads each rank slice from the checkpoint; logits match TP 1, 32 greedy tokens identical (and transformers)',
      async (tp) => {
        const one = await CudaModelRunner.create({ config, numBlocks: 16, weights: dir });
        const many = await CudaModelRunner.create({ config, numBlocks: 16, weights: dir, parallel: { tp } });
        try {
          expect(many.tensorParallelSize).toBe(tp);
          const shards = many.tensorShards;
          expect(shards.map((s) => s.rank)).toEqual([...Array(tp).keys()]);
          expect(shards.map((s) => s.heads[1])).toEqual(Array(tp).fill(config.numHeads / tp));
          expect(many.cudaGraphs.active).toBe(false);
          expect(many.cudaGraphs.reason).toMatch(/tensor-parallel/);
          await expectSameWeights(config, one, many);

          const a = await greedy(one, expected.promptIds, 32);
          const b = await greedy(many, expected.promptIds, 32);
          const rel = relativeError(b.logits, a.logits);
          console.log(
            `[figure] ${name}: TP ${tp} vs TP 1 prefill logits relative error ${rel.toExponential(2)}; ` +
              `vs transformers ${relativeError(b.logits, expected.lastLogits).toExponential(2)}`,
          );
          expect(rel).toBeLessThan(TP_TOLERANCE);
          expect(relativeError(b.logits, expected.lastLogits)).toBeLessThan(BF16_TOLERANCE);
          expect(b.tokens).toEqual(a.tokens);
          expect(b.tokens).toEqual(expected.greedy);
        } finally {
          await Promise.all([one.dispose(), many.dispose()]);
        }
      },
    );
  });

  // dummy:tiny (head dim 16: llama.cu's attention), and head dims 64 / 128 whose rank shapes take the flash kernels:
  // 8 heads over 2 kv heads at TP 2 is 4 heads over 1 kv head per rank; at TP 4, 2 heads and one replicated kv head.
  const head64: ModelConfig = { ...dummyConfig('tiny'), headDim: 64, numHeads: 8, numKvHeads: 2 };
  const head128: ModelConfig = { ...dummyConfig('tiny'), headDim: 128, numHeads: 8, numKvHeads: 1 };
  const DUMMY_SHAPES: [string, ModelConfig, number, string][] = [
    ['dummy:tiny', dummyConfig('tiny'), 2, 'reference'],
    ['dummy:tiny', dummyConfig('tiny'), 4, 'reference'],
    ['head dim 64, 8 heads, 2 kv heads', head64, 2, 'prefill3'],
    ['head dim 64, 8 heads, 2 kv heads', head64, 4, 'prefill3'],
    ['head dim 128, 8 heads, 1 kv head', head128, 2, 'prefill3'],
  ];
  it.each(DUMMY_SHAPES)(
    '%s at TP %i: dummy weights are slices of TP 1, and batches of prefill chunks and decodes agree step by step',
    async (_name, config, tp, kernels) => {
      const numBlocks = 64;
      const one = await CudaModelRunner.create({ config, numBlocks, weights: 'dummy:tiny' });
      const many = await CudaModelRunner.create({ config, numBlocks, weights: 'dummy:tiny', parallel: { tp } });
      try {
        expect(many.attentionKernels).toBe(kernels);
        await expectSameWeights(config, one, many);
        // Sequence A: a 70-token prompt in chunks of 40 and 30, then decodes; B joins with 20 tokens, then decodes.
        const { a, b, tableA, tableB, mb, steps } = twoSequenceSteps();
        const { worst } = await expectStepsAgree(
          one,
          many,
          steps,
          mb,
          TP_TOLERANCE,
          (seqs, s) => `step at ${seqs[s]!.start}, sequence ${s}`,
        );
        // Sampling on rank 0 over the gathered logits: the greedy candidates are TP 1's.
        const last = batchOf(
          [
            { ids: [a[74]!], start: 75, table: tableA },
            { ids: [b[24]!], start: 25, table: tableB },
          ],
          mb,
        );
        const plan = {
          n: Int32Array.of(2, 2),
          flags: Int32Array.of(0, 0),
          invT: Float64Array.of(0, 0),
          topP: Float64Array.of(1, 1),
          u: Float64Array.of(0, 0),
        };
        const [sx, sy] = [await one.forwardSampled(last, plan), await many.forwardSampled(last, plan)];
        for (let s = 0; s < 2; s++) {
          expect(
            relativeError(sy.topLogits.subarray(2 * s, 2 * s + 2), sx.topLogits.subarray(2 * s, 2 * s + 2)),
          ).toBeLessThan(TP_TOLERANCE);
          if (sx.topLogits[2 * s]! - sx.topLogits[2 * s + 1]! > CLEAR_MARGIN)
            expect(sy.topIds[2 * s]).toBe(sx.topIds[2 * s]);
        }
        console.log(
          `[figure] ${_name} TP ${tp} vs TP 1 (${many.attentionKernels}): worst relative logit error ${worst.toExponential(2)}`,
        );
      } finally {
        await Promise.all([one.dispose(), many.dispose()]);
      }
    },
  );

  it('host tensors (setWeight) are sliced per rank: the same weights as TP 1 gets', async () => {
    const config = dummyConfig('tiny');
    const { dummyWeights } = await import('../../lib/engine/model/dummy.js');
    const weights = () => dummyWeights(config, 7);
    const one = await CudaModelRunner.create({ config, numBlocks: 8, weights });
    const many = await CudaModelRunner.create({ config, numBlocks: 8, weights, parallel: { tp: 2 } });
    try {
      await expectSameWeights(config, one, many);
    } finally {
      await Promise.all([one.dispose(), many.dispose()]);
    }
  });

  it('bad layouts are typed errors before any GPU memory is taken; the GPU stays usable', async () => {
    const config = dummyConfig('tiny');
    for (const parallel of [{ tp: 3 }, { tp: 8 }, { tp: 0 }])
      await expect(
        CudaModelRunner.create({ config, numBlocks: 4, weights: 'dummy:tiny', parallel }),
      ).rejects.toBeInstanceOf(ParallelLayoutError);
    await expect(
      CudaModelRunner.create({
        config,
        numBlocks: 4,
        weights: 'dummy:tiny',
        parallel: { tp: 2 },
        devices: [0, 1],
        communicator: 'local',
      }),
    ).rejects.toThrow(/the local communicator runs every rank on one GPU/);
    const ok = await CudaModelRunner.create({ config, numBlocks: 4, weights: 'dummy:tiny', parallel: { tp: 2 } });
    await ok.dispose();
  });

  it('a malformed batch is refused on every rank alike (the group keeps working); dispose mid-pass does not hang', async () => {
    const config = dummyConfig('tiny');
    const many = await CudaModelRunner.create({ config, numBlocks: 16, weights: 'dummy:tiny', parallel: { tp: 2 } });
    // Block 99 of 16; then a long prefill in flight while the group is disposed: the pass settles, nothing hangs.
    await expectMalformedBatchRefusedThenDisposeSettles(many, config.vocabSize, TandemError);
  });
});
