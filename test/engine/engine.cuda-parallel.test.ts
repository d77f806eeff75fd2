import { describe, expect, it } from 'vitest';
import { ParallelLayoutError } from '../../lib/errors.js';
import { CudaModelRunner } from '../../lib/engine/cuda.js';
import { checkCudaTensorParallel, sliceHostTensor, tensorSlice, tpPlacement } from '../../lib/engine/cuda-parallel.js';
import { tensorShard as cudaTensorShard, vocabRange as vocabRows } from '../../lib/engine/parallel.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { weightManifest, tensorElements } from '../../lib/engine/model/manifest.js';
import type { ModelConfig } from '../../lib/engine/model/config.js';

// The GPU engine's tensor-parallel arithmetic (lib/engine/cuda-parallel.ts; native/src/engine/cuda_llama_tp.cpp does
// the same): what each rank holds, and each rank's slice of every manifest tensor. The GPU side is checked by
// test/gpu/11.engine.tp.gpu.test.ts; here, everything that is pure arithmetic.

const tiny = dummyConfig('tiny'); // 4 heads, 2 kv heads, intermediate 128, head dim 16, vocabulary 258
const qwenLike: ModelConfig = { ...tiny, attentionBias: true, attentionOutputBias: true, tieWordEmbeddings: true };

