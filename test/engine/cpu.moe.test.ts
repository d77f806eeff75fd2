/**
 * The native CPU runner on mixture-of-experts models (Qwen3-MoE with q/k norm, Mixtral) against the float64
 * reference (test/helpers/llama-reference.ts with the MoE block of test/moe/moe-reference.ts): prefill,
 * decode and a batch of two sequences, and the expert load the runner reports against the reference's routing.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CpuModelRunner, nativeModelFields } from '../../lib/engine/cpu.js';
import { loadBinding } from '../../lib/native/binding.js';
import {
  dummyConfig,
  dummyWeights,
  loadModelConfig,
  parseModelConfig,
  saveDummyModel,
  toHfConfig,
  type ModelConfig,
} from '../../lib/engine/model/index.js';
import { weightManifest } from '../../lib/engine/model/manifest.js';
import { BadArgumentError, ModelConfigError, nativeSync } from '../../lib/errors.js';
import { ExpertLoadWindow } from '../../lib/moe/index.js';
import { forwardBatch, logitsRow, relativeError, type SequenceStep } from '../helpers/forward-batch.js';
import { LlamaReference, type ReferenceSequence } from '../helpers/llama-reference.js';

const TOLERANCE = 1e-4;
const tokensOf = (n: number, salt: number) => Array.from({ length: n }, (_, i) => (i * 37 + salt * 11 + 5) % 256);

/** Dummy weights with norms drawn in [0.5, 1.5] (all ones would hide a q/k norm applied to the wrong head). */
function weightsOf(config: ModelConfig): Map<string, Float32Array> {
  let s = 12345;
  const rand = () => ((s = (s * 1103515245 + 12345) >>> 0), s / 2 ** 32);
  return new Map(
    [...dummyWeights(config, 7)].map((t) => [
      t.name,
      t.name.endsWith('norm.weight') ? t.data.map(() => 0.5 + rand()) : t.data,
    ]),
  );
}

const CONFIGS: Record<string, ModelConfig> = {
  'qwen3-moe (dummy:tiny-moe: q/k norm, top-2 of 8 renormalised)': dummyConfig('tiny-moe'),
  'qwen3-moe without norm_topk_prob, top 3': {
    ...dummyConfig('tiny-moe'),
    moe: { numExperts: 8, topK: 3, intermediateSize: 32, normTopkProb: false },
  },
  'mixtral (dummy:tiny-mixtral)': dummyConfig('tiny-mixtral'),
};

