import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/index.js';
import { CudaModelRunner } from '../../lib/engine/cuda.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import type { ModelConfig } from '../../lib/engine/model/config.js';
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

// cuBLASLt autotuning (TANDEM_GEMM_TUNE: per new GEMM shape the fastest of the heuristic's top 8, timed on its
// first run or in prepareGemms before a decode-graph capture) and the bf16 gate_up GEMM (TANDEM_GATEUP_BF16: bf16
// out + tandem_llama_silu_mul_bf16 instead of fp32 out + tandem_llama_silu_mul) in CudaLlama (cuda_llama.cpp):
// the switches, that tuning runs and stays in its budget, logits of the new paths within bf16 tolerance of the
// path before (fp32 gate_up, the heuristic's first algorithm) for prefills and CUDA-graph decode steps, and
// transformers' greedy tokens on the fixtures either way. Skipped with the reason printed without a GPU; a failure
// under `npm run test:gpu`.
const gate = await gpuGate(1);

restoreEnvAfterEach('TANDEM_GEMM', 'TANDEM_GEMV', 'TANDEM_GEMM_TUNE', 'TANDEM_GATEUP_BF16');

/** Creates with the two switches set as given (undefined: unset, the default). */
function withSwitches<T>(tune: string | undefined, bf16: string | undefined, create: () => Promise<T>): Promise<T> {
  return withEnv('TANDEM_GEMM_TUNE', tune, () => withEnv('TANDEM_GATEUP_BF16', bf16, create));
}

// hidden 1024, head dim 128; intermediate 3584 (a multiple of 4: silu_mul_bf16's 8-byte loads) or 1030 (its
// one-channel loop).
const configOf = (intermediateSize: number): ModelConfig => ({
  ...dummyConfig('tiny'),
  hiddenSize: 1024,
  intermediateSize,
  numHeads: 8,
  numKvHeads: 2,
  headDim: 128,
});

