/**
 * Tensor and pipeline parallelism in the CPU runner (issue 25): tp x pp ranks on native threads with host
 * collectives give the logits of one rank (within fp32 rounding) and write the same KV pool, on dummy:tiny and
 * both Hugging Face fixtures, through prefill, decode steps with paged KV, batches split into micro-batches and a
 * prefix-cache hit; bad layouts are refused with ParallelLayoutError; dispose reaches every rank; an exception in
 * one rank fails that forward cleanly and leaves the runner usable.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { CpuModelRunner, loadWeights, nativeModelFields, type NamedTensor } from '../../lib/engine/cpu.js';
import { dummyConfig, loadModelConfig, type ModelConfig } from '../../lib/engine/model/index.js';
import type { ParallelConfig } from '../../lib/engine/parallel.js';
import { loadBinding, type RawCpuLlama } from '../../lib/native/binding.js';
import { packageRoot } from '../../lib/native/paths.js';
import { DisposedError, ParallelLayoutError, TandemError } from '../../lib/errors.js';
import { forwardBatch, logitsRow, relativeError, type SequenceStep } from '../helpers/forward-batch.js';

const TOLERANCE = 1e-4;
const BLOCK_SIZE = 4;
const NUM_BLOCKS = 32;
const FIXTURES = join(import.meta.dirname, '..', 'fixtures');

interface Model {
  config: ModelConfig;
  weights: NamedTensor[];
}

function model(name: string): Model {
  if (name.startsWith('dummy:')) {
    const config = dummyConfig(name);
    return { config, weights: [...loadWeights(name, { config, seed: 3 })] };
  }
  const dir = join(FIXTURES, name);
  const config = loadModelConfig(dir);
  return { config, weights: [...loadWeights(dir, { config })] };
}

const LAYOUTS: { tp: number; pp: number }[] = [
  { tp: 2, pp: 1 },
  { tp: 4, pp: 1 }, // 2 kv heads: each replicated on two ranks
  { tp: 1, pp: 2 },
  { tp: 2, pp: 2 },
];

const runnerFor = (m: Model, parallel: Partial<ParallelConfig>, threads = 2) =>
  CpuModelRunner.create({
    config: m.config,
    numBlocks: NUM_BLOCKS,
    blockSize: BLOCK_SIZE,
    weights: m.weights,
    parallel,
    threads,
  });

const tokensOf = (n: number, salt: number, vocab: number) =>
  Array.from({ length: n }, (_, i) => (i * 37 + salt * 11 + 5) % vocab);
const argmax = (row: Float32Array) => row.reduce((best, v, i) => (v > row[best]! ? i : best), 0);

/**
 * A schedule of steps: a batch prefill of three sequences (micro-batches under pp), decode steps that feed back
 * the greedy token of each, then a fourth sequence that shares sequence 0's first block (a prefix-cache hit) and
 * prefills only the rest of its prompt, batched with a decode step.
 */
async function runSchedule(runner: CpuModelRunner, vocab: number) {
  const prompts = [tokensOf(9, 1, vocab), tokensOf(5, 2, vocab), tokensOf(3, 3, vocab)];
  const blocks = [
    [0, 1, 2, 3, 4],
    [7, 6, 5, 8],
    [10, 9, 11, 12],
  ];
  const lengths = prompts.map((p) => p.length);
  const logits: Float32Array[] = [];
  const tokens: number[][] = [[], [], []];
  const step = async (steps: SequenceStep[]) => {
    const out = await runner.forward(forwardBatch(steps, 6));
    logits.push(out);
    return out;
  };
  let out = await step(prompts.map((p, i) => ({ blocks: blocks[i]!, start: 0, tokens: p })));
  for (let d = 0; d < 4; d++) {
    const next = [0, 1, 2].map((i) => argmax(logitsRow(out, vocab, i)));
    next.forEach((t, i) => tokens[i]!.push(t));
    out = await step(next.map((t, i) => ({ blocks: blocks[i]!, start: lengths[i]!++, tokens: [t] })));
  }
  // Sequence 3: the same first BLOCK_SIZE tokens as sequence 0, so its first block is sequence 0's block 0.
  const shared = [...prompts[0]!.slice(0, BLOCK_SIZE), ...tokensOf(4, 4, vocab)];
  out = await step([
    { blocks: [blocks[0]![0]!, 13, 14], start: BLOCK_SIZE, tokens: shared.slice(BLOCK_SIZE) },
    { blocks: blocks[1]!, start: lengths[1]!++, tokens: [argmax(logitsRow(out, vocab, 1))] },
  ]);
  return { logits, tokens };
}

