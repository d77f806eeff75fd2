import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ParallelLayoutError, TandemError } from '../../lib/errors.js';
import { CudaModelRunner } from '../../lib/engine/cuda.js';
import { openModel } from '../../lib/engine/open.js';
import { loadModelConfig, type ModelConfig } from '../../lib/engine/model/config.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { weightManifest } from '../../lib/engine/model/manifest.js';
import { stageLayers, tensorStages } from '../../lib/engine/parallel.js';
import { gpuGate } from '../helpers/gpu.js';
import { BF16_TOLERANCE, hfFixture, relativeL2Error as relativeError } from '../helpers/gpu-logits.js';
import {
  batchOf,
  CLEAR_MARGIN,
  expectDisposeMidPassSettles,
  expectRowsAgree,
  greedy,
  rankSliceBits,
  syntheticPrompt,
  type SeqPart,
} from '../helpers/parallel.js';
import {
  aggregatedGraph,
  disaggregatedGraph,
  expectSameGreedyUpToNearTie,
  expectServesLikeAggregated,
  layoutDeployments,
} from '../helpers/parallel-serve.js';

// Pipeline parallelism in the GPU engine (issue 25) on ONE GPU: pp stages, each a group of tp CudaLlama ranks (its
// own CudaDevice thread and stream) holding its share of the layers and a KV pool of those, the hidden state handed
// from stage to stage by the local stage channel (native/src/engine/cuda_llama_pp.h) one micro-batch at a time
// (lib/engine/cuda-pipeline.ts). Against PP 1 on the same device: every rank holds its stage's tensors (its slice of
// each) bit for bit, logits within test 11's tolerance, greedy tokens identical (the fixtures' conditioned prompt;
// other prompts up to PP 1's first near-tie, test/gpu/12.serve.tp's rule); through openModel, LlmEngine, the sampler
// on the device and the prefix cache; and a graph of a PP 2 prefill pool and a TP 1 decode pool (and the other way
// round, and TP 2 x PP 2 -> TP 2) serves what TP 1 aggregated serving does through the openai client, each stage's
// pool writing its layers (and head slices) into the decode worker's pools. Skipped without a GPU.
const gate = await gpuGate(1);

// As test/gpu/11.engine.tp.gpu.test.ts: PP n holds PP 1's bf16 weights; a stage hands over the residual stream
// exactly as a layer leaves it, so a single sequence's logits are PP 1's; TP within a stage and micro-batches of
// other GEMM shapes change only fp32 summation order (a few 1e-3 at most). 1e-2 catches a wrong stage or hand-off.
const PP_TOLERANCE = 1e-2;

/** Rank (stage, r) holds its slice of each tensor of its stage, bit for bit PP 1's; nothing else. */
async function expectStageWeights(
  config: ModelConfig,
  one: CudaModelRunner,
  many: CudaModelRunner,
  tp: number,
  pp: number,
): Promise<void> {
  for (const t of weightManifest(config)) {
    const whole = await one.readWeightBf16(t.name);
    const stages = tensorStages(config, pp, t);
    for (let stage = 0; stage < pp; stage++)
      for (let r = 0; r < tp; r++) {
        const rank = stage * tp + r;
        if (!stages.includes(stage)) {
          await expect(many.readWeightBf16(t.name, rank), `${t.name} on stage ${stage}`).rejects.toThrow(
            /not part of this model/,
          );
          continue;
        }
        expect(Array.from(await many.readWeightBf16(t.name, rank)), `${t.name}, stage ${stage} rank ${r}`).toEqual(
          rankSliceBits(config, tp, r, t, whole),
        );
      }
  }
}

