/**
 * Parallelism per pool (issue 25): a graph's tensorParallelSize / pipelineParallelSize are checked against the
 * model, and on CPU a tensor-parallel prefill pool (two ranks on threads of the worker) hands its KV blocks to a
 * single-rank decode pool: the KV pool layout does not depend on the layout of the engine that wrote it, so
 * disaggregated serving returns what aggregated serving on one rank returns. Loopback only; every wait is bounded.
 */
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { defaultGraph, parseGraph, GraphError, type DeploymentGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { prefillCounts } from '../helpers/serve.js';

const FIXTURE = join(import.meta.dirname, '..', 'fixtures', 'hf-tiny-llama');

function errorOf(text: string): string {
  try {
    parseGraph(text);
  } catch (error) {
    expect(error).toBeInstanceOf(GraphError);
    return (error as Error).message;
  }
  throw new Error('the graph parsed');
}

describe('graph: parallelism per pool', () => {
  const graph = (model: string, prefill: string) => `model: ${model}
pools:
  - name: p
    role: prefill
    device: cpu
${prefill}
  - name: d
    role: decode
    device: cpu
`;

  it('CPU pools take tensor and pipeline parallel sizes without GPUs; GPU pools need one GPU per rank', () => {
    const g = parseGraph(graph('dummy:tiny', '    tensorParallelSize: 4\n    pipelineParallelSize: 2'));
    expect(g.pools[0]).toMatchObject({ tensorParallelSize: 4, pipelineParallelSize: 2, gpusPerReplica: 0 });
    expect(g.pools[1]).toMatchObject({ tensorParallelSize: 1, pipelineParallelSize: 1 });
    const gpu = parseGraph(
      graph('dummy:tiny', '    tensorParallelSize: 2\n    pipelineParallelSize: 2').replace(
        'device: cpu',
        'device: cuda',
      ),
    );
    expect(gpu.pools[0]!.gpusPerReplica).toBe(4);
  });

  it('sizes that do not fit the model are errors at the field, with the model dimension', () => {
    expect(errorOf(graph('dummy:tiny', '    pipelineParallelSize: 3'))).toBe(
      "graph.yaml:6:27: pools[0].pipelineParallelSize: pipeline parallel size 3 is more stages than the model's 2 layers",
    );
    expect(errorOf(graph(FIXTURE, '    tensorParallelSize: 8'))).toBe(
      "graph.yaml:6:25: pools[0].tensorParallelSize: tensor parallel size 8 does not divide the model's 4 attention heads",
    );
    expect(errorOf(graph('dummy:tiny', '    pipelineParallelSize: 0'))).toBe(
      'graph.yaml:6:27: pools[0].pipelineParallelSize: must be a positive integer',
    );
  });
});

function servingGraph(mode: 'disagg' | 'agg'): DeploymentGraph {
  const g = defaultGraph({ gpus: 0, mode, port: 0, model: FIXTURE });
  // Every prompt goes to the prefill worker.
  g.disaggregation = { ...g.disaggregation, minRemotePrefillTokens: 1 };
  for (const p of g.pools) {
    p.engine = { ...p.engine, numBlocks: 256, threads: p.role === 'prefill' ? 2 : 1 };
    if (p.role === 'prefill') p.tensorParallelSize = 2;
  }
  return g;
}

const PROMPTS = ['The KV cache moves from prefill to decode', 'Hello, world! The quick brown fox'];

describe('a TP 2 prefill pool and a TP 1 decode pool on CPU', () => {
  let disagg: Deployment;
  let agg: Deployment;
  const lines: string[] = [];

  beforeAll(async () => {
    [disagg, agg] = await Promise.all([
      startDeployment(servingGraph('disagg'), { log: (l) => lines.push(l), heartbeatMs: 200 }),
      startDeployment(servingGraph('agg'), { log: () => {}, heartbeatMs: 200 }),
    ]);
  }, 120_000);

  afterAll(async () => {
    await Promise.all([disagg?.stop({ drainMs: 1000 }), agg?.stop({ drainMs: 1000 })]);
  });

  it('serves what aggregated serving on one rank serves (tokens exactly, logprobs within fp32 rounding)', async () => {
    expect(
      lines.some((l) => /^\[prefill-0\] .*open on cpu as tp 2 x pp 1 \(2 ranks/.test(l)),
      lines.join('\n'),
    ).toBe(true);
    expect(lines.some((l) => /^\[decode-0\] .*open on cpu in \d+ ms$/.test(l))).toBe(true);
    const client = new OpenAI({ baseURL: `${disagg.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 30_000 });
    const aggClient = new OpenAI({ baseURL: `${agg.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 30_000 });
    const before = await prefillCounts(disagg);
    let requests = 0;
    for (const prompt of PROMPTS)
      for (const sampling of [{ temperature: 0 }, { temperature: 0.9, top_p: 0.95, seed: 7 }]) {
        const args = { model: FIXTURE, prompt, max_tokens: 16, logprobs: 3, ...sampling };
        const [a, b] = await Promise.all([client.completions.create(args), aggClient.completions.create(args)]);
        requests++;
        const what = `${prompt} ${JSON.stringify(sampling)}`;
        expect(a.choices[0]!.text, what).toBe(b.choices[0]!.text);
        expect(a.choices[0]!.logprobs!.tokens, what).toEqual(b.choices[0]!.logprobs!.tokens);
        const la = a.choices[0]!.logprobs!.token_logprobs!;
        const lb = b.choices[0]!.logprobs!.token_logprobs!;
        expect(la.length).toBe(lb.length);
        la.forEach((v, i) => expect(v, `${what} token ${i}`).toBeCloseTo(lb[i]!, 3));
      }
    // Every one of them was prefilled by the TP 2 pool.
    await vi.waitFor(async () => expect((await prefillCounts(disagg)).remote - before.remote).toBe(requests), {
      timeout: 5000,
      interval: 20,
    });
  });
});

describe('an EP 2 prefill pool and an EP 1 decode pool of an MoE model on CPU', () => {
  const MOE = 'dummy:tiny-moe';
  let disagg: Deployment;
  let agg: Deployment;
  const lines: string[] = [];
  const moeGraph = (mode: 'disagg' | 'agg'): DeploymentGraph => {
    const g = defaultGraph({ gpus: 0, mode, port: 0, model: MOE });
    g.disaggregation = { ...g.disaggregation, minRemotePrefillTokens: 1 };
    for (const p of g.pools) {
      p.engine = { ...p.engine, numBlocks: 64, threads: p.role === 'prefill' ? 2 : 1 };
      if (p.role === 'prefill') p.expertParallelSize = 2;
    }
    return g;
  };

  beforeAll(async () => {
    [disagg, agg] = await Promise.all([
      startDeployment(moeGraph('disagg'), { log: (l) => lines.push(l), heartbeatMs: 200 }),
      startDeployment(moeGraph('agg'), { log: () => {}, heartbeatMs: 200 }),
    ]);
  }, 120_000);

  afterAll(async () => {
    await Promise.all([disagg?.stop({ drainMs: 1000 }), agg?.stop({ drainMs: 1000 })]);
  });

  it('the prefill worker runs its experts on 2 ranks and serves what one rank serves', async () => {
    expect(
      lines.some((l) => /^\[prefill-0\] .*open on cpu as tp 1 x ep 2 x pp 1 \(2 ranks/.test(l)),
      lines.join('\n'),
    ).toBe(true);
    const client = new OpenAI({ baseURL: `${disagg.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 30_000 });
    const aggClient = new OpenAI({ baseURL: `${agg.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 30_000 });
    const before = await prefillCounts(disagg);
    for (const prompt of PROMPTS) {
      const args = { model: MOE, prompt, max_tokens: 8, temperature: 0 };
      const [a, b] = await Promise.all([client.completions.create(args), aggClient.completions.create(args)]);
      expect(a.choices[0]!.text, prompt).toBe(b.choices[0]!.text);
    }
    await vi.waitFor(async () => expect((await prefillCounts(disagg)).remote - before.remote).toBe(PROMPTS.length), {
      timeout: 5000,
      interval: 20,
    });
  });
});
