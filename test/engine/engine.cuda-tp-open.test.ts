/**
 * Tensor parallelism on the GPU engine, wired into openModel and serving (issue 25): what can be checked without a
 * GPU. openModel refuses the layouts the GPU engine does not run (split expert channels, pipeline stages of an MoE
 * model, more ranks than a runner group or one GPU's pipeline takes, ranks some of which share a GPU) with a
 * ParallelLayoutError before any device is opened; a graph
 * pool runs its tensor-parallel ranks on one GPU with gpusPerReplica 1 and hands a replica of several GPUs their list;
 * a registration's rank pools survive the control plane's wire. The GPU side: test/gpu/12.serve.tp.gpu.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { ParallelLayoutError, TandemError } from '../../lib/errors.js';
import { openModel } from '../../lib/engine/open.js';
import { capabilities } from '../../lib/index.js';
import { kvPool } from '../../lib/kv/index.js';
import { decodeRegistration, encodeRegistration, BadRegistrationError } from '../../lib/control/wire.js';
import { parseGraph } from '../../lib/deploy/graph.js';
import { workerInit } from '../../lib/deploy/launcher.js';
import { workerRegistration } from '../control/registration.js';

async function layoutError(options: Parameters<typeof openModel>[0]): Promise<string> {
  const error = await openModel(options).then(
    (opened) => {
      void opened.dispose();
      throw new Error('openModel opened the model');
    },
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(ParallelLayoutError);
  expect((error as TandemError).code).toBe('TANDEM_BAD_PARALLEL_LAYOUT');
  return (error as Error).message;
}

describe('openModel on the GPU engine with a parallel layout', () => {
  it('split expert channels, pipeline stages of an MoE model and pipeline x expert parallelism are refused before any device is opened', async () => {
    expect(await layoutError({ model: 'dummy:tiny-moe', device: 'cuda', tensorParallelSize: 2 })).toMatch(
      /^dummy:tiny-moe: tp 2 x pp 1 .* is not on the GPU engine: its ranks split a mixture-of-experts model's experts \(expertParallelSize = tensorParallelSize, --ep 2\); tensor parallelism of the experts' channels runs on CPU ranks \(--device cpu\)$/,
    );
    expect(await layoutError({ model: 'dummy:tiny-moe', device: 'cuda', pipelineParallelSize: 2 })).toBe(
      'dummy:tiny-moe: the GPU engine runs mixture-of-experts models in one pipeline stage; run pipeline parallelism ' +
        "of this model on CPU ranks (device 'cpu')",
    );
    expect(
      await layoutError({ model: 'dummy:tiny-moe', device: 'cuda', expertParallelSize: 2, pipelineParallelSize: 2 }),
    ).toMatch(
      /is not on the GPU engine, which runs expert-parallel ranks in one pipeline stage; run pipeline and expert parallelism together on CPU ranks/,
    );
  });

  it('pipeline layouts that do not fit are refused before a device opens: more stages than layers, too many ranks', async () => {
    expect(await layoutError({ model: 'dummy:tiny', device: 'cuda', pipelineParallelSize: 3 })).toBe(
      "dummy:tiny: pipeline parallel size 3 is more stages than the model's 2 layers",
    );
    expect(
      await layoutError({
        model: 'dummy:llama-3.2-1b',
        device: 'cuda',
        tensorParallelSize: 8,
        pipelineParallelSize: 4,
      }),
    ).toBe(
      'dummy:llama-3.2-1b: tp 8 x pp 4 is 32 ranks; the GPU engine runs at most 16 on one GPU (tensor-parallel ranks at most 8)',
    );
    expect(
      await layoutError({
        model: 'dummy:tiny',
        device: 'cuda',
        tensorParallelSize: 2,
        pipelineParallelSize: 2,
        gpus: [0, 0],
      }),
    ).toBe('dummy:tiny: 2 devices for 4 tensor-parallel ranks');
  });

  it.for([
    [1, 2],
    [2, 2],
    [1, 4],
  ])(
    'tp %s x ep %s of an MoE model on device cuda gets past the layout checks (no GPU: unavailable)',
    async ([tp, ep], ctx) => {
      const caps = await capabilities();
      if (caps.cuda.available) ctx.skip(); // with a GPU it opens (test/gpu/14.engine.ep.gpu.test.ts)
      const error = await openModel({
        model: 'dummy:tiny-moe',
        device: 'cuda',
        tensorParallelSize: tp,
        expertParallelSize: ep,
        eplb: { windowSteps: 2, periodSteps: 2, redundantSlotsPerRank: 1, minImbalanceGain: 0 },
      }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(TandemError);
      expect(error).not.toBeInstanceOf(ParallelLayoutError);
      expect((error as TandemError).code).toMatch(/UNAVAILABLE/);
    },
  );

  it('more ranks than a runner group takes, or ranks that neither communicator runs, are refused before a device opens', async () => {
    // 32 heads, 8 kv heads: tp 16 fits the model but not the one-device group.
    expect(await layoutError({ model: 'dummy:llama-3.2-1b', device: 'cuda', tensorParallelSize: 16 })).toBe(
      'dummy:llama-3.2-1b: tensor parallel size 16 is more than the 8 ranks the GPU engine runs',
    );
    expect(await layoutError({ model: 'dummy:tiny', device: 'cuda', tensorParallelSize: 4, gpus: [0, 0, 1, 1] })).toBe(
      'dummy:tiny: some tensor-parallel ranks share a GPU and others do not (0, 0, 1, 1); give each rank its own GPU ' +
        '(NCCL) or every rank the same one (the local communicator)',
    );
    expect(await layoutError({ model: 'dummy:tiny', device: 'cuda', tensorParallelSize: 2, gpus: [0] })).toBe(
      'dummy:tiny: 1 devices for 2 tensor-parallel ranks',
    );
    expect(await layoutError({ model: 'dummy:tiny', device: 'cuda', tensorParallelSize: 3 })).toMatch(
      /tensor parallel size 3 does not divide the model's 4 attention heads/,
    );
  });

  it('tp 2, pp 2 and tp 2 x pp 2 on device cuda get past the layout checks: without a GPU the error is the GPU being unavailable', async (ctx) => {
    const caps = await capabilities();
    if (caps.cuda.available) ctx.skip(); // with a GPU they open (test/gpu/12.serve.tp, test/gpu/15.engine.pp)
    for (const layout of [
      { tensorParallelSize: 2, gpus: [0, 0] },
      { pipelineParallelSize: 2 },
      { tensorParallelSize: 2, pipelineParallelSize: 2, gpus: [0, 0, 0, 0] },
    ]) {
      const error = await openModel({ model: 'dummy:tiny', device: 'cuda', ...layout }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(TandemError);
      expect(error).not.toBeInstanceOf(ParallelLayoutError);
      expect((error as TandemError).code).toMatch(/UNAVAILABLE/);
    }
  });

  it("device 'cpu' still runs the layout on CPU ranks: one rank pool, every head", async () => {
    const opened = await openModel({ model: 'dummy:tiny', device: 'cpu', numBlocks: 8, tensorParallelSize: 2 });
    try {
      expect(opened.parallel).toEqual({ tp: 2, pp: 1, ep: 1 });
      expect(opened.kvRankPoolSpecs).toEqual([opened.kvPoolSpec]);
      expect(kvPool(opened.kvPoolSpec).localHeads).toBe(opened.config.numKvHeads);
    } finally {
      await opened.dispose();
    }
  });
});

describe('serving: tensor-parallel GPU pools', () => {
  const graph = (extra: string) =>
    parseGraph(`model: dummy:tiny
pools:
  - name: p
    role: prefill
    device: cuda
    tensorParallelSize: 2
${extra}
  - name: d
    role: decode
    device: cuda
    gpuIds: [0]
`);

  it('gpusPerReplica 1 puts every rank on the replica GPU; several GPUs go to the worker as a list', () => {
    const one = graph('    gpusPerReplica: 1\n    gpuIds: [0]');
    expect(one.pools[0]).toMatchObject({ gpusPerReplica: 1, tensorParallelSize: 2 });
    const init = workerInit(one, one.pools[0]!, 0, {});
    expect(init).toMatchObject({ device: 'cuda', gpu: 0, tensorParallelSize: 2 });
    expect(init.gpus).toBeUndefined();
    const two = graph('    gpuIds: [2, 3]');
    expect(two.pools[0]!.gpusPerReplica).toBe(2);
    expect(workerInit(two, two.pools[0]!, 0, {})).toMatchObject({ gpu: 2, gpus: [2, 3], tensorParallelSize: 2 });
  });

  it("a registration's rank pools survive the control plane's wire; a malformed list is refused", () => {
    const pool = (tpRank: number) => ({
      layers: 2,
      kvHeads: 2,
      headDim: 16,
      numBlocks: 64,
      dtype: 'bf16' as const,
      layout: 'block-major' as const,
      headLayout: 'NHD' as const,
      tpSize: 2,
      tpRank,
    });
    const registration = {
      ...workerRegistration('prefill-0', 'prefill'),
      device: 'cuda' as const,
      kvRegion: 1,
      kvPool: pool(0),
      kvRanks: [
        { region: 1, pool: pool(0) },
        { region: 2, pool: pool(1) },
      ],
    };
    expect(decodeRegistration('k', encodeRegistration(registration))).toEqual(registration);
    const plain = workerRegistration('decode-0');
    expect(decodeRegistration('k', encodeRegistration(plain))).toEqual(plain);
    const bad = JSON.parse(encodeRegistration(registration)) as { kvRanks: unknown };
    bad.kvRanks = [{ region: 1 }];
    expect(() => decodeRegistration('k', JSON.stringify(bad))).toThrow(BadRegistrationError);
    bad.kvRanks = [];
    expect(() => decodeRegistration('k', JSON.stringify(bad))).toThrow(/kvRanks/);
  });
});
