/**
 * Tensor parallelism across GPUs through NCCL (issue 25; native/src/engine/cuda_llama_nccl.h): what can be checked
 * without a GPU. Where each rank runs and which communicator joins them (tpPlacement), ordinals against the host's
 * GPUs, the KV pool sized per GPU, and the typed errors CudaModelRunner.create and openModel give before any device
 * is opened: NCCL missing (NcclUnavailableError naming libnccl.so.2), two ranks on one GPU with 'nccl', ranks on
 * several GPUs with 'local'. The GPU side: test/gpu/17.engine.nccl-tp.gpu.test.ts.
 */
import { describe, expect, it } from 'vitest';
import {
  BackendUnavailableError,
  BadArgumentError,
  NcclUnavailableError,
  ParallelLayoutError,
  TandemError,
} from '../../lib/errors.js';
import { CudaModelRunner, gpuWeightBytes } from '../../lib/engine/cuda.js';
import {
  checkTpDevicesPresent,
  kvBlocksFromFreeMemory,
  rankWeightBytes,
  tpPlacement,
} from '../../lib/engine/cuda-parallel.js';
import { openModel } from '../../lib/engine/open.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { ncclInfo } from '../../lib/collectives/index.js';
import { probeCuda } from '../../lib/cuda/index.js';
import { loadBinding } from '../../lib/native/binding.js';
import { nativeSync } from '../../lib/errors.js';

const tiny = dummyConfig('tiny'); // 4 heads, 2 kv heads, intermediate 128, vocabulary 258
const nccl = await ncclInfo();
const cuda = await probeCuda();