/** The runner's pools: one per (stage, rank), stage-major, each its stage's layers and its kv heads. */
function expectStagePools(config: ModelConfig, many: CudaModelRunner, tp: number, pp: number, numBlocks: number) {
  const layers = stageLayers(config.numLayers, pp);
  expect(many.kvRankPoolSpecs).toHaveLength(tp * pp);
  expect(many.kvDeviceBuffers).toHaveLength(tp * pp);
  expect(many.kvPoolSpec).toEqual(many.kvRankPoolSpecs[0]);
  many.kvRankPoolSpecs.forEach((spec, i) => {
    const stage = Math.floor(i / tp);
    expect(spec).toMatchObject({
      layers: layers[stage]!.count,
      numBlocks,
      dtype: 'bf16',
      ...(pp > 1 ? { layerStart: layers[stage]!.start, modelLayers: config.numLayers } : {}),
      ...(tp > 1 ? { tpSize: tp, tpRank: i % tp } : {}),
    });
  });
}

const LAYOUTS = [
  { tp: 1, pp: 2 },
  { tp: 2, pp: 2 },
] as const;

describe.skipIf(!gate.run)('GPU engine, pipeline stages on one device', () => {
  describe.each(['hf-tiny-llama', 'hf-tiny-qwen2'])('%s', (name) => {
    const { dir, expected } = hfFixture(name);
    const config = loadModelConfig(dir);

    it.each(LAYOUTS)(
      'TP $tp x PP $pp reads each stage from the checkpoint; logits match PP 1, 32 greedy tokens identical (and transformers)',
      async ({ tp, pp }) => {
        const one = await CudaModelRunner.create({ config, numBlocks: 16, weights: dir });
        const many = await CudaModelRunner.create({ config, numBlocks: 16, weights: dir, parallel: { tp, pp } });
        try {
          expect(many.pipelineParallelSize).toBe(pp);
          expect(many.tensorParallelSize).toBe(tp);
          expect(many.cudaGraphs.active).toBe(false);
          expect(many.cudaGraphs.reason).toMatch(/pipeline stages/);
          expectStagePools(config, many, tp, pp, 16);
          await expectStageWeights(config, one, many, tp, pp);
          const a = await greedy(one, expected.promptIds, 32);
          const b = await greedy(many, expected.promptIds, 32);
          const rel = relativeError(b.logits, a.logits);
          console.log(
            `[figure] ${name}: TP ${tp} x PP ${pp} vs PP 1 prefill logits relative error ${rel.toExponential(2)}` +
              `${rel === 0 ? ' (bit-identical)' : ''}; vs transformers ${relativeError(b.logits, expected.lastLogits).toExponential(2)}`,
          );
          expect(rel).toBeLessThan(PP_TOLERANCE);
          expect(relativeError(b.logits, expected.lastLogits)).toBeLessThan(BF16_TOLERANCE);
          expect(b.tokens).toEqual(a.tokens);
          expect(b.tokens).toEqual(expected.greedy);
        } finally {
          await Promise.all([one.dispose(), many.dispose()]);
        }
      },
      120_000,
    );
  });

  // Dummy shapes with more layers than the fixtures: PP 4, stages of uneven layers (5 layers: 2 + 1 + 1 + 1 at
  // PP 4, 3 + 2 at PP 2), the flash kernels (head dim 64) and tied embeddings (lm_head on the last stage is the
  // embedding, which the first stage holds too).
  const four: ModelConfig = { ...dummyConfig('tiny'), numLayers: 4 };
  const five: ModelConfig = { ...dummyConfig('tiny'), numLayers: 5, tieWordEmbeddings: true };
  const head64: ModelConfig = { ...dummyConfig('tiny'), numLayers: 4, headDim: 64, numHeads: 8, numKvHeads: 2 };
  const SHAPES: [string, ModelConfig, number, number][] = [
    ['dummy:tiny, 4 layers', four, 1, 2],
    ['dummy:tiny, 4 layers', four, 1, 4],
    ['dummy:tiny, 4 layers', four, 2, 2],
    ['dummy:tiny, 5 layers, tied', five, 1, 2],
    ['dummy:tiny, 5 layers, tied', five, 1, 4],
    ['head dim 64, 8 heads, 2 kv heads', head64, 1, 4],
    ['head dim 64, 8 heads, 2 kv heads', head64, 2, 2],
  ];
  it.each(SHAPES.map(([label, config, tp, pp]) => ({ label, config, tp, pp })))(
    '$label at TP $tp x PP $pp: dummy weights per stage, batches of prefill chunks and decodes (micro-batches) agree step by step',
    async ({ label, config, tp, pp }) => {
      const numBlocks = 96;
      const one = await CudaModelRunner.create({ config, numBlocks, weights: 'dummy:tiny' });
      const many = await CudaModelRunner.create({ config, numBlocks, weights: 'dummy:tiny', parallel: { tp, pp } });
      try {
        expectStagePools(config, many, tp, pp, numBlocks);
        await expectStageWeights(config, one, many, tp, pp);
        // Four sequences: prompts in chunks (two prefill micro-batches at PP 2), then decode steps of all four (one
        // micro-batch per stage at PP 4), then a step mixing a prefill chunk with decodes.
        const mb = 6;
        const tables = [
          [9, 3, 17, 5, 40, 41],
          [22, 2, 30, 31, 50, 51],
          [60, 61, 62, 63, 64, 65],
          [70, 71, 72, 73, 74, 75],
        ];
        const ids = [syntheticPrompt(90, 1), syntheticPrompt(40, 7), syntheticPrompt(30, 11), syntheticPrompt(60, 13)];
        const lens = [70, 20, 17, 33];
        const steps: SeqPart[][] = [
          [{ ids: ids[0]!.slice(0, 40), start: 0, table: tables[0]! }],
          [
            { ids: ids[0]!.slice(40, 70), start: 40, table: tables[0]! },
            { ids: ids[1]!.slice(0, 20), start: 0, table: tables[1]! },
            { ids: ids[2]!.slice(0, 17), start: 0, table: tables[2]! },
            { ids: ids[3]!.slice(0, 33), start: 0, table: tables[3]! },
          ],
        ];
        for (let i = 0; i < 5; i++)
          steps.push(ids.map((s, q) => ({ ids: [s[lens[q]! + i]!], start: lens[q]! + i, table: tables[q]! })));
        steps.push([
          { ids: [ids[0]![75]!], start: 75, table: tables[0]! },
          { ids: ids[1]!.slice(25, 35), start: 25, table: tables[1]! },
          { ids: [ids[2]![22]!], start: 22, table: tables[2]! },
        ]);
        let worst = 0;
        const V = config.vocabSize;
        for (const seqs of steps) {
          const batch = batchOf(seqs, mb);
          const x = await one.forward(batch);
          const y = await many.forward(batch);
          expect(y.length).toBe(x.length);
          const rows = expectRowsAgree(
            x,
            y,
            V,
            seqs.length,
            PP_TOLERANCE,
            (s) => `step at ${seqs[s]!.start}, sequence ${s}`,
          );
          worst = Math.max(worst, rows.worst);
        }
        // Sampling on the last stage, per micro-batch, merged: the greedy candidates are PP 1's, the whole rows asked
        // for come back in order.
        // Each sequence's next position after the steps above.
        const next = [76, 35, 23, 38];
        const last = batchOf(
          ids.map((s, q) => ({ ids: [s[next[q]!]!], start: next[q]!, table: tables[q]! })),
          mb,
        );
        const plan = {
          n: Int32Array.of(2, 3, 0, 2),
          flags: Int32Array.of(0, 16, 0, 1),
          invT: Float64Array.of(0, 0, 0, 1),
          topP: Float64Array.of(1, 1, 1, 1),
          u: Float64Array.of(0, 0, 0, 0),
        };
        const [sx, sy] = [await one.forwardSampled(last, plan), await many.forwardSampled(last, plan)];
        expect(sy.maxN).toBe(sx.maxN);
        expect(Array.from(sy.fullRows)).toEqual(Array.from(sx.fullRows));
        expect(relativeError(sy.full, sx.full)).toBeLessThan(PP_TOLERANCE);
        for (const s of [0, 1, 3]) {
          const n = plan.n[s]!;
          const at = s * sx.maxN;
          expect(relativeError(sy.topLogits.subarray(at, at + n), sx.topLogits.subarray(at, at + n))).toBeLessThan(
            PP_TOLERANCE,
          );
          if (sx.topLogits[at]! - sx.topLogits[at + 1]! > CLEAR_MARGIN) expect(sy.topIds[at]).toBe(sx.topIds[at]);
        }
        // Hand-off time: the first take starts the GPU collective timing; every later stage waited for its
        // predecessor in the passes above (host time), the first never does.
        const times = await many.takeCollectiveTime();
        expect(times).toHaveLength(tp * pp);
        times.forEach((t, i) =>
          Math.floor(i / tp) === 0 ? expect(t.handoverMs).toBe(0) : expect(t.handoverMs).toBeGreaterThan(0),
        );
        console.log(
          `[figure] ${label} TP ${tp} x PP ${pp} vs PP 1 (${many.attentionKernels}): worst relative logit error ${worst.toExponential(2)}`,
        );
      } finally {
        await Promise.all([one.dispose(), many.dispose()]);
      }
    },
    120_000,
  );

  it('host tensors (setWeight) go to the stages holding them, sliced per rank', async () => {
    const config = { ...dummyConfig('tiny'), numLayers: 4 };
    const { dummyWeights } = await import('../../lib/engine/model/dummy.js');
    const weights = () => dummyWeights(config, 7);
    const one = await CudaModelRunner.create({ config, numBlocks: 8, weights });
    const many = await CudaModelRunner.create({ config, numBlocks: 8, weights, parallel: { tp: 2, pp: 2 } });
    try {
      await expectStageWeights(config, one, many, 2, 2);
    } finally {
      await Promise.all([one.dispose(), many.dispose()]);
    }
  });

  it('bad layouts are typed errors before any GPU memory is taken; the GPU stays usable', async () => {
    const config = dummyConfig('tiny'); // 2 layers
    for (const parallel of [
      { tp: 1, pp: 3 },
      { tp: 1, pp: 0 },
      { tp: 8, pp: 4 },
    ])
      await expect(
        CudaModelRunner.create({ config: { ...config, numHeads: 8 }, numBlocks: 4, weights: 'dummy:tiny', parallel }),
      ).rejects.toBeInstanceOf(ParallelLayoutError);
    await expect(
      CudaModelRunner.create({
        config: dummyConfig('tiny-moe'),
        numBlocks: 4,
        weights: 'dummy:tiny-moe',
        parallel: { tp: 1, pp: 2 },
      }),
    ).rejects.toThrow(/mixture-of-experts models in one pipeline stage/);
    const ok = await CudaModelRunner.create({
      config,
      numBlocks: 4,
      weights: 'dummy:tiny',
      parallel: { tp: 1, pp: 2 },
    });
    await ok.dispose();
  });

  it('a malformed step is refused before any stage runs (the pipeline keeps working); dispose mid-pass does not hang', async () => {
    const config = { ...dummyConfig('tiny'), numLayers: 4 };
    const many = await CudaModelRunner.create({
      config,
      numBlocks: 16,
      weights: 'dummy:tiny',
      parallel: { tp: 1, pp: 2 },
    });
    const one = await CudaModelRunner.create({ config, numBlocks: 16, weights: 'dummy:tiny' });
    try {
      // The second sequence's block is out of range: its micro-batch would be the second, after the first one had
      // written its KV on every stage; the whole step is checked first, so nothing is written.
      const good = { ids: [1, 2, 3], start: 0, table: [0] };
      const bad = batchOf([good, { ids: [4, 5], start: 0, table: [99] }], 1);
      await expect(many.forward(bad)).rejects.toThrow(TandemError);
      // Block 0 written by two sequences in one step (in different micro-batches): refused too.
      await expect(many.forward(batchOf([good, { ids: [4], start: 0, table: [0] }], 1))).rejects.toThrow(
        /block 0 receives new tokens this step but appears 2 times/,
      );
      const x = await one.forward(batchOf([good], 1));
      const y = await many.forward(batchOf([good], 1));
      expect(relativeError(y, x)).toBeLessThan(PP_TOLERANCE);
      const long = batchOf(
        [
          { ids: Array.from({ length: 120 }, (_, i) => i % 256), start: 0, table: [...Array(8).keys()] },
          { ids: Array.from({ length: 80 }, (_, i) => (i * 3) % 256), start: 0, table: [8, 9, 10, 11, 12, -1, -1, -1] },
        ],
        8,
      );
      await expectDisposeMidPassSettles(many, long, batchOf([good], 1));
    } finally {
      await Promise.all([one.dispose(), many.dispose()]);
    }
  });
});

