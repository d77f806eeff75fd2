/**
 * The GPU engine's pipeline schedule, the parts that need no GPU (lib/engine/cuda-pipeline.ts): a step's batch split
 * into micro-batches of whole sequences and their sampled rows merged back, checked against the batch itself; the
 * stage pools' specs; the schedule itself over fake ranks (native calls recorded, each taking a few milliseconds):
 * every micro-batch through the stages in order, stages overlapping, a failure stopping its micro-batch's later
 * stages and failing the step once. The stages on a GPU: test/gpu/15.engine.pp.gpu.test.ts.
 */
import { describe, expect, it } from 'vitest';
import {
  CudaPipeline,
  mergeSampled,
  splitMicroBatches,
  stagePoolSpec,
  type PipelineRank,
} from '../../lib/engine/cuda-pipeline.js';
import { join } from 'node:path';
import { loadCheckpoint, loadRankWeights } from '../../lib/engine/cuda.js';
import { loadModelConfig } from '../../lib/engine/model/config.js';
import { tensorElements, weightManifest } from '../../lib/engine/model/manifest.js';
import { tensorStages } from '../../lib/engine/parallel.js';
import type { RawCudaLlama } from '../../lib/native/binding.js';
import { BadArgumentError } from '../../lib/errors.js';
import type { ForwardBatch, SampledLogits } from '../../lib/engine/runner.js';
import { kvPool } from '../../lib/kv/index.js';

/** A batch of sequences of `lengths` new tokens each (distinct values everywhere), mb blocks per sequence. */
function batchOf(lengths: number[], mb = 3): ForwardBatch {
  const tokens: number[] = [];
  const positions: number[] = [];
  const seqStarts = [0];
  const tables: number[] = [];
  const ctx: number[] = [];
  lengths.forEach((n, s) => {
    for (let i = 0; i < n; i++) {
      tokens.push(100 * s + i);
      positions.push(10 + i);
    }
    seqStarts.push(tokens.length);
    for (let b = 0; b < mb; b++) tables.push(mb * s + b);
    ctx.push(10 + n);
  });
  return {
    tokens: Int32Array.from(tokens),
    positions: Int32Array.from(positions),
    seqStarts: Int32Array.from(seqStarts),
    blockTables: Int32Array.from(tables),
    maxBlocksPerSeq: mb,
    contextLens: Int32Array.from(ctx),
  };
}

/** Sequence s of a batch: its tokens, positions, block table row and context length. */
function sequence(b: ForwardBatch, s: number) {
  const [t0, t1] = [b.seqStarts[s]!, b.seqStarts[s + 1]!];
  const mb = b.maxBlocksPerSeq;
  return {
    tokens: Array.from(b.tokens.subarray(t0, t1)),
    positions: Array.from(b.positions.subarray(t0, t1)),
    table: Array.from(b.blockTables.subarray(s * mb, (s + 1) * mb)),
    ctx: b.contextLens[s],
  };
}

describe('splitMicroBatches', () => {
  it.each([
    [[1, 1, 1, 1, 1, 1, 1], 2, [4, 3]],
    [[1, 1, 1, 1, 1, 1, 1], 4, [2, 2, 2, 1]],
    [[5, 1, 3], 4, [1, 1, 1]],
    [[7], 2, [1]],
    [[2, 3, 4, 1], 1, [4]],
  ])('sequences %j over %i stages: parts of %j sequences, each sequence whole and in order', (lengths, pp, counts) => {
    const batch = batchOf(lengths);
    const parts = splitMicroBatches(batch, pp);
    expect(parts.map((p) => p.batch.seqStarts.length - 1)).toEqual(counts);
    let next = 0;
    for (const { seqStart, batch: part } of parts) {
      expect(seqStart).toBe(next);
      expect(part.seqStarts[0]).toBe(0);
      expect(part.seqStarts.at(-1)).toBe(part.tokens.length);
      expect(part.maxBlocksPerSeq).toBe(batch.maxBlocksPerSeq);
      for (let s = 0; s < part.seqStarts.length - 1; s++) expect(sequence(part, s)).toEqual(sequence(batch, next + s));
      next += part.seqStarts.length - 1;
    }
    expect(next).toBe(lengths.length);
  });

  it('a batch of no sequences has no micro-batches', () => {
    expect(splitMicroBatches(batchOf([]), 2)).toEqual([]);
  });
});