describe.each(['dummy:tiny', 'hf-tiny-llama', 'hf-tiny-qwen2'])('CPU tensor / pipeline parallel on %s', (name) => {
  let m: Model;
  let reference: Awaited<ReturnType<typeof runSchedule>>;
  let referenceKv: Float32Array;

  beforeAll(async () => {
    m = model(name);
    const single = await runnerFor(m, { tp: 1, pp: 1 });
    try {
      reference = await runSchedule(single, m.config.vocabSize);
      referenceKv = new Float32Array(single.kvBuffer.slice().buffer);
    } finally {
      await single.dispose();
    }
  });

  for (const parallel of LAYOUTS)
    it(`tp ${parallel.tp} x pp ${parallel.pp}: logits, greedy tokens and the KV pool equal one rank's`, async () => {
      const runner = await runnerFor(m, parallel, parallel.tp * parallel.pp);
      try {
        expect(runner.parallel).toEqual({ ...parallel, ep: 1 });
        // One compute thread per rank here (threads = tp x pp, split evenly between the ranks).
        expect(runner.threads).toBe(parallel.tp * parallel.pp);
        expect(runner.layout).toMatch(new RegExp(`^tp ${parallel.tp} x pp ${parallel.pp} \\(`));
        const got = await runSchedule(runner, m.config.vocabSize);
        expect(got.logits.length).toBe(reference.logits.length);
        got.logits.forEach((l, i) =>
          expect(relativeError(l, reference.logits[i]!), `step ${i}`).toBeLessThan(TOLERANCE),
        );
        expect(got.tokens).toEqual(reference.tokens);
        // Every rank wrote its kv heads (and replicated heads were written) at lib/kv's offsets.
        const kv = new Float32Array(runner.kvBuffer.slice().buffer);
        expect(relativeError(kv, referenceKv)).toBeLessThan(TOLERANCE);
      } finally {
        await runner.dispose();
      }
    });
});

/**
 * Mixture-of-experts models (issue 28) on CPU ranks: tensor parallelism splits every expert's channels (router
 * replicated), expert parallelism places whole experts on the ranks of a stage (attention replicated with tp 1,
 * split with tp = ep), pipeline stages split the layers; each equals one rank: logits within fp32 rounding, the
 * same greedy tokens, the same KV pool, and the same expert loads counted once for the whole model.
 */
