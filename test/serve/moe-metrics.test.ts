import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { defaultGraph, type DeploymentGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { METRIC_NAMES, ServeMetrics } from '../../lib/frontend/metrics.js';
import { sample } from '../helpers/serve.js';

// Expert load in /metrics (issue 28): a CPU deployment of dummy:tiny-moe reports, with its workers' heartbeats,
// each MoE layer's max/mean tokens per expert over the window and the tokens routed; one series per worker and
// layer, none per expert. A dense model has no such series. Loopback only; every wait is bounded.
const WAIT = { timeout: 30_000, interval: 50 };

function graph(model: string): DeploymentGraph {
  const g = defaultGraph({ gpus: 0, mode: 'agg', port: 0, model });
  for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 256, threads: 1 };
  return g;
}

const scrape = async (d: Deployment) => (await fetch(`${d.frontend.url}/metrics`)).text();
const series = (text: string, name: string) => text.split('\n').filter((l) => l.startsWith(`${name}{`));

describe('MoE expert load in /metrics', () => {
  let moe: Deployment;
  let dense: Deployment;

  beforeAll(async () => {
    [moe, dense] = await Promise.all([
      startDeployment(graph('dummy:tiny-moe'), { log: () => {}, heartbeatMs: 50 }),
      startDeployment(graph('dummy:tiny'), { log: () => {}, heartbeatMs: 50 }),
    ]);
  }, 120_000);
  afterAll(async () => {
    await Promise.all([moe?.stop({ drainMs: 500 }), dense?.stop({ drainMs: 500 })]);
  });

  it('a MoE worker reports per-layer imbalance and tokens routed; cardinality is workers x layers', async () => {
    const config = dummyConfig('dummy:tiny-moe');
    const { numExperts, topK } = config.moe!;
    const worker = Object.keys(moe.pids())[0]!;
    const client = new OpenAI({ baseURL: `${moe.frontend.url}/v1`, apiKey: 'none', maxRetries: 0 });
    const r = await client.completions.create({
      model: 'dummy:tiny-moe',
      prompt: 'experts share the load unevenly',
      max_tokens: 16,
      temperature: 0,
      ignore_eos: true,
    } as OpenAI.CompletionCreateParamsNonStreaming);
    const tokens = r.usage!.prompt_tokens + r.usage!.completion_tokens;
    let text = '';
    // Every token of the request passed every MoE layer: topK assignments per layer at least (the last generated
    // token is not fed back).
    const routed = `${METRIC_NAMES.moeTokensRouted}{worker="${worker}"}`;
    await vi.waitFor(async () => {
      text = await scrape(moe);
      expect(sample(text, routed)).toBeGreaterThanOrEqual((tokens - 1) * topK * config.numLayers);
    }, WAIT);
    const imbalance = series(text, METRIC_NAMES.moeExpertImbalance);
    expect(imbalance).toHaveLength(config.numLayers);
    for (let layer = 0; layer < config.numLayers; layer++) {
      const v = sample(text, `${METRIC_NAMES.moeExpertImbalance}{worker="${worker}",layer="${layer}"}`);
      // max/mean over numExperts experts lies in [1, numExperts].
      expect(v).toBeGreaterThanOrEqual(1);
      expect(v).toBeLessThanOrEqual(numExperts);
    }
    // No label names an expert.
    expect(text).not.toMatch(/tandem_moe_[a-z_]+\{[^}]*expert=/);
  }, 60_000);

  it('a dense model has no expert series', async () => {
    const client = new OpenAI({ baseURL: `${dense.frontend.url}/v1`, apiKey: 'none', maxRetries: 0 });
    await client.completions.create({ model: 'dummy:tiny', prompt: 'dense', max_tokens: 4 });
    const text = await scrape(dense);
    expect(series(text, METRIC_NAMES.moeExpertImbalance)).toEqual([]);
    expect(series(text, METRIC_NAMES.moeTokensRouted)).toEqual([]);
  });

  it("ServeMetrics: tokens routed counts a worker's cumulative total once, across a restart; series go with it", async () => {
    const m = new ServeMetrics();
    m.expertLoad('w', { imbalance: [1.5, 2], tokensRouted: 100 });
    m.expertLoad('w', { imbalance: [1.25, 2], tokensRouted: 160 });
    let text = await m.text();
    expect(sample(text, `${METRIC_NAMES.moeTokensRouted}{worker="w"}`)).toBe(160);
    expect(sample(text, `${METRIC_NAMES.moeExpertImbalance}{worker="w",layer="0"}`)).toBe(1.25);
    // A restarted worker starts from 0: the counter goes on from where it was.
    m.expertLoad('w', { imbalance: [1, 1], tokensRouted: 30 });
    text = await m.text();
    expect(sample(text, `${METRIC_NAMES.moeTokensRouted}{worker="w"}`)).toBe(190);
    m.dropWorker('w');
    text = await m.text();
    expect(series(text, METRIC_NAMES.moeExpertImbalance)).toEqual([]);
    expect(series(text, METRIC_NAMES.moeTokensRouted)).toEqual([]);
  });
});