describe('mergeSampled', () => {
  /** A part's sampled rows: row r's best ids are 10 * (seqStart + r) + k, logits 50 - k; maxN wide. */
  function rowsOf(seqStart: number, n: number, maxN: number, full: number[]): SampledLogits {
    const V = 4;
    const topIds = new Int32Array(n * maxN);
    const topLogits = new Float32Array(n * maxN);
    for (let r = 0; r < n; r++)
      for (let k = 0; k < maxN; k++) {
        topIds[r * maxN + k] = 10 * (seqStart + r) + k;
        topLogits[r * maxN + k] = 50 - k;
      }
    return {
      vocabSize: V,
      maxN,
      ints: Int32Array.from({ length: n * 4 }, (_, i) => 1000 * seqStart + i),
      dbl: Float64Array.from({ length: n * 4 }, (_, i) => seqStart + i / 10),
      topIds,
      topLogits,
      fullRows: Int32Array.from(full),
      full: Float32Array.from(full.flatMap((r) => Array.from({ length: V }, (_, v) => 100 * (seqStart + r) + v))),
    };
  }

  it('rows in order, candidates padded to the widest part, whole rows renumbered', () => {
    const merged = mergeSampled(
      [
        { seqStart: 0, rows: rowsOf(0, 2, 1, [1]) },
        { seqStart: 2, rows: rowsOf(2, 1, 3, [0]) },
      ],
      4,
    );
    expect(merged.vocabSize).toBe(4);
    expect(merged.maxN).toBe(3);
    expect(Array.from(merged.topIds)).toEqual([0, -1, -1, 10, -1, -1, 20, 21, 22]);
    expect(Array.from(merged.topLogits)).toEqual([50, -Infinity, -Infinity, 50, -Infinity, -Infinity, 50, 49, 48]);
    expect(Array.from(merged.ints)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 2000, 2001, 2002, 2003]);
    expect(Array.from(merged.dbl.subarray(8))).toEqual([2, 2.1, 2.2, 2.3]);
    expect(Array.from(merged.fullRows)).toEqual([1, 2]);
    expect(Array.from(merged.full)).toEqual([100, 101, 102, 103, 200, 201, 202, 203]);
  });

  it('no parts: no rows', () => {
    const merged = mergeSampled([], 8);
    expect(merged.ints.length).toBe(0);
    expect(merged.vocabSize).toBe(8);
  });
});

describe('stagePoolSpec', () => {
  it("names a stage pool's layers and kv heads; a whole model's pool is the plain spec", () => {
    const base = { kvHeads: 4, headDim: 8, blockSize: 16, numBlocks: 5, dtype: 'bf16', layout: 'block-major' } as const;
    const stage = kvPool({ ...base, layers: 3, layerStart: 3, modelLayers: 6, tpSize: 2, tpRank: 1 });
    expect(stagePoolSpec(stage)).toEqual({
      ...base,
      headLayout: 'NHD',
      layers: 3,
      layerStart: 3,
      modelLayers: 6,
      tpSize: 2,
      tpRank: 1,
    });
    expect(stagePoolSpec(kvPool({ ...base, layers: 6 }))).toEqual({ ...base, headLayout: 'NHD', layers: 6 });
  });
});

