/**
 * bench:engine's counts for mixture-of-experts models (bench/engine-moe.ts): FLOPs and the decode memory bound count
 * only the experts a token / a batch reaches; dense models are counted whole. Qwen3-30B-A3B's published 3.3 B active
 * parameters (of 30.5 B) come out of its dummy preset's shapes.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  activeBodyParams,
  decodeWeightsRead,
  expectedActiveExperts,
  expertParamsPerLayerSet,
} from '../../bench/engine-moe.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { expectedTensors, type ModelConfig } from '../../lib/engine/model/config.js';
import { runTs } from '../helpers/cli.js';

const dir = mkdtempSync(join(tmpdir(), 'tandem-bench-engine-moe-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** body (layers and final norm) and lm_head elements, as bench/engine.ts's parameterCounts takes them. */
function parts(config: ModelConfig) {
  let total = 0;
  for (const t of expectedTensors(config)) total += t.shape.reduce((a, b) => a * b, 1);
  const table = config.vocabSize * config.hiddenSize;
  return { total, body: total - table - (config.tieWordEmbeddings ? 0 : table), lmHead: table };
}

describe('bench:engine MoE counts', () => {
  it('experts reached per layer: topK at batch 1, all of them as the batch grows, never more', () => {
    expect(expectedActiveExperts(128, 8, 0)).toBe(0);
    expect(expectedActiveExperts(128, 8, 1)).toBeCloseTo(8, 10);
    expect(expectedActiveExperts(8, 2, 1)).toBeCloseTo(2, 10);
    // Two tokens: 8 + 8 * (1 - 8/128) on average (the second token's experts the first did not take).
    expect(expectedActiveExperts(128, 8, 2)).toBeCloseTo(8 + 8 * (120 / 128), 10);
    let last = 0;
    for (const batch of [1, 2, 4, 16, 64, 128, 1024]) {
      const e = expectedActiveExperts(128, 8, batch);
      expect(e).toBeGreaterThan(last);
      expect(e).toBeLessThanOrEqual(128);
      last = e;
    }
    expect(expectedActiveExperts(128, 8, 1024)).toBeCloseTo(128, 6);
    expect(expectedActiveExperts(8, 8, 3)).toBe(8); // every token takes every expert
  });

  it("Qwen3-30B-A3B's shapes: 30.5 B parameters, about 3.3 B active per token", () => {
    const config = dummyConfig('qwen3-30b-a3b');
    const { total, body, lmHead } = parts(config);
    expect(total / 1e9).toBeCloseTo(30.5, 1);
    const active = activeBodyParams(config, body) + lmHead + config.vocabSize * config.hiddenSize; // + embedding
    expect(active / 1e9).toBeGreaterThan(3.2);
    expect(active / 1e9).toBeLessThan(3.4);
    // A decode step of one token reads the active experts only; of many, nearly every expert.
    expect(decodeWeightsRead(config, body, lmHead, 1)).toBeCloseTo(activeBodyParams(config, body) + lmHead, 0);
    const all = body + lmHead;
    expect(decodeWeightsRead(config, body, lmHead, 16)).toBeLessThan(all);
    expect(decodeWeightsRead(config, body, lmHead, 4096) / all).toBeCloseTo(1, 6);
    expect(expertParamsPerLayerSet(config)).toBe(48 * 3 * 768 * 2048);
  });

  it('dense models are counted whole at every batch', () => {
    const config = dummyConfig('llama-3.2-1b');
    const { body, lmHead } = parts(config);
    expect(activeBodyParams(config, body)).toBe(body);
    expect(expertParamsPerLayerSet(config)).toBe(0);
    for (const batch of [1, 64]) expect(decodeWeightsRead(config, body, lmHead, batch)).toBe(body + lmHead);
  });

  it('bench:engine on dummy:tiny-moe (CPU): FLOPs of the active experts, decode rows read only the experts their batch reaches', () => {
    const file = join(dir, 'tiny-moe.json');
    const r = runTs(
      'bench/engine.ts',
      [
        '--device',
        'cpu',
        '--model',
        'dummy:tiny-moe',
        '--quick',
        '--prompt',
        '32',
        '--batch',
        '1,4',
        '--steps',
        '2',
        '--json',
        file,
      ],
      {},
      120_000,
    );
    expect(r.status, r.stderr).toBe(0);
    const config = dummyConfig('tiny-moe');
    const { body, lmHead } = parts(config);
    const json = JSON.parse(readFileSync(file, 'utf8')) as {
      params: { active: number; readPerStep: number; kvBytesPerToken: number };
      rows: { phase: string; batch: number; context: number; readBytes?: number; tflops: number; msP50: number }[];
    };
    expect(json.params.active).toBe(activeBodyParams(config, body));
    expect(json.params.active).toBeLessThan(body);
    const decode = json.rows.filter((row) => row.phase === 'decode');
    expect(decode.map((row) => row.batch)).toEqual([1, 4]);
    for (const row of decode) {
      const weights = decodeWeightsRead(config, body, lmHead, row.batch) * 4; // fp32 on the CPU
      expect(row.readBytes).toBeCloseTo(weights + row.batch * row.context * json.params.kvBytesPerToken, 0);
    }
    // Four tokens reach more experts than one, and fewer than all of them.
    expect(decodeWeightsRead(config, body, lmHead, 4)).toBeGreaterThan(decodeWeightsRead(config, body, lmHead, 1));
    expect(decodeWeightsRead(config, body, lmHead, 4)).toBeLessThan(body + lmHead);
    // A prefill row's TFLOP/s: 2 x active parameters per token (+ lm_head once).
    const prefill = json.rows.find((row) => row.phase === 'prefill')!;
    const flops = 2 * json.params.active * 32 + 2 * lmHead;
    expect(prefill.tflops).toBeCloseTo(flops / (prefill.msP50 * 1e9), 6);
  });
});
