import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openModel } from '../../lib/engine/open.js';
import { CudaModelRunner } from '../../lib/engine/cuda.js';
import { gpuGate } from '../helpers/gpu.js';
import { hfFixture } from '../helpers/gpu-logits.js';
import {
  aggregatedGraph,
  disaggregatedGraph,
  expectSameGreedyUpToNearTie,
  expectServesLikeAggregated,
  layoutDeployments,
  SERVING_PROMPTS,
} from '../helpers/parallel-serve.js';

// Tensor parallelism on the GPU engine, wired into openModel and serving (issue 25), on ONE GPU: the ranks are
// CudaLlama instances on the same device summing through the local communicator (test/gpu/11 checks the runner
// itself). (a) openModel with tensorParallelSize 2 and 4 gives TP 1's greedy tokens (and transformers') through
// LlmEngine, the scheduler, the sampler on the device and the prefix cache. (b) Graphs whose prefill and decode
// pools differ in TP (TP 2 -> TP 1, TP 1 -> TP 2, and TP 4 -> TP 2, where the fixture's 2 kv heads are replicated on
// the TP 4 ranks) serve through the official openai client what aggregated serving at TP 1 serves: the prefill
// worker writes each of its rank pools' head slices into the decode worker's rank pools (kvRankTransferPieces,
// one region per rank, cuda-ipc on one GPU). Greedy text must be identical; logprobs agree within bf16 rounding
// (TP n sums its partial products in another order than TP 1). Loopback only; every wait is bounded; the
// deployments stop at the end. Skipped without a GPU.
const gate = await gpuGate(1);

const FIXTURE = join(import.meta.dirname, '..', 'fixtures', 'hf-tiny-llama');

describe.skipIf(!gate.run)('openModel: tensor-parallel ranks on one GPU', () => {
  describe.each(['hf-tiny-llama', 'hf-tiny-qwen2'])('%s', (name) => {
    const { dir, expected } = hfFixture(name);

    it.each([2, 4])(
      'TP %i through the engine gives TP 1 greedy tokens (and transformers), batched and from the prefix cache',
      async (tp) => {
        const lines: string[] = [];
        await using one = await openModel({ model: dir, device: 'cuda', numBlocks: 64 });
        await using many = await openModel({
          model: dir,
          device: 'cuda',
          numBlocks: 64,
          tensorParallelSize: tp,
          log: (l) => lines.push(l),
        });
        expect(many.device).toBe('cuda');
        expect(many.parallel).toEqual({ tp, pp: 1, ep: 1 });
        expect(lines.at(-1)).toMatch(new RegExp(`^model .* open on cuda as tp ${tp} x pp 1 \\(${tp} ranks; `));
        const runner = many.runner as CudaModelRunner;
        expect(runner.tensorParallelSize).toBe(tp);
        expect(many.kvRankPoolSpecs).toHaveLength(tp);
        many.kvRankPoolSpecs.forEach((spec, r) =>
          expect(spec).toMatchObject({ tpSize: tp, tpRank: r, dtype: 'bf16', kvHeads: one.config.numKvHeads }),
        );
        expect(runner.kvDeviceBuffers).toHaveLength(tp);

        const greedy = { temperature: 0, maxTokens: 32 };
        const first = await many.engine.addRequest({ promptTokenIds: expected.promptIds, sampling: greedy }).result();
        expect(first.tokenIds).toEqual(expected.greedy);
        const prompts = [
          expected.promptIds,
          many.tokenizer.encode('The KV cache moves from prefill to decode, block by block, layer by layer'),
          many.tokenizer.encode('Hello, world! The quick brown fox'),
        ];
        // Twice: the second time the prompts' full blocks come from the prefix cache. The fixture's prompt is
        // conditioned against near-ties (identical, above); the other two are not (expectSameGreedyUpToNearTie).
        await expectSameGreedyUpToNearTie(many, one, prompts);
        // Collective time (bench:engine's "coll %" on the GPU): the first take starts the timing and gives zeros;
        // a request's passes then show on every rank (all-reduces and the logits gather); a take resets.
        const zeros = Array.from({ length: tp }, () => ({ allReduceMs: 0, gatherMs: 0, barrierMs: 0, handoverMs: 0 }));
        expect(await runner.takeCollectiveTime()).toEqual(zeros);
        await many.engine
          .addRequest({ promptTokenIds: expected.promptIds, sampling: { ...greedy, maxTokens: 4 } })
          .result();
        const times = await runner.takeCollectiveTime();
        expect(times).toHaveLength(tp);
        for (const t of times) {
          expect(t.allReduceMs).toBeGreaterThan(0);
          expect(t.gatherMs).toBeGreaterThan(0);
        }
        expect(await runner.takeCollectiveTime()).toEqual(zeros);
      },
      120_000,
    );
  });
});

describe.skipIf(!gate.run)('pools of different TP on one GPU: disaggregated == aggregated', () => {
  const layouts = [
    [2, 1],
    [1, 2],
    [4, 2],
  ] as const;
  const key = (p: number, d: number) => `${p}->${d}`;
  const deployments = layoutDeployments(
    () => aggregatedGraph(FIXTURE, { tp: 1 }),
    layouts.map(([p, d]) => [key(p, d), () => disaggregatedGraph(FIXTURE, { tp: p }, { tp: d })]),
  );

  it.each(layouts)(
    'prefill TP %i -> decode TP %i: every prompt prefilled remotely, greedy text equals TP 1 aggregated serving',
    async (p, d) => {
      // Each prompt twice (the second time from the decode worker's prefix cache), then a chat completion.
      const requests = await expectServesLikeAggregated(
        deployments,
        key(p, d),
        FIXTURE,
        { prefill: { tp: p }, decode: { tp: d } },
        (a, b) => expect(a.usage!.prompt_tokens).toBe(b.usage!.prompt_tokens),
      );
      expect(requests).toBe(2 * SERVING_PROMPTS.length + 1);
    },
    120_000,
  );
});
