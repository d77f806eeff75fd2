import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/index.js';
import { CudaModelRunner } from '../../lib/engine/cuda.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { openModel } from '../../lib/engine/open.js';
import type { ForwardBatch } from '../../lib/engine/runner.js';
import { gpuGate } from '../helpers/gpu.js';

// The GEMMs above the GEMV through cuBLASLt (TANDEM_GEMM=lt, the default where libcublasLt loads: LtGemm in
// native/src/engine/cublas.cpp) against cublasGemmEx (TANDEM_GEMM=gemmex, the path before): logits within bf16
// tolerance for a 300-token prefill and decode steps of batch 1, 8 and 64 (in CUDA graphs), and transformers'
// greedy tokens on the fixtures either way. Skipped with the reason printed without a GPU; a failure under
// `npm run test:gpu`.
const gate = await gpuGate(1);

const BF16_TOLERANCE = 2e-2; // as test/gpu/05 and 07: bf16 weights and activations, fp32 accumulation

const saved = { TANDEM_GEMM: process.env.TANDEM_GEMM, TANDEM_GEMV: process.env.TANDEM_GEMV };
afterEach(() => {
  for (const [name, value] of Object.entries(saved)) {
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
  }
});

/** The GPU engine reads TANDEM_GEMM when a runner is created (CudaLlama::init). */
function withGemm<T>(value: string | undefined, create: () => Promise<T>): Promise<T> {
  if (value === undefined) delete process.env.TANDEM_GEMM;
  else process.env.TANDEM_GEMM = value;
  return create();
}

/** ||a - b|| / ||b||. */
function relativeError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i]! - b[i]!) ** 2;
    den += b[i]! ** 2;
  }
  return Math.sqrt(num / den);
}

function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

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
      const lens = Array<number>(seqs).fill(0);
      const step = (which: number[], n: number, salt: number): ForwardBatch => {
        const tokens: number[] = [];
        const positions: number[] = [];
        const seqStarts = [0];
        for (const s of which) {
          for (let i = 0; i < n; i++) {
            tokens.push((s * 31 + salt * 7 + i * 13) % config.vocabSize);
            positions.push(lens[s]! + i);
          }
          lens[s]! += n;
          seqStarts.push(tokens.length);
        }
        return {
          tokens: Int32Array.from(tokens),
          positions: Int32Array.from(positions),
          seqStarts: Int32Array.from(seqStarts),
          blockTables: Int32Array.from(which.flatMap((s) => Array.from({ length: mb }, (_, j) => s * mb + j))),
          maxBlocksPerSeq: mb,
          contextLens: Int32Array.from(which.map((s) => lens[s]!)),
        };
      };
      const V = config.vocabSize;
      let worst = 0;
      let argmaxAgree = 0;
      let rows = 0;
      const compare = async (batch: ForwardBatch, label: string) => {
        const [a, b] = await Promise.all([lt.forward(batch), gemmex.forward(batch)]);
        const n = batch.seqStarts.length - 1;
        expect(a.length).toBe(n * V);
        for (let s = 0; s < n; s++) {
          const rowA = a.subarray(s * V, (s + 1) * V);
          const rowB = b.subarray(s * V, (s + 1) * V);
          const rel = relativeError(rowA, rowB);
          worst = Math.max(worst, rel);
          expect(rel, `${label}, row ${s}`).toBeLessThan(BF16_TOLERANCE);
          if (argmax(rowA) === argmax(rowB)) argmaxAgree++;
          rows++;
        }
      };
      const all = Array.from({ length: seqs }, (_, s) => s);
      await compare(step([0], 300, 0), 'prefill of 300 tokens');
      await compare(step(all.slice(1), 4, 0), 'prefill of 63 x 4 tokens');
      const plan: number[][] = [[0], all.slice(0, 8), all, [3], all.slice(8, 16), all];
      for (const [k, which] of plan.entries())
        await compare(step(which, 1, k + 1), `decode step ${k} (batch ${which.length})`);
      expect(lt.cudaGraphs).toEqual({ active: true, reason: null });
      console.log(
        `[figure] logits lt vs gemmex: worst relative error ${worst.toExponential(2)}; argmax equal in ${argmaxAgree} of ${rows} rows`,
      );
    } finally {
      await Promise.all([lt.dispose(), gemmex.dispose()]);
    }
  });

  it.each(['hf-tiny-llama', 'hf-tiny-qwen2'])(
    "greedy decoding gives transformers' 32 tokens through lt and through gemmex (%s)",
    async (name) => {
      const dir = join(import.meta.dirname, '..', 'fixtures', name);
      const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as {
        promptIds: number[];
        greedy: number[];
      };
      for (const value of ['lt', 'gemmex'] as const) {
        await using m = await withGemm(value, () => openModel({ model: dir, device: 'cuda', numBlocks: 64 }));
        expect((m.runner as CudaModelRunner).gemmPath).toBe(value);
        // Eight copies of the prompt at once: decode steps of batch 8 (above the GEMV) besides smaller ones.
        const results = await Promise.all(
          Array.from({ length: 8 }, () =>
            m.engine
              .addRequest({ promptTokenIds: expected.promptIds, sampling: { temperature: 0, maxTokens: 32 } })
              .result(),
          ),
        );
        for (const r of results) expect(r.tokenIds, `TANDEM_GEMM=${value}`).toEqual(expected.greedy);
      }
    },
  );
});