async function rejection(promise: Promise<unknown>): Promise<TandemError> {
  const error = await promise.then(
    () => {
      throw new Error('it resolved');
    },
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(TandemError);
  return error as TandemError;
}

describe('tpPlacement: where the ranks run and which communicator joins them', () => {
  it('defaults: one GPU for all is local, one GPU each is NCCL, one rank is local unless NCCL is asked for', () => {
    expect(tpPlacement(2, 1, undefined, undefined, 'w')).toEqual({ ordinals: [1, 1], communicator: 'local' });
    expect(tpPlacement(4, 0, [3, 2, 1, 0], undefined, 'w')).toEqual({ ordinals: [3, 2, 1, 0], communicator: 'nccl' });
    expect(tpPlacement(1, 5, undefined, undefined, 'w')).toEqual({ ordinals: [5], communicator: 'local' });
    expect(tpPlacement(1, 0, undefined, 'nccl', 'w')).toEqual({ ordinals: [0], communicator: 'nccl' });
    expect(tpPlacement(2, 0, [0, 1], 'nccl', 'w')).toEqual({ ordinals: [0, 1], communicator: 'nccl' });
    expect(tpPlacement(2, 0, [1, 1], 'local', 'w')).toEqual({ ordinals: [1, 1], communicator: 'local' });
  });

  it('layouts neither communicator runs are ParallelLayoutErrors that say what to do', () => {
    const refused = (call: () => unknown, message: RegExp) => {
      expect(call).toThrow(ParallelLayoutError);
      expect(call).toThrow(message);
    };
    refused(
      () => tpPlacement(2, 0, [0, 0], 'nccl', 'w'),
      /^w: NCCL runs one tensor-parallel rank per GPU, and ranks share a GPU here \(0, 0\); give each rank its own GPU, or put every rank on one GPU with communicator 'local'$/,
    );
    refused(
      () => tpPlacement(2, 0, [0, 1], 'local', 'w'),
      /^w: the local communicator runs every rank on one GPU; ranks on GPUs 0, 1 need communicator 'nccl'/,
    );
    refused(() => tpPlacement(4, 0, [0, 0, 1, 1], undefined, 'w'), /share a GPU and others do not \(0, 0, 1, 1\)/);
    refused(() => tpPlacement(2, 0, [0, 1, 2], undefined, 'w'), /^w: 3 devices for 2 tensor-parallel ranks$/);
    refused(() => tpPlacement(2, 0, [0, 1.5], undefined, 'w'), /non-negative integers \(got 1\.5\)/);
  });

  it('a communicator that is neither is a BadArgumentError', () => {
    expect(() => tpPlacement(2, 0, [0, 1], 'mpi', 'w')).toThrow(BadArgumentError);
    expect(() => tpPlacement(2, 0, [0, 1], 'mpi', 'w')).toThrow(/communicator must be 'local' or 'nccl' \(got "mpi"\)/);
  });

  it('ordinals past the GPUs the host has are refused, naming the first missing one', () => {
    expect(() => checkTpDevicesPresent([0, 1], 2, 'w')).not.toThrow();
    expect(() => checkTpDevicesPresent([0, 1, 2, 3], 2, 'w')).toThrow(ParallelLayoutError);
    expect(() => checkTpDevicesPresent([0, 1, 2, 3], 2, 'w')).toThrow(
      /^w: tensor-parallel ranks on GPUs 0, 1, 2, 3, but this host has 2 GPUs \(ordinals 0\.\.1\); GPU 2 is not there \(every rank on one GPU: the same ordinal for all, a graph pool's gpusPerReplica: 1\)$/,
    );
    expect(() => checkTpDevicesPresent([1, 1], 1, 'w')).toThrow(/this host has 1 GPU \(/);
  });
});

describe('KV pools sized per GPU', () => {
  it("each rank's weights are its slices: they add up to the model, more where tensors are replicated", () => {
    // The norms are whole on every rank (2 per layer and the final one); tiny has no biases.
    const norms = (2 * tiny.numLayers + 1) * tiny.hiddenSize * 2;
    expect(rankWeightBytes(tiny, 1, 0)).toBe(gpuWeightBytes(tiny));
    expect(rankWeightBytes(tiny, 2, 0) + rankWeightBytes(tiny, 2, 1)).toBe(gpuWeightBytes(tiny) + norms);
    expect(rankWeightBytes(tiny, 2, 0)).toBe(rankWeightBytes(tiny, 2, 1));
    // TP 4 over 2 kv heads: each kv head's k and v rows are on two ranks too.
    const four = [0, 1, 2, 3].reduce((sum, r) => sum + rankWeightBytes(tiny, 4, r), 0);
    const kv = 2 * tiny.numLayers * tiny.numKvHeads * tiny.headDim * tiny.hiddenSize * 2; // k and v, bf16
    expect(four).toBe(gpuWeightBytes(tiny) + 3 * norms + kv);
  });

  it('one rank per GPU: the GPU with the least room sets the blocks; ranks on one GPU share its memory', () => {
    const GiB = 2 ** 30;
    const rank = (ordinal: number, freeGiB: number) => ({
      ordinal,
      freeBytes: freeGiB * GiB,
      weightBytes: 4 * GiB,
      blockBytes: 2 ** 20,
    });
    // (free - 4 GiB weights - 2 GiB reserve) * 0.5 / 1 MiB.
    expect(kvBlocksFromFreeMemory([rank(0, 70), rank(1, 30)], 2 * GiB, 0.5)).toEqual({
      numBlocks: 12 * 1024,
      ordinal: 1,
      freeBytes: 30 * GiB,
      weightBytes: 4 * GiB,
    });
    // Both ranks on GPU 0: twice the weights and reserve, twice the bytes per block.
    expect(kvBlocksFromFreeMemory([rank(0, 70), rank(0, 70)], 2 * GiB, 0.5).numBlocks).toBe(29 * 512);
    expect(kvBlocksFromFreeMemory([rank(0, 5)], 2 * GiB, 0.5).numBlocks).toBeLessThan(1);
  });
});

describe('CudaModelRunner.create with ranks on several GPUs, before any device is opened', () => {
  const create = (extra: Partial<Parameters<typeof CudaModelRunner.create>[0]>) =>
    CudaModelRunner.create({ config: tiny, weights: 'dummy:tiny', numBlocks: 4, ...extra });

  it("'nccl' with two ranks on one GPU, 'local' with ranks on two, a bad communicator: typed errors", async () => {
    const twoOnOne = await rejection(create({ parallel: { tp: 2 }, devices: [0, 0], communicator: 'nccl' }));
    expect(twoOnOne).toBeInstanceOf(ParallelLayoutError);
    expect(twoOnOne.code).toBe('TANDEM_BAD_PARALLEL_LAYOUT');
    expect(twoOnOne.message).toMatch(/^CudaModelRunner\.create: NCCL runs one tensor-parallel rank per GPU/);
    const local = await rejection(create({ parallel: { tp: 2 }, devices: [0, 1], communicator: 'local' }));
    expect(local).toBeInstanceOf(ParallelLayoutError);
    const bad = await rejection(create({ communicator: 'shm' as 'nccl' }));
    expect(bad).toBeInstanceOf(BadArgumentError);
  });

  it.skipIf(nccl.available)(
    'without NCCL: NcclUnavailableError naming libnccl.so.2, for TP 2 and for a forced one-rank group',
    async () => {
      for (const extra of [{ parallel: { tp: 2 }, devices: [0, 1] }, { communicator: 'nccl' as const }]) {
        const error = await rejection(create(extra));
        expect(error).toBeInstanceOf(NcclUnavailableError);
        expect(error).toBeInstanceOf(BackendUnavailableError);
        expect(error.code).toBe('TANDEM_NCCL_UNAVAILABLE');
        expect(error.message).toMatch(/^NCCL unavailable: libnccl\.so\.2 not found/);
      }
    },
  );

  it.skipIf(!nccl.available || cuda.available)('NCCL but no GPU: the GPU is what is missing', async () => {
    const error = await rejection(create({ parallel: { tp: 2 }, devices: [0, 1] }));
    expect(error.code).toBe('TANDEM_CUDA_UNAVAILABLE');
  });

  it.skipIf(!nccl.available || !cuda.available)('more ordinals than GPUs: a ParallelLayoutError', async () => {
    const count = cuda.deviceCount;
    const devices = [...Array(count + 1).keys()].slice(-2); // the last GPU and one past it
    const error = await rejection(create({ parallel: { tp: 2 }, devices }));
    expect(error).toBeInstanceOf(ParallelLayoutError);
    expect(error.message).toMatch(new RegExp(`GPU ${count} is not there`));
  });

  it.skipIf(cuda.available)(
    "openModel hands a replica's GPU list to the runner: TP 2 on GPUs 0, 1 gets past the layout checks to NCCL and the GPU",
    async () => {
      const error = await rejection(
        openModel({ model: 'dummy:tiny', device: 'cuda', tensorParallelSize: 2, gpus: [0, 1] }),
      );
      expect(error).not.toBeInstanceOf(ParallelLayoutError);
      expect(error.code).toBe(nccl.available ? 'TANDEM_CUDA_UNAVAILABLE' : 'TANDEM_NCCL_UNAVAILABLE');
    },
  );
});

describe('the native group (CudaTpGroup)', () => {
  const { CudaTpGroup } = loadBinding().binding;

  it("is local by default; 'nccl' without NCCL is a TANDEM_NCCL_UNAVAILABLE error; anything else a bad argument", () => {
    expect(new CudaTpGroup(2).communicator).toBe('local');
    expect(new CudaTpGroup(2, { communicator: 'local' })).toMatchObject({ size: 2, communicator: 'local' });
    expect(() => nativeSync(() => new CudaTpGroup(2, { communicator: 'mpi' as 'local' }))).toThrow(BadArgumentError);
    expect(() =>
      nativeSync(() => new CudaTpGroup(2, { communicator: 'nccl', nccl: ['libnccl.so.2'], timeoutMs: 0 })),
    ).toThrow(/timeoutMs must be a positive integer/);
    if (!nccl.available)
      expect(() =>
        nativeSync(() => new CudaTpGroup(2, { communicator: 'nccl', nccl: ['libnccl.so.2'], timeoutMs: 1000 })),
      ).toThrow(NcclUnavailableError);
  });
});
