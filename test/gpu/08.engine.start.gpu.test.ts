import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CudaModelRunner } from '../../lib/engine/cuda.js';
import { loadModelConfig } from '../../lib/engine/model/config.js';
import { dummyConfig, dummyTensorRows, dummyWeights, saveDummyModel } from '../../lib/engine/model/dummy.js';
import { weightManifest } from '../../lib/engine/model/manifest.js';
import { f32ToBf16, openSafetensors } from '../../lib/engine/model/safetensors.js';
import { openModel } from '../../lib/engine/open.js';
import { gpuGate } from '../helpers/gpu.js';

// Start-up of the GPU engine: dummy weights generated on the GPU (native/kernels/dummy_init.cu) are bit for bit
// the host generator's values rounded to bf16, and opening dummy:llama-3.1-8b logs each phase's time.
const gate = await gpuGate(1);

/** Index of the first difference of two bf16 arrays, or -1. */
function firstDifference(a: Uint16Array, b: Uint16Array): number {
  if (a.length !== b.length) return 0;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

describe.skipIf(!gate.run)('GPU engine start-up', () => {
  // tiny, and a shape whose rows are not a multiple of 8 values (the kernel's scalar path) with biases.
  const configs = [
    ['dummy:tiny', dummyConfig('tiny')],
    [
      'odd widths with biases',
      { ...dummyConfig('tiny'), intermediateSize: 100, attentionBias: true, attentionOutputBias: true },
    ],
  ] as const;

  it.each(configs)('GPU-generated dummy weights equal the host-generated ones (%s)', async (_label, config) => {
    const seed = 12345;
    const onGpu = await CudaModelRunner.create({ config, numBlocks: 4, weights: 'dummy:tiny', seed });
    // The same weights made on the host and copied in through setWeight.
    const fromHost = await CudaModelRunner.create({ config, numBlocks: 4, weights: dummyWeights(config, seed) });
    try {
      for (const t of weightManifest(config)) {
        const gpu = await onGpu.readWeightBf16(t.name);
        const host = f32ToBf16(dummyTensorRows(config, seed, t.name));
        const copied = await fromHost.readWeightBf16(t.name);
        expect(firstDifference(gpu, host), `${t.name}: first differing element`).toBe(-1);
        expect(firstDifference(copied, host), `${t.name} (setWeight): first differing element`).toBe(-1);
      }
    } finally {
      await onGpu.dispose();
      await fromHost.dispose();
    }
  });

  it('dummy:llama-3.1-8b opens with its phase timings logged, and its weights are the host generator values', async () => {
    const lines: string[] = [];
    const t0 = performance.now();
    await using m = await openModel({
      model: 'dummy:llama-3.1-8b',
      device: 'cuda',
      numBlocks: 256,
      log: (line) => lines.push(line),
    });
    const ms = performance.now() - t0;
    for (const line of lines) console.log(`[start] ${line}`);
    console.log(`[figure] openModel(dummy:llama-3.1-8b) on the GPU: ${ms.toFixed(0)} ms`);
    for (const phase of [
      /^config and tokenizer: \d+ ms$/,
      /^open CUDA device 0: \d+ ms$/,
      /^load kernels: \d+ ms$/,
      /^allocate KV pool \(256 blocks, [\d.]+ GB\): \d+ ms$/,
      /^cuBLAS and weight memory: \d+ ms$/,
      /^generating dummy weights: 16\.1 GB in \d+ ms \([\d.]+ GB\/s\)$/,
      /^GPU model runner ready in \d+ ms$/,
      /^model dummy:llama-3\.1-8b open on cuda in \d+ ms$/,
    ])
      expect(
        lines.some((l) => phase.test(l)),
        `a line matching ${phase}`,
      ).toBe(true);
    const runner = m.runner as CudaModelRunner;
    const config = m.config;
    // Whole tensors of one layer, and the first and last rows of the embedding and lm_head.
    for (const name of ['model.layers.31.self_attn.k_proj.weight', 'model.layers.0.mlp.down_proj.weight']) {
      const gpu = await runner.readWeightBf16(name);
      expect(firstDifference(gpu, f32ToBf16(dummyTensorRows(config, 0, name))), name).toBe(-1);
    }
    for (const name of ['model.embed_tokens.weight', 'lm_head.weight']) {
      const gpu = await runner.readWeightBf16(name);
      const h = config.hiddenSize;
      for (const row of [0, config.vocabSize - 1]) {
        const host = f32ToBf16(dummyTensorRows(config, 0, name, row, 1));
        expect(firstDifference(gpu.subarray(row * h, (row + 1) * h), host), `${name} row ${row}`).toBe(-1);
      }
    }
  }, 120_000);

  let tmp = '';
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'tandem-start-gpu-'));
    saveDummyModel(join(tmp, 'tiny-f16'), 'tiny', 3, 'F16');
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));
  const fixture = (name: string) => join(import.meta.dirname, '..', 'fixtures', name);
  it.each([
    ['BF16', () => fixture('hf-tiny-llama')],
    ['F32', () => fixture('hf-tiny-qwen2')],
    ['F16', () => join(tmp, 'tiny-f16')],
  ])('a %s checkpoint read from disk by the native reader equals its values rounded to bf16', async (_dtype, where) => {
    const dir = where();
    const config = loadModelConfig(dir);
    const lines: string[] = [];
    const runner = await CudaModelRunner.create({ config, numBlocks: 4, weights: dir, log: (l) => lines.push(l) });
    const checkpoint = openSafetensors(dir);
    try {
      expect(lines.some((l) => /^loading weights: [\d.]+ GB in \d+ ms/.test(l))).toBe(true);
      for (const t of weightManifest(config)) {
        const gpu = await runner.readWeightBf16(t.name);
        const want = f32ToBf16(checkpoint.tensorF32(t.name));
        expect(firstDifference(gpu, want), `${t.name}: first differing element`).toBe(-1);
      }
    } finally {
      checkpoint.close();
      await runner.dispose();
    }
  });
});