const MOE_MODELS = ['dummy:tiny-moe', 'dummy:tiny-mixtral', 'dummy:tiny-qwen2-moe'];
describe.each(MOE_MODELS)('CPU MoE tensor / pipeline / expert parallel on %s', (name) => {
  const MOE_LAYOUTS: Partial<ParallelConfig>[] = [
    { tp: 2 },
    { tp: 4 }, // kv heads replicated too
    { pp: 2 },
    { tp: 2, pp: 2 },
    { ep: 2 },
    { ep: 4 },
    { ep: 8 }, // one expert per rank
    { ep: 2, tp: 2 },
    { ep: 4, tp: 4 },
    { ep: 2, pp: 2 },
  ];
  let m: Model;
  let reference: Awaited<ReturnType<typeof runSchedule>>;
  let referenceKv: Float32Array;
  let referenceLoad: Float64Array;

  beforeAll(async () => {
    m = model(name);
    const single = await runnerFor(m, {});
    try {
      reference = await runSchedule(single, m.config.vocabSize);
      referenceKv = new Float32Array(single.kvBuffer.slice().buffer);
      referenceLoad = single.takeExpertLoad();
    } finally {
      await single.dispose();
    }
  });

  for (const parallel of MOE_LAYOUTS) {
    const full = { tp: 1, pp: 1, ep: 1, ...parallel };
    const ranks = Math.max(full.tp, full.ep) * full.pp;
    it(`tp ${full.tp} x ep ${full.ep} x pp ${full.pp}: logits, greedy tokens, KV pool and expert loads equal one rank's`, async () => {
      const runner = await runnerFor(m, parallel, ranks);
      try {
        expect(runner.parallel).toEqual(full);
        expect(runner.threads).toBe(ranks);
        const got = await runSchedule(runner, m.config.vocabSize);
        expect(got.logits.length).toBe(reference.logits.length);
        got.logits.forEach((l, i) =>
          expect(relativeError(l, reference.logits[i]!), `step ${i}`).toBeLessThan(TOLERANCE),
        );
        expect(got.tokens).toEqual(reference.tokens);
        const kv = new Float32Array(runner.kvBuffer.slice().buffer);
        expect(relativeError(kv, referenceKv)).toBeLessThan(TOLERANCE);
        // Every rank routes every token; the loads are counted once (numLayers x numExperts, each token topK times).
        const load = runner.takeExpertLoad();
        expect(Array.from(load)).toEqual(Array.from(referenceLoad));
        expect(runner.takeExpertLoad().every((n) => n === 0)).toBe(true);
      } finally {
        await runner.dispose();
      }
    });
  }

  it('a rank that holds only its experts: EP ranks take no other expert, and name a missing one by rank', async () => {
    const partial = m.weights.filter((t) => !/\.experts\.5\.(w2|down_proj)\.weight$/.test(t.name));
    const error = await runnerFor({ ...m, weights: partial }, { ep: 4 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(TandemError);
    // Expert 5 of 8 lives on rank 2 of 4 (experts 4, 5).
    expect((error as Error).message).toMatch(/experts\.5\.(w2|down_proj)\.weight \(rank 2\)/);
  });
});

describe('CPU parallel layouts and failures', () => {
  const tiny = model('dummy:tiny');

  it('refuses tp 3 on 4 heads and more stages than layers with ParallelLayoutError, before loading', async () => {
    let loaded = 0;
    const weights = function* () {
      for (const t of tiny.weights) {
        loaded++;
        yield t;
      }
    };
    await expect(runnerFor({ ...tiny, weights: [...weights()] }, { tp: 3, pp: 1 })).rejects.toThrow(
      ParallelLayoutError,
    );
    loaded = 0;
    await expect(
      CpuModelRunner.create({ config: tiny.config, numBlocks: 4, weights, parallel: { pp: 3 } }),
    ).rejects.toThrow(/pipeline parallel size 3 is more stages than the model's 2 layers/);
    expect(loaded).toBe(0);
    await expect(
      CpuModelRunner.create({ config: tiny.config, numBlocks: 4, weights, parallel: { tp: 8 } }),
    ).rejects.toThrow(/tensor parallel size 8 does not divide the model's 4 attention heads/);
    await expect(
      CpuModelRunner.create({ config: tiny.config, numBlocks: 4, weights, parallel: { ep: 2 } }),
    ).rejects.toThrow(/expert parallel size 2 needs a mixture-of-experts model/);
    expect(loaded).toBe(0);
  });

  it('refuses an expert-parallel size that does not fit an MoE model with ParallelLayoutError, before loading', async () => {
    const moe = dummyConfig('tiny-moe'); // 8 experts
    let loaded = 0;
    const weights = function* () {
      for (const t of loadWeights('dummy:tiny-moe', { config: moe })) {
        loaded++;
        yield t;
      }
    };
    for (const [parallel, message] of [
      [{ ep: 3 }, /expert parallel size 3 does not divide the model's 8 experts/],
      [{ ep: 4, tp: 2 }, /expert parallel size 4 with tensor parallel size 2: .* tp must be 1 .* or 4/],
      [{ ep: 0 }, /expert parallel size must be a positive integer \(got 0\)/],
      [{ tp: 64 }, /tensor parallel size 64 does not divide the model's 4 attention heads/],
    ] as const) {
      const error = await CpuModelRunner.create({ config: moe, numBlocks: 4, weights, parallel }).catch(
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(ParallelLayoutError);
      expect((error as ParallelLayoutError).code).toBe('TANDEM_BAD_PARALLEL_LAYOUT');
      expect((error as Error).message).toMatch(message);
    }
    expect(loaded).toBe(0);
  });

  it('the native layer guards an expert-parallel layout itself (BadInput naming the size)', () => {
    const { binding } = loadBinding();
    const make = (config: ModelConfig, sizes: object) =>
      new binding.CpuLlama({
        ...nativeModelFields(config),
        numBlocks: 1,
        blockSize: 1,
        layout: 'block-major',
        kvBuffer: new Uint8Array(config.numLayers * 2 * config.numKvHeads * config.headDim * 4),
        ...sizes,
      });
    const moe = dummyConfig('tiny-moe');
    expect(() => make(moe, { expertParallelSize: 3 })).toThrow(
      /expert parallel size 3 does not divide the model's 8 experts/,
    );
    expect(() => make(moe, { expertParallelSize: 4, tensorParallelSize: 2 })).toThrow(
      /the expert-parallel ranks are the tensor-parallel ranks/,
    );
    expect(() => make(tiny.config, { expertParallelSize: 2 })).toThrow(/needs a mixture-of-experts model/);
    const ok = make(moe, { expertParallelSize: 4 });
    expect(ok.ranks).toBe(4);
    void ok.dispose();
  });

  it('names the rank of a weight that was not set', async () => {
    const partial = tiny.weights.filter((t) => t.name !== 'model.layers.1.mlp.down_proj.weight');
    const error = await runnerFor({ ...tiny, weights: partial }, { tp: 2, pp: 2 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(TandemError);
    expect((error as Error).message).toMatch(/model\.layers\.1\.mlp\.down_proj\.weight \(rank 2\)/);
  });

  it('an exception in one rank fails that forward (no hang) and the runner stays usable', async () => {
    const single = await runnerFor(tiny, { tp: 1, pp: 1 });
    const runner = await runnerFor(tiny, { tp: 2, pp: 2 }, 4);
    try {
      const batch = () =>
        forwardBatch([
          { blocks: [0, 1], start: 0, tokens: tokensOf(6, 1, 256) },
          { blocks: [2, 3], start: 0, tokens: tokensOf(7, 2, 256) },
        ]);
      const expected = await single.forward(batch());
      for (const [rank, layer] of [
        [3, 1], // last stage, tensor-parallel rank 1: its peer waits at an all-reduce
        [0, 0], // first stage: the next stage waits for activations
        [1, 0],
      ] as const) {
        (runner as unknown as { raw: RawCpuLlama }).raw.failRankForTest(rank, layer);
        await expect(runner.forward(batch())).rejects.toThrow(
          new RegExp(`injected fault in rank ${rank} before layer ${layer}`),
        );
        expect(relativeError(await runner.forward(batch()), expected)).toBeLessThan(TOLERANCE);
      }
    } finally {
      await runner.dispose();
      await single.dispose();
    }
  });

  it('dispose during tensor-parallel forwards reaches every rank: each pass settles, nothing hangs', async () => {
    const config: ModelConfig = { ...tiny.config, numLayers: 6, hiddenSize: 128, intermediateSize: 512, headDim: 32 };
    const weights = [...loadWeights('dummy:tiny', { config })];
    const runner = await CpuModelRunner.create({
      config,
      numBlocks: 64,
      blockSize: 16,
      weights,
      parallel: { tp: 2, pp: 2 },
      threads: 4,
    });
    const pending = Array.from({ length: 6 }, (_, i) =>
      runner.forward(
        forwardBatch([
          { blocks: [0, 1, 2, 3], start: 0, tokens: tokensOf(60, i, 256) },
          { blocks: [4, 5, 6, 7], start: 0, tokens: tokensOf(60, i + 1, 256) },
        ]),
      ),
    );
    await runner.dispose();
    const settled = await Promise.allSettled(pending);
    for (const s of settled)
      if (s.status === 'rejected') expect(s.reason).toBeInstanceOf(DisposedError);
      else expect(s.value.length).toBe(2 * config.vocabSize);
    expect(settled.some((s) => s.status === 'rejected')).toBe(true);
  });
});

describe('CPU rank threads at exit', () => {
  it('a process that never disposes a tp 2 x pp 2 runner exits by itself (cleanup joins every rank)', () => {
    const source = `
      import { CpuModelRunner } from './lib/engine/cpu.ts';
      import { dummyConfig } from './lib/engine/model/index.ts';
      const runner = await CpuModelRunner.create({
        config: dummyConfig('tiny'), numBlocks: 4, weights: 'dummy:tiny', threads: 8, parallel: { tp: 2, pp: 2 },
      });
      const logits = await runner.forward({
        tokens: Int32Array.of(256, 1, 2, 3), positions: Int32Array.of(0, 1, 0, 1), seqStarts: Int32Array.of(0, 2, 4),
        blockTables: Int32Array.of(1, 2), maxBlocksPerSeq: 1, contextLens: Int32Array.of(2, 2),
      });
      console.log('logits', logits.length, runner.threads);
    `;
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', source], {
      cwd: packageRoot,
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('logits 516 8');
  });
});
