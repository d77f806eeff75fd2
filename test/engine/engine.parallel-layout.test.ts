/**
 * Tensor / pipeline / expert parallel arithmetic (lib/engine/parallel.ts): validation, each rank's heads, kv
 * heads, channels, experts and vocabulary rows, stage layers, and slices of tensors by their manifest shard rule,
 * checked by reassembling the slices into the whole tensor.
 */
import { describe, expect, it } from 'vitest';
import { ParallelLayoutError } from '../../lib/errors.js';
import { dummyConfig, type ModelConfig } from '../../lib/engine/model/index.js';
import { weightManifest, type ManifestTensor } from '../../lib/engine/model/manifest.js';
import {
  checkParallelConfig,
  describeParallel,
  expertShard,
  rankSlice,
  sliceTensor,
  stageLayers,
  tensorShard,
  tensorStages,
  vocabRange,
} from '../../lib/engine/parallel.js';

const tiny = dummyConfig('tiny'); // 4 heads, 2 kv heads, intermediate 128, 2 layers
const wide: ModelConfig = { ...tiny, numHeads: 8, numKvHeads: 2, hiddenSize: 64, headDim: 8, vocabSize: 10 };

describe('checkParallelConfig', () => {
  it('accepts layouts that divide the model and fills defaults', () => {
    expect(checkParallelConfig(tiny, undefined)).toEqual({ tp: 1, pp: 1, ep: 1 });
    expect(checkParallelConfig(tiny, { tp: 2 })).toEqual({ tp: 2, pp: 1, ep: 1 });
    expect(checkParallelConfig(tiny, { tp: 4, pp: 2 })).toEqual({ tp: 4, pp: 2, ep: 1 });
  });

  it("takes ep on an MoE model: experts divided, tp 1 or tp = ep; the experts' width bounds tp instead", () => {
    const moe = dummyConfig('tiny-moe'); // 8 experts of width 32, 4 heads
    expect(checkParallelConfig(moe, { ep: 8 })).toEqual({ tp: 1, pp: 1, ep: 8 });
    expect(checkParallelConfig(moe, { ep: 4, tp: 4, pp: 2 })).toEqual({ tp: 4, pp: 2, ep: 4 });
    // The dense intermediate size (128) splits nothing in an MoE model; the experts' 32 channels do.
    expect(checkParallelConfig({ ...moe, intermediateSize: 100 }, { tp: 4 })).toEqual({ tp: 4, pp: 1, ep: 1 });
  });

  const moe = dummyConfig('tiny-moe');
  const bad: [string, ModelConfig, { tp?: number; pp?: number; ep?: number }, RegExp][] = [
    ['ep on a dense model', tiny, { ep: 2 }, /expert parallel size 2 needs a mixture-of-experts model/],
    ['ep 3 on 8 experts', moe, { ep: 3 }, /expert parallel size 3 does not divide the model's 8 experts/],
    ['ep 4 with tp 2', moe, { ep: 4, tp: 2 }, /expert parallel size 4 with tensor parallel size 2/],
    ['ep 2 with tp 4', moe, { ep: 2, tp: 4 }, /expert parallel size 2 with tensor parallel size 4/],
    ['ep 0', moe, { ep: 0 }, /expert parallel size must be a positive integer \(got 0\)/],
    [
      'tp 4 on experts 6 wide',
      { ...moe, moe: { ...moe.moe!, intermediateSize: 6 } },
      { tp: 4 },
      /tensor parallel size 4 does not divide the experts' intermediate size 6/,
    ],
    ['tp 3 on 4 heads', tiny, { tp: 3 }, /tensor parallel size 3 does not divide the model's 4 attention heads/],
    ['pp beyond the layers', tiny, { pp: 3 }, /pipeline parallel size 3 is more stages than the model's 2 layers/],
    ['tp 0', tiny, { tp: 0 }, /tensor parallel size must be a positive integer \(got 0\)/],
    ['fractional pp', tiny, { pp: 1.5 }, /pipeline parallel size must be a positive integer/],
    [
      'kv heads 3 with tp 2',
      { ...tiny, numHeads: 6, numKvHeads: 3, headDim: 16 },
      { tp: 2 },
      /neither divides the model's 3 kv heads/,
    ],
    [
      'intermediate 100 with tp 8',
      { ...wide, intermediateSize: 100 },
      { tp: 8 },
      /does not divide the model's intermediate size 100/,
    ],
  ];
  for (const [what, config, parallel, message] of bad)
    it(`refuses ${what} with ParallelLayoutError`, () => {
      let caught: unknown;
      try {
        checkParallelConfig(config, parallel, 'test');
      } catch (error) {
        caught = error;
      }
      expect(caught).toBeInstanceOf(ParallelLayoutError);
      expect((caught as ParallelLayoutError).code).toBe('TANDEM_BAD_PARALLEL_LAYOUT');
      expect((caught as Error).message).toMatch(message);
    });
});

describe('tensorShard', () => {
  it('splits heads, kv heads and channels evenly when tp divides them', () => {
    const r1 = tensorShard(tiny, 2, 1);
    expect(r1.heads).toEqual({ start: 2, count: 2 });
    expect(r1.kvHeads).toEqual({ start: 1, count: 1 });
    expect(r1.writesKv).toBe(true);
    expect(r1.intermediate).toEqual({ start: 64, count: 64 });
  });

  it('replicates kv heads when there are fewer than ranks; the first holder writes', () => {
    const shards = [0, 1, 2, 3].map((r) => tensorShard(tiny, 4, r));
    expect(shards.map((s) => s.kvHeads.start)).toEqual([0, 0, 1, 1]);
    expect(shards.map((s) => s.kvHeads.count)).toEqual([1, 1, 1, 1]);
    expect(shards.map((s) => s.writesKv)).toEqual([true, false, true, false]);
    // Each rank's query heads all map to its kv head (GQA group of 2).
    for (const s of shards) expect(Math.floor(s.heads.start / 2)).toBe(s.kvHeads.start);
    const w = [0, 1, 2, 3, 4, 5, 6, 7].map((r) => tensorShard(wide, 8, r));
    expect(w.map((s) => s.kvHeads.start)).toEqual([0, 0, 0, 0, 1, 1, 1, 1]);
    expect(w.map((s) => s.writesKv)).toEqual([true, false, false, false, true, false, false, false]);
  });

  it('splits the vocabulary in ceil-div parts, the last rank holding fewer (or none)', () => {
    expect([0, 1, 2, 3].map((r) => vocabRange(10, 4, r))).toEqual([
      { start: 0, count: 3 },
      { start: 3, count: 3 },
      { start: 6, count: 3 },
      { start: 9, count: 1 },
    ]);
    expect(vocabRange(5, 4, 3)).toEqual({ start: 5, count: 0 });
  });
});

describe('stageLayers', () => {
  it('splits layers as evenly as possible, earlier stages taking the extra one', () => {
    expect(stageLayers(2, 2)).toEqual([
      { start: 0, count: 1 },
      { start: 1, count: 1 },
    ]);
    expect(stageLayers(10, 4).map((s) => s.count)).toEqual([3, 3, 2, 2]);
    expect(stageLayers(10, 4).map((s) => s.start)).toEqual([0, 3, 6, 8]);
    expect(stageLayers(5, 1)).toEqual([{ start: 0, count: 5 }]);
  });

  it('places layer tensors on their stage, the embedding first, the head last (and a tied embedding on both)', () => {
    const cfg = { ...tiny, numLayers: 5 };
    expect(tensorStages(cfg, 2, { role: 'q', layer: 2 })).toEqual([0]);
    expect(tensorStages(cfg, 2, { role: 'q', layer: 3 })).toEqual([1]);
    expect(tensorStages(cfg, 2, { role: 'embed', layer: -1 })).toEqual([0]);
    expect(tensorStages(cfg, 2, { role: 'final_norm', layer: -1 })).toEqual([1]);
    expect(tensorStages(cfg, 2, { role: 'lm_head', layer: -1 })).toEqual([1]);
    expect(tensorStages({ ...cfg, tieWordEmbeddings: true }, 2, { role: 'embed', layer: -1 })).toEqual([0, 1]);
    expect(tensorStages({ ...cfg, tieWordEmbeddings: true }, 1, { role: 'embed', layer: -1 })).toEqual([0]);
  });
});

describe('sliceTensor', () => {
  const config: ModelConfig = { ...wide, attentionBias: true, attentionOutputBias: true, intermediateSize: 24 };
  const manifest = weightManifest(config).filter((t) => t.layer <= 0);
  // Element i of every tensor holds i, so a slice says where it came from.
  const whole = (t: ManifestTensor) => Float32Array.from({ length: t.shape.reduce((a, b) => a * b, 1) }, (_, i) => i);

  for (const tp of [2, 4, 8])
    it(`tp ${tp}: the ranks' slices reassemble every tensor by its shard rule`, () => {
      for (const t of manifest) {
        const data = whole(t);
        const slices = Array.from({ length: tp }, (_, r) => sliceTensor(config, tp, r, t, data));
        if (t.shard === 'replicated') {
          for (const s of slices) expect(s).toEqual(data);
          continue;
        }
        const cols = t.shape.length === 2 ? t.shape[1]! : 1;
        if (t.shard === 'row') {
          // Columns concatenated per row give the tensor back.
          const per = cols / tp;
          for (let r = 0; r < tp; r++) {
            expect(slices[r]!.length, t.name).toBe(t.shape[0]! * per);
            for (let row = 0; row < t.shape[0]!; row++)
              expect([...slices[r]!.subarray(row * per, (row + 1) * per)]).toEqual([
                ...data.subarray(row * cols + r * per, row * cols + (r + 1) * per),
              ]);
          }
          continue;
        }
        const isKv = ['k', 'v', 'k_bias', 'v_bias'].includes(t.role);
        if (isKv && config.numKvHeads < tp) {
          // Replicated kv heads: rank r holds head floor(r * kvHeads / tp), whole.
          for (let r = 0; r < tp; r++) {
            const head = Math.floor((r * config.numKvHeads) / tp);
            const rows = config.headDim;
            expect([...slices[r]!]).toEqual([...data.subarray(head * rows * cols, (head + 1) * rows * cols)]);
          }
          continue;
        }
        // column / vocab: rows in rank order give the tensor back.
        const joined = new Float32Array(data.length);
        let at = 0;
        for (const s of slices) {
          joined.set(s, at);
          at += s.length;
        }
        expect(at, t.name).toBe(data.length);
        expect(joined).toEqual(data);
      }
    });

  it('tp 2 on an MoE model: router and q/k norms whole, expert gate/up rows and down columns by channel', () => {
    const moe = dummyConfig('tiny-moe'); // experts 32 wide, hidden 64
    const t = weightManifest(moe).filter((x) => x.layer === 0);
    const byRole = (role: string) => t.find((x) => x.role === role && (x.expert ?? 3) === 3)!;
    for (const role of ['router', 'q_norm', 'k_norm']) {
      const data = whole(byRole(role));
      expect(sliceTensor(moe, 2, 1, byRole(role), data)).toBe(data);
    }
    const gate = byRole('expert_gate');
    const g = whole(gate);
    expect([...sliceTensor(moe, 2, 1, gate, g)]).toEqual([...g.subarray(16 * 64, 32 * 64)]);
    const down = byRole('expert_down');
    const d = whole(down);
    const half = sliceTensor(moe, 2, 1, down, d);
    expect(half.length).toBe(64 * 16);
    for (let row = 0; row < 64; row++)
      expect([...half.subarray(row * 16, (row + 1) * 16)]).toEqual([...d.subarray(row * 32 + 16, row * 32 + 32)]);
  });

  it('ep: each expert whole on exactly the rank it is placed on; the rest as with tp (1: whole everywhere)', () => {
    const moe = dummyConfig('tiny-moe'); // 8 experts
    const manifest = weightManifest(moe).filter((x) => x.layer === 0);
    for (const parallel of [
      { tp: 1, pp: 1, ep: 4 },
      { tp: 2, pp: 1, ep: 2 },
    ]) {
      const per = 8 / parallel.ep;
      for (let r = 0; r < parallel.ep; r++)
        expect(expertShard(moe, parallel, r)).toEqual({
          experts: { start: r * per, count: per },
          intermediate: { start: 0, count: 32 },
          shared: { start: 0, count: 0 },
        });
      for (const t of manifest) {
        const data = whole(t);
        const held = Array.from({ length: parallel.ep }, (_, r) => rankSlice(moe, parallel, r, t, data));
        if (t.shard === 'expert') {
          const owners = held.flatMap((s, r) => (s ? [r] : []));
          expect(owners, t.name).toEqual([Math.floor(t.expert! / per)]);
          expect(held[owners[0]!]).toBe(data);
        } else if (parallel.tp === 1) for (const s of held) expect(s, t.name).toBe(data);
        else held.forEach((s, r) => expect(s, t.name).toEqual(sliceTensor(moe, parallel.tp, r, t, data)));
      }
    }
    expect(expertShard(moe, { tp: 4, pp: 1, ep: 1 }, 3)).toEqual({
      experts: { start: 0, count: 8 },
      intermediate: { start: 24, count: 8 },
      shared: { start: 0, count: 0 },
    });
  });

  it('cuts the vocabulary rows of embedding and lm_head in ceil-div parts', () => {
    const embed = manifest.find((t) => t.role === 'embed')!;
    const data = whole(embed);
    const rows = (tp: number, r: number) => sliceTensor(config, tp, r, embed, data).length / config.hiddenSize;
    expect([0, 1, 2, 3].map((r) => rows(4, r))).toEqual([3, 3, 3, 1]);
  });

  it('describes a layout in words', () => {
    expect(describeParallel(tiny, { tp: 1, pp: 1, ep: 1 })).toBe('single rank (tp 1, pp 1)');
    expect(describeParallel({ ...tiny, numLayers: 5 }, { tp: 4, pp: 2, ep: 1 })).toBe(
      'tp 4 x pp 2 (8 ranks; stage layers 0-2, 3-4, kv heads replicated 2x)',
    );
    const moe = dummyConfig('tiny-moe');
    expect(describeParallel(moe, { tp: 1, pp: 1, ep: 4 })).toBe(
      'tp 1 x ep 4 x pp 1 (4 ranks; stage layers 0-1; 2 experts per rank, attention replicated)',
    );
    expect(describeParallel(moe, { tp: 2, pp: 2, ep: 2 })).toBe(
      'tp 2 x ep 2 x pp 2 (4 ranks; stage layers 0, 1; 4 experts per rank)',
    );
  });
});
