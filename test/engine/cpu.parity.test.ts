/**
 * The native CPU runner against a slow float64 reference (test/helpers/llama-reference.ts) on small dummy
 * models: prefill, chunked prefill, decode, batches of sequences with shuffled block tables, both KV layouts,
 * every architecture feature, every matrix kernel this CPU runs, and the KV bytes at lib/kv's offsets.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CpuModelRunner, type CpuKernel } from '../../lib/engine/cpu.js';
import { dummyConfig, dummyWeights, loadModelConfig, type ModelConfig } from '../../lib/engine/model/index.js';
import { packageRoot } from '../../lib/native/paths.js';
import { BadArgumentError } from '../../lib/errors.js';
import { kvBlockOffset, type KvLayout } from '../../lib/kv/index.js';
import { forwardBatch, logitsRow, relativeError, type SequenceStep } from '../helpers/forward-batch.js';
import { LlamaReference, type ReferenceSequence } from '../helpers/llama-reference.js';

const TOLERANCE = 1e-4;
const BLOCK_SIZE = 4;
const NUM_BLOCKS = 24;

const tiny = dummyConfig('tiny');
const CONFIGS: Record<string, ModelConfig> = {
  'llama (dummy:tiny)': tiny,
  'qwen2 (q/k/v bias)': { ...tiny, architecture: 'Qwen2ForCausalLM', attentionBias: true },
  'llama with attention_bias (q/k/v and o bias)': { ...tiny, attentionBias: true, attentionOutputBias: true },
  // headDim 16: frequencies 0-1 are kept, 2 is interpolated, 3-7 are divided by the factor.
  'llama3 rope scaling': {
    ...tiny,
    ropeTheta: 10000,
    ropeScaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 128 },
  },
  'tied embeddings': { ...tiny, tieWordEmbeddings: true },
  'mistral sliding window 5': { ...tiny, architecture: 'MistralForCausalLM', slidingWindow: 5 },
  // Shapes that are not multiples of the kernels' vector width or tile, head_dim given apart from hidden.
  'odd shapes (GQA 3:1, headDim 24, intermediate 328)': {
    ...tiny,
    vocabSize: 301,
    hiddenSize: 160,
    intermediateSize: 328,
    numLayers: 3,
    numHeads: 6,
    numKvHeads: 2,
    headDim: 24,
  },
};

const tokensOf = (n: number, salt: number) => Array.from({ length: n }, (_, i) => (i * 37 + salt * 11 + 5) % 256);

function weightsOf(config: ModelConfig): Map<string, Float32Array> {
  return new Map([...dummyWeights(config, 7)].map((t) => [t.name, t.data]));
}

async function runnerFor(
  config: ModelConfig,
  weights: Map<string, Float32Array>,
  options: { layout?: KvLayout; kernel?: CpuKernel; threads?: number } = {},
) {
  return CpuModelRunner.create({
    config,
    numBlocks: NUM_BLOCKS,
    blockSize: BLOCK_SIZE,
    weights: [...weights].map(([name, data]) => ({ name, data })),
    ...options,
  });
}

/** Reads K (kv 0) or V (kv 1) of one position of a sequence from the pool, at the offsets lib/kv gives. */
function pooledKv(runner: CpuModelRunner, blocks: readonly number[], layer: number, kv: 0 | 1, pos: number) {
  const { kvHeads, headDim } = runner.kvPool;
  const block = blocks[Math.floor(pos / BLOCK_SIZE)]!;
  const slot = pos % BLOCK_SIZE;
  const offset = kvBlockOffset(runner.kvPoolSpec, block, layer, kv) + slot * kvHeads * headDim * 4;
  const b = runner.kvBuffer;
  return new Float32Array(b.buffer, b.byteOffset + offset, kvHeads * headDim);
}

