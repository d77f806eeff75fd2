import { describe, expect, it } from 'vitest';
import { CpuModelRunner } from '../../lib/engine/cpu.js';
import { LlmEngine } from '../../lib/engine/llm-engine.js';
import { dummyConfig } from '../../lib/engine/model/index.js';
import { ExpertBalancer, ExpertLoadRecorder } from '../../lib/moe/index.js';
import { forwardBatch } from '../helpers/forward-batch.js';

describe('ExpertLoadRecorder', () => {
  const config = dummyConfig('tiny-moe');
  const { numLayers } = config;
  const { numExperts, topK } = config.moe!;

  it('records one window step per forward pass; totals count every routed token', async () => {
    const runner = await CpuModelRunner.create({ config, numBlocks: 8, blockSize: 4, weights: 'dummy:tiny-moe' });
    await using recorder = new ExpertLoadRecorder(runner, numLayers, numExperts, 2);
    await recorder.forward(forwardBatch([{ blocks: [0, 1], start: 0, tokens: [1, 2, 3, 4, 5] }]));
    await recorder.forward(forwardBatch([{ blocks: [0, 1], start: 5, tokens: [6] }]));
    await recorder.forward(forwardBatch([{ blocks: [0, 1], start: 6, tokens: [7, 8] }]));
    expect(recorder.window.steps).toBe(2);
    // totals: 8 tokens, each sent to topK experts in every layer; the window holds the last two steps (3 tokens)
    for (let l = 0; l < numLayers; l++) {
      const total = recorder.totals.subarray(l * numExperts, (l + 1) * numExperts).reduce((a, b) => a + b, 0);
      expect(total).toBe(8 * topK);
      expect(recorder.window.totals()[l]!.reduce((a, b) => a + b, 0)).toBe(3 * topK);
    }
    expect(runner.takeExpertLoad().every((v) => v === 0)).toBe(true); // taken by the recorder
  });

  it('serves an engine and feeds the balancer', async () => {
    const runner = await CpuModelRunner.create({ config, numBlocks: 32, blockSize: 4, weights: 'dummy:tiny-moe' });
    const balancer = new ExpertBalancer(numLayers, numExperts, 4, {
      windowSteps: 8,
      periodSteps: 8,
      redundantSlotsPerRank: 1,
      minImbalanceGain: 0,
    });
    const recorder = new ExpertLoadRecorder(runner, numLayers, numExperts, 8, (load) => balancer.step(load));
    const engine = new LlmEngine(recorder);
    try {
      const result = await engine
        .addRequest({ promptTokenIds: [10, 20, 30, 40, 50, 60], sampling: { temperature: 0, maxTokens: 12 } })
        .result();
      expect(result.tokenIds.length).toBe(12);
      // the balancer saw the same steps as the recorder's window, and decided once its window was full
      expect(balancer.window.totals()).toEqual(recorder.window.totals());
      expect(balancer.decisions.length).toBeGreaterThanOrEqual(1);
      const d = balancer.decisions[0]!;
      d.result.imbalanceAfter.forEach((a, l) => expect(a).toBeLessThanOrEqual(d.result.imbalanceBefore[l]!));
    } finally {
      await engine.dispose();
    }
  });
});