describe('CudaPipeline: the schedule over fake ranks', () => {
  const V = 3;
  /** Calls in start order: `stage.rank:kind slot first-token`, and when each started and ended. */
  interface Call {
    what: string;
    stage: number;
    slot: number;
    start: number;
    end: number;
  }

  /** A rank whose passes take `ms` each; `failOn(stage, slot)` makes that pass reject. */
  function fakeRanks(pp: number, tp: number, ms: number, failOn?: (stage: number, slot: number) => boolean) {
    const calls: Call[] = [];
    const pass = async (stage: number, what: string, args: unknown[]) => {
      const slot = args[6] as number;
      const tokens = args[0] as Int32Array;
      const call = { what: `${what} ${slot} ${tokens[0]}`, stage, slot, start: performance.now(), end: 0 };
      calls.push(call);
      await new Promise((r) => setTimeout(r, ms));
      call.end = performance.now();
      if (failOn?.(stage, slot)) throw new BadArgumentError(`stage ${stage} failed on micro-batch ${slot}`);
      return tokens;
    };
    const stages = Array.from({ length: pp }, (_, stage) =>
      Array.from({ length: tp }, (_, r) => {
        const raw = {
          checkForward: (...args: unknown[]) => {
            if ((args[0] as Int32Array).some((t) => t < 0)) throw new BadArgumentError('negative token');
          },
          forwardWithoutLogits: (...args: unknown[]) => pass(stage, `${stage}.${r}:hidden`, args).then(() => {}),
          forward: async (...args: unknown[]) => {
            const tokens = await pass(stage, `${stage}.${r}:logits`, args);
            const seqStarts = args[2] as Int32Array;
            // Row s: the sequence's first token, then 0s.
            const out = new Float32Array((seqStarts.length - 1) * V);
            for (let q = 0; q + 1 < seqStarts.length; q++) out[q * V] = tokens[seqStarts[q]!]!;
            return out;
          },
          takeCollectiveTime: async () => ({ allReduceMs: 0, gatherMs: 0 }),
          dispose: async () => {},
        };
        return { raw, device: {}, kvBuffer: {}, pool: {}, ownsDevice: false } as unknown as PipelineRank;
      }),
    );
    return { pipeline: new CudaPipeline(stages), calls };
  }

  const decode = (n: number): ForwardBatch => ({
    ...batchOf(Array<number>(n).fill(1), 1),
    tokens: Int32Array.from({ length: n }, (_, i) => 10 + i),
  });

  it('PP 2 x TP 2, 5 decode sequences: micro-batches of 3 and 2 through both stages in order, logits in sequence order', async () => {
    const { pipeline, calls } = fakeRanks(2, 2, 15);
    const logits = await pipeline.forward(decode(5), V);
    expect(Array.from({ length: 5 }, (_, s) => logits[s * V])).toEqual([10, 11, 12, 13, 14]);
    const sorted = [...calls].map((c) => c.what).sort();
    expect(sorted).toEqual(
      ['0.0:hidden 0 10', '0.1:hidden 0 10', '0.0:hidden 1 13', '0.1:hidden 1 13'] // stage 0
        .concat(['1.0:logits 0 10', '1.1:hidden 0 10', '1.0:logits 1 13', '1.1:hidden 1 13'])
        .sort(),
    );
    // Stage 1 takes micro-batch m after stage 0 finished it; stage 0 runs micro-batch 1 meanwhile (overlap).
    const at = (what: string) => calls.find((c) => c.what === what)!;
    expect(at('1.0:logits 0 10').start).toBeGreaterThanOrEqual(at('0.0:hidden 0 10').end);
    expect(at('1.0:logits 1 13').start).toBeGreaterThanOrEqual(at('0.1:hidden 1 13').end);
    expect(at('0.0:hidden 1 13').start).toBeLessThan(at('1.0:logits 0 10').end);
    // Stage 1 waited for stage 0's first micro-batch; stage 0 never waits.
    const times = await pipeline.takeCollectiveTime();
    expect(times.map((t) => t.handoverMs > 0)).toEqual([false, false, true, true]);
    expect((await pipeline.takeCollectiveTime()).every((t) => t.handoverMs === 0)).toBe(true);
  });

  it('PP 4: four micro-batches, each in slot m on every stage; fewer sequences than stages, fewer micro-batches', async () => {
    const { pipeline, calls } = fakeRanks(4, 1, 2);
    await pipeline.forward(decode(8), V);
    for (let st = 0; st < 4; st++) expect(calls.filter((c) => c.stage === st).map((c) => c.slot)).toEqual([0, 1, 2, 3]);
    calls.length = 0;
    const two = await pipeline.forward(decode(2), V);
    expect(Array.from(two)).toEqual([10, 0, 0, 11, 0, 0]);
    expect(calls.map((c) => c.slot).sort()).toEqual([0, 0, 0, 0, 1, 1, 1, 1]);
  });

  it('a stage failing on a micro-batch: later stages never take it, the step fails once with that error', async () => {
    const { pipeline, calls } = fakeRanks(3, 1, 2, (stage, slot) => stage === 1 && slot === 0);
    await expect(pipeline.forward(decode(3), V)).rejects.toThrow(/stage 1 failed on micro-batch 0/);
    expect(calls.filter((c) => c.stage === 2)).toEqual([]);
    // A step refused by the check runs nothing.
    calls.length = 0;
    const bad = { ...decode(2), tokens: Int32Array.of(1, -1) };
    await expect(pipeline.forward(bad, V)).rejects.toThrow(/negative token/);
    expect(calls).toEqual([]);
  });
});

