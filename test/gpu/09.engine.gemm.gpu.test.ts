import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/index.js';
import { CudaModelRunner } from '../../lib/engine/cuda.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { openModel } from '../../lib/engine/open.js';
import type { ForwardBatch } from '../../lib/engine/runner.js';
import { gpuGate } from '../helpers/gpu.js';
import {
  greedyCopies,
  hfFixture,
  LogitsAgreement,
  restoreEnvAfterEach,
  sequenceSteps,
  withEnv,
} from '../helpers/gpu-logits.js';

// The GEMMs above the GEMV through cuBLASLt (TANDEM_GEMM=lt, the default where libcublasLt loads: LtGemm in
// native/src/engine/cublas.cpp) against cublasGemmEx (TANDEM_GEMM=gemmex, the path before): logits within bf16
// tolerance for a 300-token prefill and decode steps of batch 1, 8 and 64 (in CUDA graphs), and transformers'
// greedy tokens on the fixtures either way. Skipped with the reason printed without a GPU; a failure under
// `npm run test:gpu`.
const gate = await gpuGate(1);

restoreEnvAfterEach('TANDEM_GEMM', 'TANDEM_GEMV');
const withGemm = <T>(value: string | undefined, create: () => Promise<T>) => withEnv('TANDEM_GEMM', value, create);

describe.skipIf(!gate.run)('GPU engine GEMMs through cuBLASLt', () => {
  it('TANDEM_GEMM picks the path: default lt, lt, gemmex; anything else is a typed error', async () => {
    const config = dummyConfig('tiny');
    const make = () => CudaModelRunner.create({ config, numBlocks: 8, weights: 'dummy:tiny' });
    for (const [value, want] of [
      [undefined, 'lt'],
      ['lt', 'lt'],
      ['gemmex', 'gemmex'],
    ] as const) {
      const runner = await withGemm(value, make);
      expect(runner.gemmPath, `TANDEM_GEMM=${value}`).toBe(want);
      await runner.dispose();
    }
    for (const bad of ['cublas', 'LT', ''])
      await expect(withGemm(bad, make), `TANDEM_GEMM=${bad}`).rejects.toBeInstanceOf(BadArgumentError);
  });

  // hidden 1024, intermediate 3584, head dim 128; TANDEM_GEMV=off so that every GEMM, batch 1 included, takes
  // the path under test.
  it('logits of a 300-token prefill and of decode steps at batch 1, 8 and 64 agree between lt and gemmex', async () => {
    const config = {
      ...dummyConfig('tiny'),
      hiddenSize: 1024,
      intermediateSize: 3584,
      numHeads: 8,
      numKvHeads: 2,
      headDim: 128,
    };
    const seqs = 64;
    const mb = 20; // blocks of 16 per sequence: 320 positions
    process.env.TANDEM_GEMV = 'off';
    const create = () => CudaModelRunner.create({ config, numBlocks: seqs * mb, weights: 'dummy:tiny', seed: 11 });
    const lt = await withGemm('lt', create);
    const gemmex = await withGemm('gemmex', create);
    try {
      expect(lt.gemmPath).toBe('lt');
      expect(gemmex.gemmPath).toBe('gemmex');
      const step = sequenceSteps(config.vocabSize, seqs, mb);
      const V = config.vocabSize;
      const agreement = new LogitsAgreement(V);
      const compare = async (batch: ForwardBatch, label: string) => {
        const [a, b] = await Promise.all([lt.forward(batch), gemmex.forward(batch)]);
        const n = batch.seqStarts.length - 1;
        expect(a.length).toBe(n * V);
        agreement.check(a, b, n, (s) => `${label}, row ${s}`);
      };
      const all = Array.from({ length: seqs }, (_, s) => s);
      await compare(step([0], 300, 0), 'prefill of 300 tokens');
      await compare(step(all.slice(1), 4, 0), 'prefill of 63 x 4 tokens');
      const plan: number[][] = [[0], all.slice(0, 8), all, [3], all.slice(8, 16), all];
      for (const [k, which] of plan.entries())
        await compare(step(which, 1, k + 1), `decode step ${k} (batch ${which.length})`);
      expect(lt.cudaGraphs).toEqual({ active: true, reason: null });
      console.log(`[figure] logits lt vs gemmex: ${agreement}`);
    } finally {
      await Promise.all([lt.dispose(), gemmex.dispose()]);
    }
  });

  it.each(['hf-tiny-llama', 'hf-tiny-qwen2'])(
    "greedy decoding gives transformers' 32 tokens through lt and through gemmex (%s)",
    async (name) => {
      const { dir, expected } = hfFixture(name);
      for (const value of ['lt', 'gemmex'] as const) {
        await using m = await withGemm(value, () => openModel({ model: dir, device: 'cuda', numBlocks: 64 }));
        expect((m.runner as CudaModelRunner).gemmPath).toBe(value);
        // Eight copies of the prompt at once: decode steps of batch 8 (above the GEMV) besides smaller ones.
        for (const tokenIds of await greedyCopies(m.engine, expected, 8))
          expect(tokenIds, `TANDEM_GEMM=${value}`).toEqual(expected.greedy);
      }
    },
  );
});