describe.skipIf(!gate.run)('openModel: pipeline stages on one GPU', () => {
  describe.each(['hf-tiny-llama', 'hf-tiny-qwen2'])('%s', (name) => {
    const { dir, expected } = hfFixture(name);

    it.each(LAYOUTS)(
      'TP $tp x PP $pp through the engine gives PP 1 greedy tokens (and transformers), batched and from the prefix cache',
      async ({ tp, pp }) => {
        const lines: string[] = [];
        await using one = await openModel({ model: dir, device: 'cuda', numBlocks: 64 });
        await using many = await openModel({
          model: dir,
          device: 'cuda',
          numBlocks: 64,
          tensorParallelSize: tp,
          pipelineParallelSize: pp,
          log: (l) => lines.push(l),
        });
        expect(many.device).toBe('cuda');
        expect(many.parallel).toEqual({ tp, pp, ep: 1 });
        expect(lines.at(-1)).toMatch(
          new RegExp(`^model .* open on cuda as tp ${tp} x pp ${pp} \\(${tp * pp} ranks; stage layers 0, 1\\)`),
        );
        expect(many.kvRankPoolSpecs).toHaveLength(tp * pp);
        const greedySampling = { temperature: 0, maxTokens: 32 };
        const first = await many.engine
          .addRequest({ promptTokenIds: expected.promptIds, sampling: greedySampling })
          .result();
        expect(first.tokenIds).toEqual(expected.greedy);
        const prompts = [
          expected.promptIds,
          many.tokenizer.encode('The KV cache moves from prefill to decode, block by block, layer by layer'),
          many.tokenizer.encode('Hello, world! The quick brown fox'),
          many.tokenizer.encode('Pipeline stages hand the hidden state on, one micro-batch at a time'),
        ];
        await expectSameGreedyUpToNearTie(many, one, prompts);
      },
      120_000,
    );
  });
});