describe("loadCheckpoint: a pipeline stage's tensors", () => {
  it('checks the whole checkpoint against the whole manifest, then reads only the tensors the stage holds', async () => {
    const dir = join(import.meta.dirname, '..', 'fixtures', 'hf-tiny-qwen2'); // tied: the embedding on both stages
    const config = loadModelConfig(dir);
    const manifest = weightManifest(config);
    for (const stage of [0, 1]) {
      const holds = manifest.filter((t) => tensorStages(config, 2, t).includes(stage));
      const read: string[] = [];
      const raw = {
        loadFromFile: async (_fd: number, tensors: { name: string }[]) => {
          read.push(...tensors.map((t) => t.name));
        },
      } as unknown as RawCudaLlama;
      let counted = 0;
      const held = new Set(holds.map((t) => t.name));
      await loadCheckpoint(
        raw,
        dir,
        manifest,
        undefined,
        (n) => (counted += n),
        (name) => held.has(name),
      );
      expect(read.sort()).toEqual(holds.map((t) => t.name).sort());
      expect(counted).toBe(holds.length);
      expect(read).toContain('model.embed_tokens.weight');
      expect(read.some((n) => n.startsWith(`model.layers.${1 - stage}.`))).toBe(false);
    }
  });
});

describe('loadRankWeights: fake rank models (two pipeline stages, two tensor-parallel ranks each)', () => {
  const dir = join(import.meta.dirname, '..', 'fixtures', 'hf-tiny-qwen2'); // tied: the embedding on both stages
  const config = loadModelConfig(dir);
  const manifest = weightManifest(config);
  const total = manifest.length;
  /** Rank stage * 2 + tpRank, holding its stage's tensors; records what reaches it. */
  const ranksOf = () =>
    [0, 1].flatMap((stage) =>
      [0, 1].map((tpRank) => {
        const held = new Set(manifest.filter((t) => tensorStages(config, 2, t).includes(stage)).map((t) => t.name));
        const got = new Map<string, number>(); // name -> values set (host tensors) or 0 (checkpoint, dummy)
        const model = {
          weightBytes: 0,
          holds: (name: string) => held.has(name),
          fillDummy: async (name: string) => void got.set(name, 0),
          loadFromFile: async (_fd: number, tensors: { name: string }[]) => {
            for (const t of tensors) got.set(t.name, 0);
          },
          setWeight: async (name: string, data: Float32Array) => void got.set(name, data.length),
        } as unknown as RawCudaLlama;
        return { rank: { model, tpSize: 2, tpRank, countsProgress: tpRank === 0 }, held, got };
      }),
    );
  const progressOf = () => {
    const calls: number[] = [];
    return { calls, onProgress: (loaded: number, n: number) => (expect(n).toBe(total), calls.push(loaded)) };
  };

  it.each(['checkpoint', 'dummy', 'host tensors'])(
    '%s: every rank gets exactly the tensors it holds; progress rises to the total once',
    async (kind) => {
      const ranks = ranksOf();
      const { calls, onProgress } = progressOf();
      const weights =
        kind === 'checkpoint'
          ? dir
          : kind === 'dummy'
            ? 'dummy:tiny'
            : manifest.map((t) => ({ name: t.name, data: new Float32Array(tensorElements(t)) }));
      await loadRankWeights(
        ranks.map((r) => r.rank),
        config,
        { weights, onProgress },
        'test',
      );
      for (const r of ranks) expect([...r.got.keys()].sort()).toEqual([...r.held].sort());
      expect(calls.at(-1)).toBe(total);
      expect(calls.filter((n) => n === total)).toHaveLength(1);
      expect(calls).toEqual([...calls].sort((a, b) => a - b));
    },
  );

  it('host tensors: each rank gets its tensor-parallel slice; a tensor not in the model is a BadArgumentError', async () => {
    const ranks = ranksOf();
    const q = manifest.find((t) => t.name === 'model.layers.0.self_attn.q_proj.weight')!;
    const norm = manifest.find((t) => t.name === 'model.layers.0.input_layernorm.weight')!;
    const tensors = [q, norm].map((t) => ({ name: t.name, data: new Float32Array(tensorElements(t)) }));
    await loadRankWeights(
      ranks.map((r) => r.rank),
      config,
      { weights: tensors },
      'test',
    );
    for (const r of ranks.slice(0, 2)) {
      expect(r.got.get(q.name)).toBe(tensorElements(q) / 2); // its heads' rows
      expect(r.got.get(norm.name)).toBe(tensorElements(norm)); // replicated
    }
    for (const r of ranks.slice(2)) expect(r.got.size).toBe(0); // stage 1 holds no layer 0
    await expect(
      loadRankWeights(
        ranks.map((r) => r.rank),
        config,
        { weights: [{ name: 'model.not_a_tensor', data: new Float32Array(1) }] },
        'test',
      ),
    ).rejects.toThrow(BadArgumentError);
  });
});
