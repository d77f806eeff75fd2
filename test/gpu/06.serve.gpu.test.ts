import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { defaultGraph, type DeploymentGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { metric } from '../helpers/serve.js';
import { gpuGate } from '../helpers/gpu.js';

// `npm start` on a 2-GPU host: prefill worker on GPU 0, decode worker on GPU 1, both with the GPU engine; the
// KV blocks are WRITten from GPU 0's pool into GPU 1's by the transfer runtime (cuda-ipc). Driven by the
// official openai client on loopback; disaggregated and aggregated serving must return the same text.
const gate = await gpuGate(2);
const FIXTURE = join(import.meta.dirname, '..', 'fixtures', 'hf-tiny-llama');

function graph(mode: 'disagg' | 'agg'): DeploymentGraph {
  const g = defaultGraph({ gpus: 2, mode, port: 0, model: FIXTURE });
  g.disaggregation = { ...g.disaggregation, minRemotePrefillTokens: 1 };
  for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 256 };
  return g;
}

const quiet = () => {};

const PROMPTS = [
  'The KV cache moves from prefill to decode',
  'Disaggregated serving runs the prompt phase on one pool and the generation phase on another one',
  'Hello, world! The quick brown fox',
];

describe.skipIf(!gate.run)('disaggregated serving end to end on two GPUs', () => {
  let disagg: Deployment;
  let agg: Deployment;

  beforeAll(async () => {
    const g = graph('disagg');
    expect(g.pools.map((p) => [p.role, p.device, p.gpuIds])).toEqual([
      ['prefill', 'cuda', [0]],
      ['decode', 'cuda', [1]],
    ]);
    [disagg, agg] = await Promise.all([
      startDeployment(g, { log: quiet, heartbeatMs: 200 }),
      startDeployment(graph('agg'), { log: quiet, heartbeatMs: 200 }),
    ]);
  }, 120_000);

  afterAll(async () => {
    await Promise.all([disagg?.stop({ drainMs: 1000 }), agg?.stop({ drainMs: 1000 })]);
  });

  it('every prompt is prefilled on GPU 0, its KV written to GPU 1, and the text equals aggregated serving', async () => {
    const client = new OpenAI({ baseURL: `${disagg.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
    const aggClient = new OpenAI({ baseURL: `${agg.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
    const before = await metric(disagg, 'tandem_prefills_total{where="remote"}');
    for (const prompt of PROMPTS) {
      for (const sampling of [{ temperature: 0 }, { temperature: 0.9, top_p: 0.95, seed: 7 }]) {
        const args = { model: FIXTURE, prompt, max_tokens: 24, ...sampling };
        const [a, b] = await Promise.all([client.completions.create(args), aggClient.completions.create(args)]);
        expect(a.choices[0]!.text, `${prompt} ${JSON.stringify(sampling)}`).toBe(b.choices[0]!.text);
        expect(a.usage).toEqual(b.usage);
      }
    }
    const stream = await client.chat.completions.create({
      model: FIXTURE,
      messages: [{ role: 'user', content: 'What is disaggregated serving?' }],
      max_tokens: 12,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    let chunks = 0;
    for await (const chunk of stream) if (chunk.choices[0]?.delta?.content) chunks++;
    expect(chunks).toBeGreaterThan(0);
    // The prefill worker's prefillDone can reach the router after the decode worker's last token: wait for it.
    let remote = 0;
    await vi.waitFor(
      async () => {
        remote = (await metric(disagg, 'tandem_prefills_total{where="remote"}')) - before;
        expect(remote).toBeGreaterThanOrEqual(PROMPTS.length * 2 + 1);
      },
      { timeout: 5000, interval: 20 },
    );
    const bytes = await metric(disagg, 'tandem_kv_transfer_bytes_total');
    console.log(`[figure] 2-GPU serving: ${remote} remote prefills, ${bytes} KV bytes moved GPU 0 -> GPU 1`);
    expect(bytes).toBeGreaterThan(0);
    expect(await metric(agg, 'tandem_prefills_total{where="remote"}')).toBe(0);
  });
});