describe('CPU runner, mixture of experts', () => {
  for (const [name, config] of Object.entries(CONFIGS)) {
    it(`${name}: logits match the reference; expert load matches its routing`, async () => {
      const weights = weightsOf(config);
      const ref = new LlamaReference(config, weights);
      await using runner = await CpuModelRunner.create({
        config,
        numBlocks: 16,
        blockSize: 4,
        threads: 2,
        weights: [...weights].map(([n, data]) => ({ name: n, data })),
      });
      const V = config.vocabSize;
      const window = new ExpertLoadWindow(config.numLayers, config.moe!.numExperts, 100);
      const check = async (steps: SequenceStep[], seqs: ReferenceSequence[]) => {
        const logits = await runner.forward(forwardBatch(steps));
        window.record(runner.takeExpertLoad());
        steps.forEach((step, i) => {
          const expected = ref.forward(seqs[i]!, step.tokens);
          expect(relativeError(logitsRow(logits, V, i), expected), `sequence ${i} at ${step.start}`).toBeLessThan(
            TOLERANCE,
          );
        });
      };
      const a = ref.newSequence();
      const b = ref.newSequence();
      await check([{ blocks: [3, 9, 1], start: 0, tokens: tokensOf(11, 1) }], [a]);
      await check([{ blocks: [3, 9, 1], start: 11, tokens: [42] }], [a]);
      await check(
        [
          { blocks: [3, 9, 1, 12], start: 12, tokens: [7] },
          { blocks: [5, 0], start: 0, tokens: tokensOf(6, 2) },
        ],
        [a, b],
      );
      // The runner's per-step load, summed by the window, is the reference's routing.
      const perLayer = window.totals();
      const E = config.moe!.numExperts;
      expect(perLayer.flatMap((r) => Array.from(r))).toEqual(ref.expertTokens);
      for (const row of perLayer) expect(row.reduce((x, y) => x + y, 0)).toBe(19 * config.moe!.topK);
      // More than k experts are used: the routing is not degenerate.
      expect(perLayer[0]!.filter((n) => n > 0).length).toBeGreaterThan(config.moe!.topK);
      expect(runner.takeExpertLoad()).toEqual(new Float64Array(config.numLayers * E)); // reset by the last take
    });
  }

  it('a saved MoE checkpoint (config.json + per-expert safetensors) loads and runs as the in-memory weights do', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-moe-'));
    try {
      for (const preset of ['tiny-moe', 'tiny-mixtral']) {
        const written = saveDummyModel(join(dir, preset), preset, 3, 'F32');
        const loaded = loadModelConfig(join(dir, preset));
        expect(loaded).toEqual(written);
        const batch = forwardBatch([{ blocks: [0, 1], start: 0, tokens: tokensOf(7, 3) }]);
        await using fromDisk = await CpuModelRunner.create({
          config: loaded,
          numBlocks: 4,
          weights: join(dir, preset),
        });
        await using inMemory = await CpuModelRunner.create({
          config: loaded,
          numBlocks: 4,
          weights: `dummy:${preset}`,
          seed: 3,
        });
        expect(await fromDisk.forward(batch)).toEqual(await inMemory.forward(batch));
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a dense model reports no expert load', async () => {
    await using runner = await CpuModelRunner.create({
      config: dummyConfig('tiny'),
      numBlocks: 4,
      weights: 'dummy:tiny',
    });
    expect(runner.takeExpertLoad().length).toBe(0);
  });

  it('a missing expert tensor is refused by name', async () => {
    const config = dummyConfig('tiny-mixtral');
    const weights = [...dummyWeights(config, 1)].filter(
      (t) => t.name !== 'model.layers.1.block_sparse_moe.experts.5.w3.weight',
    );
    await expect(
      CpuModelRunner.create({ config, numBlocks: 4, weights: weights.map((t) => ({ name: t.name, data: t.data })) }),
    ).rejects.toThrow(/model\.layers\.1\.block_sparse_moe\.experts\.5\.w3\.weight/);
    await expect(
      CpuModelRunner.create({ config, numBlocks: 4, weights: weights.map((t) => ({ name: t.name, data: t.data })) }),
    ).rejects.toBeInstanceOf(BadArgumentError);
  });
});

describe('native MoE options and manifest checks', () => {
  const config = dummyConfig('tiny-mixtral');
  const rawOptions = (overrides: Record<string, unknown> = {}) => ({
    ...nativeModelFields(config),
    numBlocks: 2,
    blockSize: 16,
    layout: 'block-major' as const,
    kvBuffer: new Uint8Array(2 * config.numLayers * 2 * 16 * config.numKvHeads * config.headDim * 4),
    ...overrides,
  });
  const refused = (overrides: Record<string, unknown>, message: RegExp) => {
    const { binding } = loadBinding();
    const f = () => nativeSync(() => new binding.CpuLlama(rawOptions(overrides) as never));
    expect(f).toThrow(BadArgumentError);
    expect(f).toThrow(message);
  };

  it('refuses inconsistent MoE settings and expert tensors, naming them', () => {
    const full = nativeModelFields(config).tensors;
    refused({ moe: { ...config.moe, topK: 9 } }, /topK in 1\.\.numExperts/);
    refused({ moe: 'mixtral' }, /option 'moe' must be an object or null/);
    refused(
      { moe: null },
      /tensor 'model\.layers\.0\.block_sparse_moe\.gate\.weight' \(router\) is not part of this config/,
    );
    refused(
      { tensors: full.filter((t) => !(t.role === 'expert_up' && t.layer === 1 && t.expert === 6)) },
      /no tensor for expert_up of layer 1 expert 6/,
    );
    refused(
      { tensors: full.map((t) => (t.role === 'expert_down' && t.expert === 7 ? { ...t, expert: 8 } : t)) },
      /has expert 8; the model has experts 0\.\.7/,
    );
    refused(
      { tensors: full.map((t) => (t.role === 'router' ? { ...t, expert: 0 } : t)) },
      /only expert tensors have one/,
    );
    refused(
      { tensors: full.map((t) => (t.role === 'expert_gate' ? { ...t, expert: 1.5 } : t)) },
      /\.expert must be an integer >= -1/,
    );
  });
});

describe('MoE config and manifest', () => {
  const qwen3MoeJson = {
    architectures: ['Qwen3MoeForCausalLM'],
    model_type: 'qwen3_moe',
    vocab_size: 151936,
    hidden_size: 2048,
    intermediate_size: 6144,
    moe_intermediate_size: 768,
    num_hidden_layers: 48,
    num_attention_heads: 32,
    num_key_value_heads: 4,
    head_dim: 128,
    num_experts: 128,
    num_experts_per_tok: 8,
    norm_topk_prob: true,
    decoder_sparse_step: 1,
    mlp_only_layers: [],
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    max_position_embeddings: 40960,
    tie_word_embeddings: false,
    use_sliding_window: false,
    sliding_window: null,
    attention_bias: false,
    torch_dtype: 'bfloat16',
    bos_token_id: 151643,
    eos_token_id: 151645,
  };

  it("parses Qwen3-30B-A3B's config.json into the dummy preset's shapes", () => {
    const c = parseModelConfig(qwen3MoeJson);
    expect(c.moe).toEqual({ numExperts: 128, topK: 8, intermediateSize: 768, normTopkProb: true });
    expect(c.qkNorm).toBe(true);
    const d = dummyConfig('qwen3-30b-a3b');
    for (const k of ['vocabSize', 'hiddenSize', 'numLayers', 'numHeads', 'numKvHeads', 'headDim', 'moe'] as const)
      expect(c[k], k).toEqual(d[k]);
  });

  it('parses Mixtral (always renormalised, experts of intermediate_size)', () => {
    const c = parseModelConfig({
      architectures: ['MixtralForCausalLM'],
      vocab_size: 32000,
      hidden_size: 4096,
      intermediate_size: 14336,
      num_hidden_layers: 32,
      num_attention_heads: 32,
      num_key_value_heads: 8,
      num_local_experts: 8,
      num_experts_per_tok: 2,
      sliding_window: null,
    });
    expect(c.moe).toEqual({ numExperts: 8, topK: 2, intermediateSize: 14336, normTopkProb: true });
    expect(c.qkNorm).toBe(false);
    expect(c.rmsNormEps).toBe(1e-5);
  });

  it('refuses layouts it does not run, naming the field', () => {
    const bad = (patch: Record<string, unknown>, msg: RegExp) => {
      const f = () => parseModelConfig({ ...qwen3MoeJson, ...patch });
      expect(f).toThrow(ModelConfigError);
      expect(f).toThrow(msg);
    };
    bad({ decoder_sparse_step: 2 }, /"decoder_sparse_step" is 2; only 1/);
    bad({ mlp_only_layers: [0, 3] }, /"mlp_only_layers" is \[0,3\]; only \[\]/);
    bad({ num_experts_per_tok: 129 }, /"num_experts_per_tok" \(129\) must be at most the number of experts \(128\)/);
    bad({ num_experts: 0 }, /"num_experts" must be a positive integer/);
  });

  it('the manifest lists router and experts with shard rule expert and their indices; round trip', () => {
    for (const preset of ['tiny-moe', 'tiny-mixtral', 'qwen3-30b-a3b', 'mixtral-8x7b']) {
      const c = dummyConfig(preset);
      const m = weightManifest(c);
      const E = c.moe!.numExperts;
      const experts = m.filter((t) => t.shard === 'expert');
      expect(experts.length).toBe(c.numLayers * E * 3);
      for (const t of experts) {
        expect(t.expert).toBeGreaterThanOrEqual(0);
        expect(t.name).toContain(`.experts.${t.expert}.`);
        expect(t.name.startsWith(`model.layers.${t.layer}.`)).toBe(true);
      }
      expect(m.filter((t) => t.role === 'router').map((t) => t.shape)).toEqual(
        Array.from({ length: c.numLayers }, () => [E, c.hiddenSize]),
      );
      expect(m.some((t) => t.role === 'gate' || t.role === 'up' || t.role === 'down')).toBe(false);
      expect(m.filter((t) => t.role === 'q_norm').length).toBe(c.qkNorm ? c.numLayers : 0);
      expect(m.filter((t) => t.expert !== undefined && t.shard !== 'expert')).toEqual([]);
      expect(parseModelConfig(JSON.parse(JSON.stringify(toHfConfig(c))))).toEqual(c);
    }
    expect(
      weightManifest(dummyConfig('mixtral-8x7b')).find(
        (t) => t.expert === 7 && t.layer === 31 && t.role === 'expert_down',
      ),
    ).toMatchObject({ name: 'model.layers.31.block_sparse_moe.experts.7.w2.weight', shape: [4096, 14336] });
    expect(
      weightManifest(dummyConfig('qwen3-30b-a3b')).find(
        (t) => t.expert === 127 && t.layer === 0 && t.role === 'expert_gate',
      ),
    ).toMatchObject({ name: 'model.layers.0.mlp.experts.127.gate_proj.weight', shape: [768, 2048] });
  });
});