function expectKvMatches(runner: CpuModelRunner, blocks: readonly number[], seq: ReferenceSequence) {
  for (let layer = 0; layer < runner.kvPool.layers; layer++)
    for (let pos = 0; pos < seq.length; pos++) {
      expect(relativeError(pooledKv(runner, blocks, layer, 0, pos), seq.k[layer]![pos]!)).toBeLessThan(TOLERANCE);
      expect(relativeError(pooledKv(runner, blocks, layer, 1, pos), seq.v[layer]![pos]!)).toBeLessThan(TOLERANCE);
    }
}

/**
 * Every kind of step, checked against the reference, returning every logits row the runner produced:
 * a single prefill; a prefill in two chunks followed by decode steps; two sequences of different lengths
 * prefilled together, then a mixed step (one decodes, the other takes a chunk). Block tables are shuffled.
 */
async function scenario(runner: CpuModelRunner, ref: LlamaReference): Promise<Float32Array[]> {
  const V = runner.vocabSize;
  const produced: Float32Array[] = [];
  const check = async (steps: SequenceStep[], seqs: ReferenceSequence[]) => {
    const logits = await runner.forward(forwardBatch(steps));
    expect(logits.length).toBe(steps.length * V);
    produced.push(logits);
    steps.forEach((step, i) => {
      const expected = ref.forward(seqs[i]!, step.tokens);
      expect(relativeError(logitsRow(logits, V, i), expected), `sequence ${i} at ${step.start}`).toBeLessThan(
        TOLERANCE,
      );
    });
  };

  // One prompt of 11 tokens over blocks 9, 3, 17.
  const a = ref.newSequence();
  const aBlocks = [9, 3, 17];
  await check([{ blocks: aBlocks, start: 0, tokens: tokensOf(11, 1) }], [a]);
  expectKvMatches(runner, aBlocks, a);

  // A prompt in two chunks (7 + 6), then two decode steps.
  const b = ref.newSequence();
  const bBlocks = [5, 20, 1, 14];
  await check([{ blocks: bBlocks, start: 0, tokens: tokensOf(7, 2) }], [b]);
  await check([{ blocks: bBlocks, start: 7, tokens: tokensOf(6, 3) }], [b]);
  await check([{ blocks: bBlocks, start: 13, tokens: [42] }], [b]);
  await check([{ blocks: bBlocks, start: 14, tokens: [257] }], [b]);
  expectKvMatches(runner, bBlocks, b);

  // Two sequences together, then one decodes while the other takes a 3-token chunk (and a new block).
  const c = ref.newSequence();
  const d = ref.newSequence();
  const cBlocks = [0, 22];
  const dBlocks = [11, 2, 19, 7];
  await check(
    [
      { blocks: cBlocks, start: 0, tokens: tokensOf(6, 4) },
      { blocks: dBlocks.slice(0, 3), start: 0, tokens: tokensOf(10, 5) },
    ],
    [c, d],
  );
  await check(
    [
      { blocks: cBlocks, start: 6, tokens: [100] },
      { blocks: dBlocks, start: 10, tokens: tokensOf(3, 6) },
    ],
    [c, d],
  );
  expectKvMatches(runner, cBlocks, c);
  expectKvMatches(runner, dBlocks, d);
  // The first sequence's cache is untouched by everything after it.
  expectKvMatches(runner, aBlocks, a);
  return produced;
}

describe('CpuModelRunner matches the reference forward pass', () => {
  for (const [name, config] of Object.entries(CONFIGS))
    for (const layout of ['block-major', 'layer-major'] as const)
      it(`${name}, ${layout}`, async () => {
        const weights = weightsOf(config);
        await using runner = await runnerFor(config, weights, { layout, threads: 2 });
        expect(runner.kvPoolSpec).toMatchObject({ dtype: 'fp32', layout, headLayout: 'NHD', blockSize: BLOCK_SIZE });
        await scenario(runner, new LlamaReference(config, weights));
      });
});

