import { describe, expect, it } from 'vitest';
import { BadArgumentError, CudaDevice } from '../../lib/index.js';
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

// The skinny GEMM of decode (native/kernels/gemv.cu): each entry point tandem_gemv_m<m> against a float64
// reference, and the engine with it (the default up to batch 4) against the engine with cuBLAS only
// (TANDEM_GEMV=off): decode logits within bf16 tolerance at batch 1, 3 and 8, and transformers' greedy tokens on
// the fixtures either way. Skipped with the reason printed without a GPU; a failure under `npm run test:gpu`.
const gate = await gpuGate(1);

const GEMV_THREADS = 128; // tandem_gemv::kThreads
const GEMV_MAX_M = 16; // tandem_gemv::kMaxM
const DEFAULT_GEMV_MAX_BATCH = 4; // kGemvMaxBatch in cuda_llama.cpp

restoreEnvAfterEach('TANDEM_GEMV', 'TANDEM_GEMV_PDL');
const withGemv = <T>(value: string | undefined, create: () => Promise<T>) => withEnv('TANDEM_GEMV', value, create);

function bf16Bits(f: number): number {
  const u = new Uint32Array(Float32Array.of(f).buffer)[0]!;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}
/** bf16 bits to their fp32 values. */
function bf16Values(bits: Uint16Array): Float32Array {
  return new Float32Array(Uint32Array.from(bits, (b) => b << 16).buffer);
}

/** Deterministic uniform values in [-1, 1) as bf16 bits (a different stream per seed). */
function randomBf16(count: number, seed: number): Uint16Array {
  let s = seed >>> 0 || 1;
  const out = new Uint16Array(count);
  for (let i = 0; i < count; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out[i] = bf16Bits(((s >>> 0) / 2 ** 32) * 2 - 1);
  }
  return out;
}

describe.skipIf(!gate.run)('GEMV kernels (gemv.cu)', () => {
  // k = 1032: the 16-byte vector path with a partial last round; k = 100: not a multiple of 8, the scalar path;
  // n = 259 and 3: not a multiple of the rows per CTA, and fewer rows than one CTA has.
  it.each([
    [1000, 1032],
    [259, 100],
    [3, 4096],
  ])('every entry point m = 1..16, plain and SwiGLU, matches float64 at n = %i, k = %i', async (n, k) => {
    const device = await CudaDevice.open(0);
    try {
      await device.loadKernels();
      const w = randomBf16(n * k, 7 + n);
      const wf = bf16Values(w);
      const dW = await device.alloc(n * k * 2);
      const dX = await device.alloc(GEMV_MAX_M * k * 2);
      const dY = await device.alloc(GEMV_MAX_M * n * 4);
      await dW.copyFromHost(w);
      let worst = 0;
      for (let m = 1; m <= GEMV_MAX_M; m++) {
        const x = randomBf16(m * k, 1000 + m);
        const xf = bf16Values(x);
        await dX.copyFromHost(x);
        // float64 dot products, and their bound sum |w x| (fp32 sums of exact bf16 products err by a few ulps of it)
        const want = new Float64Array(m * n);
        const bound = new Float64Array(m * n);
        for (let i = 0; i < m; i++)
          for (let r = 0; r < n; r++) {
            let dot = 0;
            let abs = 0;
            for (let e = 0; e < k; e++) {
              const p = wf[r * k + e]! * xf[i * k + e]!;
              dot += p;
              abs += Math.abs(p);
            }
            want[i * n + r] = dot;
            bound[i * n + r] = abs;
          }
        for (const grid of [n, 2]) {
          await dY.copyFromHost(new Float32Array(m * n).fill(NaN)); // every output must be written
          await device.launch(`tandem_gemv_m${m}`, { grid, block: GEMV_THREADS }, [dX, dW, dY, { i32: n }, { i32: k }]);
          const y = new Float32Array(m * n);
          await dY.copyToHost(y);
          let bad = -1;
          for (let j = 0; j < m * n; j++) {
            const err = Math.abs(y[j]! - want[j]!) / bound[j]!;
            if (!(err < 1e-5))
              bad = bad < 0 ? j : bad; // NaN (unwritten) fails too
            else worst = Math.max(worst, err);
          }
          expect(bad, `m ${m}, grid ${grid}: y[${bad}] = ${y[bad]}, want ${want[bad]}`).toBe(-1);
        }
      }
      console.log(`[figure] gemv n=${n} k=${k}: worst error ${worst.toExponential(2)} of sum |w x| (m = 1..16)`);

      // tandem_gemv_swiglu_m<m>: w's first `inter` rows are gate rows, the next `inter` up rows; out is
      // act = bf16(silu(gate) * up). Allowed: one bf16 rounding of act plus fp32 summation error carried through.
      const inter = Math.floor(n / 2);
      const dAct = await device.alloc(GEMV_MAX_M * inter * 2);
      let worstAct = 0;
      for (let m = 1; m <= GEMV_MAX_M; m++) {
        const x = randomBf16(m * k, 2000 + m);
        const xf = bf16Values(x);
        await dX.copyFromHost(x);
        await dAct.copyFromHost(new Uint16Array(m * inter).fill(0x7fc0)); // NaN: every output must be written
        await device.launch(`tandem_gemv_swiglu_m${m}`, { grid: 2 * inter, block: GEMV_THREADS }, [
          dX,
          dW,
          dAct,
          { i32: inter },
          { i32: k },
        ]);
        const act = new Uint16Array(m * inter);
        await dAct.copyToHost(act);
        const got = bf16Values(act);
        for (let i = 0; i < m; i++)
          for (let j = 0; j < inter; j++) {
            let g = 0;
            let u = 0;
            let gBound = 0;
            let uBound = 0;
            for (let e = 0; e < k; e++) {
              const pg = wf[j * k + e]! * xf[i * k + e]!;
              const pu = wf[(inter + j) * k + e]! * xf[i * k + e]!;
              g += pg;
              u += pu;
              gBound += Math.abs(pg);
              uBound += Math.abs(pu);
            }
            const silu = g / (1 + Math.exp(-g));
            const want = silu * u;
            const allowed = 2 ** -8 * Math.abs(want) + 1e-5 * (Math.abs(u) * gBound + Math.abs(silu) * uBound) + 1e-30;
            const err = Math.abs(got[i * inter + j]! - want);
            expect(err <= allowed, `swiglu m ${m}: act[${i}, ${j}] = ${got[i * inter + j]}, want ${want}`).toBe(true);
            worstAct = Math.max(worstAct, err / allowed);
          }
      }
      console.log(`[figure] gemv swiglu inter=${inter} k=${k}: worst error ${worstAct.toFixed(3)} of the allowance`);
      await dAct.dispose();
      await Promise.all([dW.dispose(), dX.dispose(), dY.dispose()]);
    } finally {
      await device.dispose();
    }
  });
});

