import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openModel } from '../../lib/engine/open.js';
import { isSparseLayer } from '../../lib/engine/model/config.js';
import { CpuModelRunner } from '../../lib/engine/cpu.js';
import { promptBatch } from '../helpers/forward-batch.js';

// The CPU engine against transformers on the tiny MoE fixtures (Mixtral; Qwen3-MoE with q/k norm; Qwen2-MoE with
// a shared expert and a dense layer) that scripts/make-hf-fixture.py builds:
// `python3 scripts/make-hf-fixture.py test/fixtures --only qwen3_moe,qwen2_moe` on a machine with torch and
// transformers. Same checks as hf-fixture.test.ts: last-token logits within fp32 tolerance and identical greedy
// tokens (as many as expected.json holds: 32 for Mixtral, 16 for the Qwen fixtures); and the routed-token count
// the runner reports.
interface Expected {
  prompt: string;
  promptIds: number[];
  lastLogits: number[];
  greedy: number[];
  minRouterMargin: number;
}

for (const name of ['hf-tiny-mixtral', 'hf-tiny-qwen3-moe', 'hf-tiny-qwen2-moe']) {
  const dir = join(import.meta.dirname, '..', 'fixtures', name);
  const present = existsSync(join(dir, 'expected.json'));
  describe.skipIf(!present)(`CPU engine matches transformers on ${name}`, () => {
    it('prefill logits within fp32 tolerance, and identical greedy tokens', async () => {
      const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Expected;
      await using m = await openModel({ model: dir, device: 'cpu', numBlocks: 16, threads: 2 });
      expect(m.tokenizer.encode(expected.prompt)).toEqual(expected.promptIds);
      const config = m.config;
      expect(config.moe?.numExperts).toBe(8);
      const n = expected.promptIds.length;
      const runner = m.runner as CpuModelRunner;
      runner.takeExpertLoad(); // drop what opening the model (a warm-up pass) routed
      const logits = await m.runner.forward(promptBatch(expected.promptIds));
      expect(logits.length).toBe(expected.lastLogits.length);
      let maxDiff = 0;
      for (let i = 0; i < logits.length; i++)
        maxDiff = Math.max(maxDiff, Math.abs(logits[i]! - expected.lastLogits[i]!));
      console.log(`[figure] ${name}: CPU vs transformers max |diff| ${maxDiff.toExponential(2)}`);
      expect(maxDiff).toBeLessThan(1e-3);
      const load = runner.takeExpertLoad();
      for (let l = 0; l < config.numLayers; l++) {
        const row = load.subarray(l * 8, (l + 1) * 8);
        // Qwen2-MoE's fixture has a dense layer (mlp_only_layers [1]): it routes nothing.
        expect(
          row.reduce((a, b) => a + b, 0),
          `layer ${l}`,
        ).toBe(isSparseLayer(config, l) ? n * config.moe!.topK : 0);
      }

      const result = await m.engine
        .addRequest({
          promptTokenIds: expected.promptIds,
          sampling: { temperature: 0, maxTokens: expected.greedy.length },
        })
        .result();
      expect(result.tokenIds).toEqual(expected.greedy);
    });
  });
  if (!present)
    it.skip(`${name}: fixture not generated yet (run scripts/make-hf-fixture.py test/fixtures --only qwen3_moe,qwen2_moe where torch and transformers are installed)`, () => {});
}