describe('tensor-parallel layout checks (GPU engine)', () => {
  it('accepts sizes that divide heads and intermediate size and divide or are a multiple of the kv heads', () => {
    expect(checkCudaTensorParallel(tiny, 1, 'test')).toBe(1);
    expect(checkCudaTensorParallel(tiny, 2, 'test')).toBe(2);
    expect(checkCudaTensorParallel(tiny, 4, 'test')).toBe(4); // 2 kv heads, each on 2 ranks
  });

  it.each([
    [3, /does not divide the model's 4 attention heads/],
    [0, /positive integer/],
    [1.5, /positive integer/],
    ['2', /positive integer/],
    [16, /more than the 8 ranks/],
  ])('tp %s is a ParallelLayoutError naming the dimension', (tp, message) => {
    const call = () => checkCudaTensorParallel(tiny, tp, 'CudaModelRunner.create');
    expect(call).toThrow(ParallelLayoutError);
    expect(call).toThrow(message);
    try {
      call();
    } catch (error) {
      expect((error as ParallelLayoutError).code).toBe('TANDEM_BAD_PARALLEL_LAYOUT');
    }
  });

  it('kv heads that tp neither divides nor is a multiple of, and an intermediate size tp does not divide', () => {
    const kv3: ModelConfig = { ...tiny, numHeads: 12, numKvHeads: 3, intermediateSize: 120 };
    expect(() => checkCudaTensorParallel(kv3, 2, 'w')).toThrow(/neither divides the model's 3 kv heads/);
    expect(() => checkCudaTensorParallel(kv3, 6, 'w')).not.toThrow();
    const inter: ModelConfig = { ...tiny, intermediateSize: 130 };
    expect(() => checkCudaTensorParallel(inter, 4, 'w')).toThrow(/intermediate size 130/);
  });

  it('ranks on one device take the local communicator, ranks on several NCCL (test/engine/engine.cuda-nccl-tp.test.ts)', () => {
    expect(tpPlacement(2, 3, undefined, undefined, 'w')).toEqual({ ordinals: [3, 3], communicator: 'local' });
    expect(tpPlacement(2, 0, [1, 1], undefined, 'w')).toEqual({ ordinals: [1, 1], communicator: 'local' });
    expect(tpPlacement(2, 0, [0, 1], undefined, 'w')).toEqual({ ordinals: [0, 1], communicator: 'nccl' });
    expect(() => tpPlacement(2, 0, [0], undefined, 'w')).toThrow(/1 devices for 2 tensor-parallel ranks/);
    expect(() => tpPlacement(2, 0, [0, -1], undefined, 'w')).toThrow(ParallelLayoutError);
  });

  it('CudaModelRunner.create checks the layout before it opens a device (the typed error, also without a GPU)', async () => {
    await expect(
      CudaModelRunner.create({ config: tiny, weights: 'dummy:tiny', numBlocks: 4, parallel: { tp: 3 } }),
    ).rejects.toBeInstanceOf(ParallelLayoutError);
    await expect(
      CudaModelRunner.create({
        config: tiny,
        weights: 'dummy:tiny',
        numBlocks: 4,
        parallel: { tp: 2 },
        devices: [0, 1],
        communicator: 'local',
      }),
    ).rejects.toThrow(/the local communicator runs every rank on one GPU/);
  });
});

describe('what each tensor-parallel rank holds', () => {
  it('heads, channels and vocabulary rows in contiguous parts; kv heads split, or replicated when fewer than ranks', () => {
    const r1 = cudaTensorShard(tiny, 2, 1);
    expect(r1.heads).toEqual({ start: 2, count: 2 });
    expect(r1.kvHeads).toEqual({ start: 1, count: 1 });
    expect(r1.intermediate).toEqual({ start: 64, count: 64 });
    expect(r1.vocab).toEqual({ start: 129, count: 129 });
    // tp 4 over 2 kv heads: rank r holds kv head floor(r * 2 / 4), the one its q head uses (q head r, group 2).
    const kv = [0, 1, 2, 3].map((r) => cudaTensorShard(tiny, 4, r).kvHeads);
    expect(kv).toEqual([0, 0, 1, 1].map((start) => ({ start, count: 1 })));
    for (let r = 0; r < 4; r++) {
      const s = cudaTensorShard(tiny, 4, r);
      const group = tiny.numHeads / tiny.numKvHeads;
      expect(Math.floor(s.heads.start / group)).toBe(s.kvHeads.start);
      expect(Math.floor((s.heads.start + s.heads.count - 1) / group)).toBe(s.kvHeads.start);
    }
    expect(() => cudaTensorShard(tiny, 2, 2)).toThrow(ParallelLayoutError);
  });

  it('vocabulary parts are ceil(vocab / tp) rows, the last fewer, and cover the vocabulary once', () => {
    expect([0, 1, 2, 3].map((r) => vocabRows(10, 4, r))).toEqual([
      { start: 0, count: 3 },
      { start: 3, count: 3 },
      { start: 6, count: 3 },
      { start: 9, count: 1 },
    ]);
    expect(vocabRows(9, 4, 3)).toEqual({ start: 9, count: 0 });
    for (const [v, tp] of [
      [384, 2],
      [32000, 8],
      [128256, 4],
      [151936, 8],
    ] as const) {
      let next = 0;
      for (let r = 0; r < tp; r++) {
        const part = vocabRows(v, tp, r);
        expect(part.start).toBe(next);
        next += part.count;
      }
      expect(next).toBe(v);
    }
  });
});

/** Element (i, j) of the whole tensor: distinct values, so any misplaced element shows. */
function wholeTensor(shape: readonly number[]): Float32Array {
  return Float32Array.from({ length: tensorElements({ shape }) }, (_, i) => i + 1);
}

describe('each rank slice of a tensor is its part of the same whole tensor', () => {
  describe.each([
    ['dummy:tiny', tiny, [2, 4]],
    ['Qwen2-like (q/k/v and o biases, tied lm_head)', qwenLike, [2, 4]],
  ] as const)('%s', (_name, config, sizes) => {
    it.each(sizes)('tp %i: slices put back together give every tensor, element (i, j) from (i, j)', (tp) => {
      for (const t of weightManifest(config)) {
        const data = wholeTensor(t.shape);
        const [rows, cols] = t.shape.length === 1 ? [1, t.shape[0]!] : [t.shape[0]!, t.shape[1]!];
        const seen = new Float32Array(data.length);
        for (let r = 0; r < tp; r++) {
          const slice = tensorSlice(config, tp, r, t);
          const part = sliceHostTensor(config, tp, r, t, data);
          const want: number[] = [];
          for (let i = 0; i < slice.rows.count; i++)
            for (let j = 0; j < slice.cols.count; j++) {
              const at = (slice.rows.start + i) * cols + slice.cols.start + j;
              want.push(data[at]!);
              seen[at] = data[at]!;
            }
          expect(Array.from(part), `${t.name} rank ${r}`).toEqual(want);
        }
        // Every element is on some rank (kv heads and replicated tensors on several).
        expect(seen, `${t.name} covered`).toEqual(data);
        expect(rows * cols).toBe(data.length);
      }
    });
  });

  it('rules per role: q/k/v/gate/up/embed/lm_head rows, o/down columns, norms and o bias whole', () => {
    const m = new Map(weightManifest(qwenLike).map((t) => [t.role + ':' + t.layer, t]));
    const at = (role: string, layer = 0) => tensorSlice(qwenLike, 2, 1, m.get(`${role}:${layer}`)!);
    expect(at('q').rows).toEqual({ start: 32, count: 32 }); // heads 2..3 of 16 dims
    expect(at('q_bias').cols).toEqual({ start: 32, count: 32 });
    expect(at('k').rows).toEqual({ start: 16, count: 16 });
    expect(at('v_bias').cols).toEqual({ start: 16, count: 16 });
    expect(at('o').cols).toEqual({ start: 32, count: 32 });
    expect(at('o').rows).toEqual({ start: 0, count: 64 });
    expect(at('gate').rows).toEqual({ start: 64, count: 64 });
    expect(at('down').cols).toEqual({ start: 64, count: 64 });
    expect(at('embed', -1).rows).toEqual({ start: 129, count: 129 });
    for (const role of ['input_norm', 'post_norm', 'o_bias']) expect(at(role).cols).toEqual({ start: 0, count: 64 });
    // The whole tensor with one rank, and the wrong number of values is refused.
    const q = m.get('q:0')!;
    expect(sliceHostTensor(qwenLike, 1, 0, q, wholeTensor(q.shape))).toHaveLength(64 * 64);
    expect(() => sliceHostTensor(qwenLike, 2, 0, q, new Float32Array(3))).toThrow(ParallelLayoutError);
  });
});