describe.skipIf(!gate.run)('GPU engine GEMM autotuning and bf16 gate_up', () => {
  it('TANDEM_GEMM_TUNE and TANDEM_GATEUP_BF16 default on, take 0 or 1, and anything else is a typed error', async () => {
    const config = dummyConfig('tiny');
    const make = () => CudaModelRunner.create({ config, numBlocks: 8, weights: 'dummy:tiny' });
    for (const [tune, bf16, want] of [
      [undefined, undefined, { tune: true, gateUpBf16: true }],
      ['1', '1', { tune: true, gateUpBf16: true }],
      ['0', '1', { tune: false, gateUpBf16: true }],
      ['1', '0', { tune: true, gateUpBf16: false }],
      ['0', '0', { tune: false, gateUpBf16: false }],
    ] as const) {
      const runner = await withSwitches(tune, bf16, make);
      expect(runner.gemmTuning, `TANDEM_GEMM_TUNE=${tune} TANDEM_GATEUP_BF16=${bf16}`).toMatchObject({
        ...want,
        shapes: 0,
        ms: 0,
      });
      await runner.dispose();
    }
    // No tuning on the gemmex path (cublasGemmEx has no algorithms to time); bf16 gate_up still.
    const gemmex = await withEnv('TANDEM_GEMM', 'gemmex', () => withSwitches(undefined, undefined, make));
    expect(gemmex.gemmTuning).toMatchObject({ tune: false, gateUpBf16: true });
    await gemmex.dispose();
    process.env.TANDEM_GEMM = 'lt';
    for (const bad of ['yes', '', '2', 'on'])
      for (const [tune, bf16] of [
        [bad, undefined],
        [undefined, bad],
      ] as const)
        await expect(
          withSwitches(tune, bf16, make),
          `TANDEM_GEMM_TUNE=${tune} TANDEM_GATEUP_BF16=${bf16}`,
        ).rejects.toBeInstanceOf(BadArgumentError);
  });

  it.each([3584, 1030])(
    'tuned, bf16 gate_up logits agree with the path before (fp32 gate_up, heuristic first) for prefills and graph decode steps (intermediate %i)',
    async (intermediateSize) => {
      const config = configOf(intermediateSize);
      const seqs = 64;
      const mb = 20; // blocks of 16 per sequence: 320 positions
      process.env.TANDEM_GEMV = 'off'; // every GEMM through cuBLASLt, batch 1 included
      process.env.TANDEM_GEMM = 'lt';
      const create = () => CudaModelRunner.create({ config, numBlocks: seqs * mb, weights: 'dummy:tiny', seed: 11 });
      const now = await withSwitches(undefined, undefined, create);
      const before = await withSwitches('0', '0', create);
      try {
        expect(now.gemmTuning).toMatchObject({ tune: true, gateUpBf16: true });
        expect(before.gemmTuning).toMatchObject({ tune: false, gateUpBf16: false });
        const step = sequenceSteps(config.vocabSize, seqs, mb);
        const V = config.vocabSize;
        const agreement = new LogitsAgreement(V);
        let differs = false;
        const compare = async (batch: ForwardBatch, label: string) => {
          const [a, b] = await Promise.all([now.forward(batch), before.forward(batch)]);
          const n = batch.seqStarts.length - 1;
          expect(a.length).toBe(n * V);
          agreement.check(a, b, n, (s) => `${label}, row ${s}`);
          differs ||= a.some((v, i) => v !== b[i]);
        };
        const all = Array.from({ length: seqs }, (_, s) => s);
        await compare(step([0], 300, 0), 'prefill of 300 tokens');
        // qkv, o_proj, gate_up and down at m = 300 (lm_head's m = 1 as well, the GEMV being off).
        const afterPrefill = now.gemmTuning;
        expect(afterPrefill.shapes).toBeGreaterThanOrEqual(4);
        expect(afterPrefill.ms).toBeGreaterThan(0);
        await compare(step(all.slice(1), 4, 0), 'prefill of 63 x 4 tokens');
        const plan: number[][] = [[0], all.slice(0, 8), all, [3], all.slice(8, 16), all];
        for (const [k, which] of plan.entries())
          await compare(step(which, 1, k + 1), `decode step ${k} (batch ${which.length})`);
        // Decode graphs captured after prepareGemms tuned their shapes: tuning never ran inside a capture.
        expect(now.cudaGraphs).toEqual({ active: true, reason: null });
        expect(now.gemmTuning.shapes).toBeGreaterThan(afterPrefill.shapes);
        expect(before.gemmTuning).toMatchObject({ shapes: 0, ms: 0 });
        // The bf16 rounding of gate and up shows in the logits: the switch changed the path.
        expect(differs).toBe(true);
        console.log(
          `[figure] logits tuned + bf16 gate_up vs heuristic + fp32 gate_up: ${agreement}; tuning ${JSON.stringify(now.gemmTuning)}`,
        );
      } finally {
        await Promise.all([now.dispose(), before.dispose()]);
      }
    },
  );

  it.each(['hf-tiny-llama', 'hf-tiny-qwen2'])(
    "greedy decoding gives transformers' 32 tokens with bf16 gate_up and tuning, and with neither (%s)",
    async (name) => {
      const { dir, expected } = hfFixture(name);
      process.env.TANDEM_GEMM = 'lt';
      for (const [tune, bf16] of [
        [undefined, undefined],
        ['0', '0'],
      ] as const) {
        await using m = await withSwitches(tune, bf16, () => openModel({ model: dir, device: 'cuda', numBlocks: 64 }));
        // Eight copies of the prompt at once: decode steps of batch 8 (above the GEMV) besides smaller ones.
        for (const tokenIds of await greedyCopies(m.engine, expected, 8))
          expect(tokenIds, `TANDEM_GEMM_TUNE=${tune} TANDEM_GATEUP_BF16=${bf16}`).toEqual(expected.greedy);
        expect((m.runner as CudaModelRunner).gemmTuning.gateUpBf16).toBe(bf16 === undefined);
      }
    },
  );
});
