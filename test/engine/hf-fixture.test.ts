import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openModel } from '../../lib/engine/open.js';
import { promptBatch } from '../helpers/forward-batch.js';

// The CPU engine against transformers: tiny random models built, saved and run by
// scripts/make-hf-fixture.py (transformers, fp32, CPU). Tandem loads the same files (config.json,
// model.safetensors, tokenizer.json) and must give the same last-token logits and 32 greedy tokens.
interface Expected {
  prompt: string;
  promptIds: number[];
  lastLogits: number[];
  greedy: number[];
}

describe.each(['hf-tiny-llama', 'hf-tiny-qwen2'])('CPU engine matches transformers on %s', (name) => {
  const dir = join(import.meta.dirname, '..', 'fixtures', name);
  const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Expected;

  it('prefill logits within fp32 tolerance, and 32 identical greedy tokens', async () => {
    await using m = await openModel({ model: dir, device: 'cpu', numBlocks: 16, threads: 2 });
    expect(m.tokenizer.encode(expected.prompt)).toEqual(expected.promptIds);
    const logits = await m.runner.forward(promptBatch(expected.promptIds));
    expect(logits.length).toBe(expected.lastLogits.length);
    let maxDiff = 0;
    for (let i = 0; i < logits.length; i++) maxDiff = Math.max(maxDiff, Math.abs(logits[i]! - expected.lastLogits[i]!));
    console.log(`[figure] ${name}: CPU vs transformers max |diff| ${maxDiff.toExponential(2)}`);
    expect(maxDiff).toBeLessThan(1e-3);

    const result = await m.engine
      .addRequest({ promptTokenIds: expected.promptIds, sampling: { temperature: 0, maxTokens: 32 } })
      .result();
    expect(result.tokenIds).toEqual(expected.greedy);
  });
});