describe.skipIf(!gate.run)('GPU engine with the GEMV kernels', () => {
  it('TANDEM_GEMV picks the crossover: default 4, off, a number; anything else is a typed error', async () => {
    const config = dummyConfig('tiny');
    const make = () => CudaModelRunner.create({ config, numBlocks: 8, weights: 'dummy:tiny' });
    for (const [value, want] of [
      [undefined, DEFAULT_GEMV_MAX_BATCH],
      ['off', 0],
      ['0', 0],
      ['16', 16],
      ['3', 3],
    ] as const) {
      const runner = await withGemv(value, make);
      expect(runner.gemvMaxBatch, `TANDEM_GEMV=${value}`).toBe(want);
      await runner.dispose();
    }
    for (const bad of ['17', 'on', '-1', ''])
      await expect(withGemv(bad, make), `TANDEM_GEMV=${bad}`).rejects.toBeInstanceOf(BadArgumentError);
  });

  // hidden 1024, intermediate 3584, head dim 128: the vector path over several rounds, as on the 8B model.
  const wide = {
    ...dummyConfig('tiny'),
    hiddenSize: 1024,
    intermediateSize: 3584,
    numHeads: 8,
    numKvHeads: 2,
    headDim: 128,
  };
  it.each([
    ['dummy:tiny', dummyConfig('tiny')],
    ['hidden 1024, intermediate 3584', wide],
  ])(
    'decode logits at batch 1, 3 and 8 agree with cuBLAS within bf16 tolerance, in CUDA graphs (%s)',
    async (_n, config) => {
      const numBlocks = 64;
      const mb = 4;
      const create = () => CudaModelRunner.create({ config, numBlocks, weights: 'dummy:tiny', seed: 5 });
      const gemv = await withGemv(undefined, create);
      const cublas = await withGemv('off', create);
      try {
        expect(gemv.gemvMaxBatch).toBe(DEFAULT_GEMV_MAX_BATCH);
        expect(cublas.gemvMaxBatch).toBe(0);
        // 8 sequences: a 20-token prompt each in one batch of 160 tokens (cuBLAS in both), then decode steps.
        const step = sequenceSteps(config.vocabSize, 8, mb);
        const all = [0, 1, 2, 3, 4, 5, 6, 7];
        const plan: number[][] = [[0], [0, 1, 2], all, [5], [2, 4, 6], all, all];
        const prefill = step(all, 20, 0);
        await Promise.all([gemv.forward(prefill), cublas.forward(prefill)]);
        const agreement = new LogitsAgreement(config.vocabSize);
        for (const [k, seqs] of plan.entries()) {
          const batch = step(seqs, 1, k + 1);
          const [a, b] = await Promise.all([gemv.forward(batch), cublas.forward(batch)]);
          agreement.check(a, b, seqs.length, (s) => `step ${k} (batch ${seqs.length}), sequence ${seqs[s]}`);
        }
        expect(gemv.cudaGraphs).toEqual({ active: true, reason: null });
        console.log(`[figure] ${_n}: decode logits GEMV vs cuBLAS ${agreement}`);
      } finally {
        await Promise.all([gemv.dispose(), cublas.dispose()]);
      }
    },
  );

  it('with programmatic dependent launch (TANDEM_GEMV_PDL=1) decode steps in CUDA graphs give the same logits', async () => {
    const config = {
      ...dummyConfig('tiny'),
      hiddenSize: 512,
      intermediateSize: 1536,
      numHeads: 4,
      numKvHeads: 2,
      headDim: 128,
    };
    const create = () => CudaModelRunner.create({ config, numBlocks: 32, weights: 'dummy:tiny', seed: 9 });
    const plain = await create();
    process.env.TANDEM_GEMV_PDL = '1';
    const pdl = await create();
    try {
      // Same kernels in the same order: only the launch overlap differs, so the logits must be bit-identical (a
      // GEMV that read x before the previous kernel finished writing it would not be).
      const lens = [0, 0, 0];
      const step = (n: number, salt: number): ForwardBatch => {
        const tokens: number[] = [];
        const positions: number[] = [];
        const seqStarts = [0];
        for (let s = 0; s < 3; s++) {
          for (let i = 0; i < n; i++) {
            tokens.push((s * 17 + salt * 5 + i * 11) % config.vocabSize);
            positions.push(lens[s]! + i);
          }
          lens[s]! += n;
          seqStarts.push(tokens.length);
        }
        return {
          tokens: Int32Array.from(tokens),
          positions: Int32Array.from(positions),
          seqStarts: Int32Array.from(seqStarts),
          blockTables: Int32Array.from({ length: 3 * 4 }, (_, i) => i),
          maxBlocksPerSeq: 4,
          contextLens: Int32Array.from(lens),
        };
      };
      const prefill = step(12, 0);
      await Promise.all([plain.forward(prefill), pdl.forward(prefill)]);
      for (let k = 1; k <= 6; k++) {
        const batch = step(1, k);
        const [a, b] = await Promise.all([plain.forward(batch), pdl.forward(batch)]);
        expect(Array.from(b), `decode step ${k}`).toEqual(Array.from(a));
      }
      expect(pdl.cudaGraphs).toEqual({ active: true, reason: null });
    } finally {
      await Promise.all([plain.dispose(), pdl.dispose()]);
    }
  });

  it.each(['hf-tiny-llama', 'hf-tiny-qwen2'])(
    "greedy decoding gives transformers' 32 tokens with and without the GEMV kernels (%s)",
    async (name) => {
      const { dir, expected } = hfFixture(name);
      for (const [value, want] of [
        [undefined, DEFAULT_GEMV_MAX_BATCH],
        ['off', 0],
      ] as const) {
        await using m = await withGemv(value, () => openModel({ model: dir, device: 'cuda', numBlocks: 16 }));
        expect((m.runner as CudaModelRunner).gemvMaxBatch).toBe(want);
        // Three copies of the prompt at once: decode steps of batch 3 besides the single one.
        for (const tokenIds of await greedyCopies(m.engine, expected, 3))
          expect(tokenIds, `TANDEM_GEMV=${value}`).toEqual(expected.greedy);
      }
    },
  );
});
