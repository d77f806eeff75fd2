/**
 * What the GPU tests of tensor- and pipeline-parallel engines behind openModel and serving (test/gpu/12, 15) share:
 * greedy agreement up to a near-tie, and deployments whose prefill and decode pools differ in layout on one GPU,
 * compared with aggregated serving at TP 1 through the openai client.
 */
import OpenAI from 'openai';
import { afterAll, beforeAll, expect, vi } from 'vitest';
import { parseGraph, type DeploymentGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import type { OpenedModel } from '../../lib/engine/open.js';
import { prefillCounts } from './serve.js';

/** A greedy choice the reference wins by less than this (logprob) may go the other way under TP / PP n's rounding. */
export const NEAR_TIE = 0.1;

/**
 * Greedy requests of `prompts` (24 tokens, 2 logprobs) on `many` and on `one`, twice (the second time the prompts'
 * full blocks come from the prefix cache). A fixture's prompt is conditioned against near-ties; other prompts are
 * not, and TP n / PP n sum in another order than `one`, so bf16 rounding may flip a near-tie: the tokens are
 * identical up to `one`'s first choice won by under NEAR_TIE, the logprobs close until then.
 */
export async function expectSameGreedyUpToNearTie(
  many: OpenedModel,
  one: OpenedModel,
  prompts: number[][],
): Promise<void> {
  const run = (m: OpenedModel) =>
    Promise.all(
      prompts.map((promptTokenIds) =>
        m.engine.addRequest({ promptTokenIds, sampling: { temperature: 0, maxTokens: 24, logprobs: 2 } }).result(),
      ),
    );
  for (let round = 0; round < 2; round++) {
    const [a, b] = [await run(many), await run(one)];
    a.forEach((r, i) => {
      const ref = b[i]!;
      const tie = ref.logprobs!.findIndex((lp) => lp.topLogprobs[0]! - lp.topLogprobs[1]! < NEAR_TIE);
      const upTo = tie < 0 ? ref.tokenIds.length : tie + 1;
      expect(r.tokenIds.slice(0, upTo), `round ${round} prompt ${i}`).toEqual(ref.tokenIds.slice(0, upTo));
      r.logprobs!.slice(0, upTo).forEach((lp, j) =>
        expect(Math.abs(lp.logprob - ref.logprobs![j]!.logprob)).toBeLessThan(0.05),
      );
    });
  }
}

/** A pool's parallel layout; `pp` absent leaves pipelineParallelSize out of the graph. */
export interface PoolLayout {
  tp: number;
  pp?: number;
}

function oneGpuGraph(model: string, mode: 'disagg' | 'agg', pools: [string, string, PoolLayout][]): DeploymentGraph {
  const pool = ([name, role, l]: [string, string, PoolLayout]) =>
    `  - { name: ${name}, role: ${role}, device: cuda, gpuIds: [0], gpusPerReplica: 1, tensorParallelSize: ${l.tp}, ${l.pp === undefined ? '' : `pipelineParallelSize: ${l.pp}, `}engine: { numBlocks: 256 } }`;
  return parseGraph(`model: ${model}
mode: ${mode}
frontend: { host: 127.0.0.1, port: 0 }
disaggregation: { minRemotePrefillTokens: 1 }
pools:
${pools.map(pool).join('\n')}
`);
}

/** One aggregated pool on GPU 0, its ranks on it (gpusPerReplica 1). */
export const aggregatedGraph = (model: string, layout: PoolLayout): DeploymentGraph =>
  oneGpuGraph(model, 'agg', [['agg', 'aggregated', layout]]);

/** Every prompt goes to the prefill worker; both pools on GPU 0, each pool's ranks on it (gpusPerReplica 1). */
export const disaggregatedGraph = (model: string, prefill: PoolLayout, decode: PoolLayout): DeploymentGraph =>
  oneGpuGraph(model, 'disagg', [
    ['prefill', 'prefill', prefill],
    ['decode', 'decode', decode],
  ]);

/** The prompts expectServesLikeAggregated sends (each twice). */
export const SERVING_PROMPTS = [
  'The KV cache moves from prefill to decode',
  'Disaggregated serving runs the prompt phase on one pool and the generation phase on another one',
  'Hello, world! The quick brown fox',
];

/** The deployments layoutDeployments started: the aggregated one, and a disaggregated one and its log by key. */
export interface LayoutDeployments {
  agg(): Deployment;
  disagg(key: string): { deployment: Deployment; log: string };
}

/**
 * Starts, in the calling describe's beforeAll, an aggregated deployment and one disaggregated deployment per key
 * (each keeping its log lines); stops them all in afterAll.
 */
export function layoutDeployments(
  aggGraph: () => DeploymentGraph,
  disaggGraphs: [key: string, graph: () => DeploymentGraph][],
): LayoutDeployments {
  const disagg = new Map<string, Deployment>();
  const lines = new Map<string, string[]>();
  let agg: Deployment;

  beforeAll(async () => {
    agg = await startDeployment(aggGraph(), { log: () => {}, heartbeatMs: 200 });
    for (const [key, graph] of disaggGraphs) {
      const log: string[] = [];
      lines.set(key, log);
      disagg.set(key, await startDeployment(graph(), { log: (l) => log.push(l), heartbeatMs: 200 }));
    }
  }, 240_000);

  afterAll(async () => {
    await Promise.all([agg?.stop({ drainMs: 1000 }), ...[...disagg.values()].map((d) => d.stop({ drainMs: 1000 }))]);
  });

  return {
    agg: () => agg,
    disagg: (key) => ({ deployment: disagg.get(key)!, log: lines.get(key)!.join('\n') }),
  };
}

/** The worker's open line in a deployment's log: its layout for more than one rank, else its load time. */
export function expectWorkerOpened(log: string, worker: string, layout: PoolLayout): void {
  const pp = layout.pp ?? 1;
  expect(log).toMatch(
    layout.tp * pp > 1
      ? new RegExp(`\\[${worker}\\] .*open on cuda as tp ${layout.tp} x pp ${pp} \\(${layout.tp * pp} ranks`)
      : new RegExp(`\\[${worker}\\] .*open on cuda in \\d+ ms`),
  );
}

/** The openai client of a deployment's frontend: no retries, a minute per request. */
export const frontendClient = (d: Deployment): OpenAI =>
  new OpenAI({ baseURL: `${d.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });

export type Completion = OpenAI.Completions.Completion;

/**
 * The disaggregated deployment `key` serves what the aggregated one serves, through the openai client: each
 * worker's open line; every SERVING_PROMPTS prompt twice (the second time the decode worker's prefix cache holds
 * its full blocks, and only the rest is prefilled and written) with identical greedy text and completion tokens
 * and token logprobs within 0.05 (bf16 rounding), `onCompletion` adding its checks; a chat completion with the same
 * content. The first round and the chat were prefilled by the prefill pool (a repeated prompt whose every token is
 * in the decode worker's prefix cache prefills locally): the remote prefill count grows by as many, waited for (5 s
 * at most) because a prefill's prefillDone may reach the router after the last token. Returns the requests made.
 */
export async function expectServesLikeAggregated(
  deployments: LayoutDeployments,
  key: string,
  model: string,
  layouts: { prefill: PoolLayout; decode: PoolLayout },
  onCompletion: (a: Completion, b: Completion) => void = () => {},
): Promise<number> {
  const { deployment, log } = deployments.disagg(key);
  expectWorkerOpened(log, 'prefill-0', layouts.prefill);
  expectWorkerOpened(log, 'decode-0', layouts.decode);
  const client = frontendClient(deployment);
  const aggClient = frontendClient(deployments.agg());
  const before = await prefillCounts(deployment);
  let requests = 0;
  for (const prompt of [...SERVING_PROMPTS, ...SERVING_PROMPTS]) {
    const args = { model, prompt, max_tokens: 24, temperature: 0, logprobs: 2 };
    const [a, b] = await Promise.all([client.completions.create(args), aggClient.completions.create(args)]);
    requests++;
    expect(a.choices[0]!.text, `${key}: ${prompt}`).toBe(b.choices[0]!.text);
    onCompletion(a, b);
    expect(a.usage!.completion_tokens).toBe(b.usage!.completion_tokens);
    const la = a.choices[0]!.logprobs!.token_logprobs!;
    const lb = b.choices[0]!.logprobs!.token_logprobs!;
    la.forEach((v, i) => expect(Math.abs(v - lb[i]!), `${key}: ${prompt} token ${i}`).toBeLessThan(0.05));
  }
  const chat = { model, messages: [{ role: 'user' as const, content: 'What is a KV cache?' }] };
  const [sa, sb] = await Promise.all([
    client.chat.completions.create({ ...chat, max_tokens: 12, temperature: 0 }),
    aggClient.chat.completions.create({ ...chat, max_tokens: 12, temperature: 0 }),
  ]);
  requests++;
  expect(sa.choices[0]!.message.content).toBe(sb.choices[0]!.message.content);
  await vi.waitFor(
    async () =>
      expect((await prefillCounts(deployment)).remote - before.remote).toBeGreaterThanOrEqual(
        SERVING_PROMPTS.length + 1,
      ),
    { timeout: 5000, interval: 20 },
  );
  return requests;
}