const FIXTURE = join(import.meta.dirname, '..', 'fixtures', 'hf-tiny-llama');

describe.skipIf(!gate.run)('pools of different PP / TP on one GPU: disaggregated == aggregated', () => {
  const layouts = [
    [
      { tp: 1, pp: 2 },
      { tp: 1, pp: 1 },
    ],
    [
      { tp: 1, pp: 1 },
      { tp: 1, pp: 2 },
    ],
    [
      { tp: 2, pp: 2 },
      { tp: 2, pp: 1 },
    ],
  ] as const;
  const keyOf = (p: { tp: number; pp: number }, d: { tp: number; pp: number }) =>
    `tp ${p.tp} x pp ${p.pp} -> tp ${d.tp} x pp ${d.pp}`;
  const deployments = layoutDeployments(
    () => aggregatedGraph(FIXTURE, { tp: 1, pp: 1 }),
    layouts.map(([p, d]) => [keyOf(p, d), () => disaggregatedGraph(FIXTURE, p, d)]),
  );

  it.each(layouts)(
    'prefill %o -> decode %o: every prompt prefilled remotely, greedy text equals TP 1 aggregated serving',
    async (p, d) => {
      await expectServesLikeAggregated(deployments, keyOf(p, d), FIXTURE, { prefill: p, decode: d });
    },
    120_000,
  );
});