describe('CpuModelRunner kernels and threads', () => {
  const config = CONFIGS['odd shapes (GQA 3:1, headDim 24, intermediate 328)']!;
  const weights = weightsOf(config);

  for (const kernel of ['generic', 'avx2', 'avx512'] as const)
    it(`the ${kernel} kernel matches the reference (where this CPU runs it)`, async () => {
      let runner: CpuModelRunner;
      try {
        runner = await runnerFor(config, weights, { kernel });
      } catch (error) {
        expect(error).toBeInstanceOf(BadArgumentError);
        expect((error as Error).message).toMatch(/not supported by this CPU/);
        return;
      }
      await using _ = runner;
      expect(runner.kernel).toBe(kernel);
      await scenario(runner, new LlamaReference(config, weights));
    });

  it('results do not depend on the number of threads (bit for bit)', async () => {
    const runs: Float32Array[][] = [];
    for (const threads of [1, 2, 5]) {
      await using runner = await runnerFor(config, weights, { threads });
      expect(runner.threads).toBe(threads);
      runs.push(await scenario(runner, new LlamaReference(config, weights)));
    }
    for (const run of runs.slice(1)) expect(run).toEqual(runs[0]);
  });

  it('uses a caller-provided buffer (a view into a SharedArrayBuffer) as the KV pool', async () => {
    const probe = await runnerFor(config, weights);
    const bytes = probe.kvPool.poolBytes;
    await probe.dispose();
    const shared = new SharedArrayBuffer(bytes + 64);
    const kvBuffer = new Uint8Array(shared, 64, bytes);
    await using runner = await CpuModelRunner.create({
      config,
      numBlocks: NUM_BLOCKS,
      blockSize: BLOCK_SIZE,
      kvBuffer,
      weights: [...weights].map(([name, data]) => ({ name, data })),
    });
    expect(runner.kvBuffer).toBe(kvBuffer);
    await scenario(runner, new LlamaReference(config, weights));
    expect(new Uint8Array(shared, 0, 64).every((x) => x === 0)).toBe(true); // nothing written before the view
  });

  it('loads dummy weights by name', async () => {
    await using runner = await CpuModelRunner.create({
      config: tiny,
      numBlocks: NUM_BLOCKS,
      blockSize: BLOCK_SIZE,
      weights: 'dummy:tiny',
      seed: 7,
    });
    await scenario(runner, new LlamaReference(tiny, weightsOf(tiny)));
  });
});

describe('CpuModelRunner matches transformers (fixtures made by scripts/make-hf-fixture.py)', () => {
  for (const name of ['hf-tiny-llama', 'hf-tiny-qwen2'])
    for (const layout of ['block-major', 'layer-major'] as const)
      it(`${name}, ${layout}: last-token logits of the prompt and 32 greedy tokens`, async () => {
        const dir = join(packageRoot, 'test', 'fixtures', name);
        const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as {
          promptIds: number[];
          lastLogits: number[];
          greedy: number[];
        };
        const config = loadModelConfig(dir);
        await using runner = await CpuModelRunner.create({
          config,
          numBlocks: 16,
          blockSize: BLOCK_SIZE,
          layout,
          weights: dir,
        });
        const blocks = [9, 0, 14, 2, 6, 11, 4, 3, 15, 1, 8, 13, 5]; // 52 positions, shuffled
        const ids = expected.promptIds;
        let logits = await runner.forward(forwardBatch([{ blocks, start: 0, tokens: ids }]));
        expect(relativeError(logits, expected.lastLogits)).toBeLessThan(TOLERANCE);
        const greedy: number[] = [];
        for (let i = 0; i < expected.greedy.length; i++) {
          let next = 0;
          for (let v = 1; v < logits.length; v++) if (logits[v]! > logits[next]!) next = v;
          greedy.push(next);
          logits = await runner.forward(forwardBatch([{ blocks, start: ids.length + i, tokens: [next] }]));
        }
        expect(greedy).toEqual(expected.greedy);
      });
});
