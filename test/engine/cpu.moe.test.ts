/**
 * The native CPU runner on mixture-of-experts models (Qwen3-MoE with q/k norm, Mixtral, Qwen2-MoE with a shared
 * expert and a dense layer) against the float64 reference (test/helpers/llama-reference.ts with the MoE block of
 * test/moe/moe-reference.ts): prefill, decode and a batch of two sequences, and the expert load the runner
 * reports against the reference's routing.
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
  isSparseLayer,
  loadModelConfig,
  parseModelConfig,
  saveDummyModel,
  toHfConfig,
  type ModelConfig,
} from '../../lib/engine/model/index.js';
import { weightManifest } from '../../lib/engine/model/manifest.js';
import { expertShard, rankSlice } from '../../lib/engine/parallel.js';
import { BadArgumentError, ModelConfigError, nativeSync } from '../../lib/errors.js';
import { ExpertLoadWindow, layerPlacementFromSlots } from '../../lib/moe/index.js';
import { MOE_DUMMY_PRESETS } from '../../lib/engine/model/dummy.js';
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
  'qwen2-moe (dummy:tiny-qwen2-moe: q/k/v bias, shared expert, layer 1 of 3 dense)': dummyConfig('tiny-qwen2-moe'),
  'qwen2-moe renormalised, dense layers 0 and 2 (decoder_sparse_step 2)': {
    ...dummyConfig('tiny-qwen2-moe'),
    moe: { ...dummyConfig('tiny-qwen2-moe').moe!, normTopkProb: true, denseLayers: [0, 2] },
  },
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
      // The runner's per-step load, summed by the window, is the reference's routing (a dense layer routes none).
      const perLayer = window.totals();
      const E = config.moe!.numExperts;
      expect(perLayer.flatMap((r) => Array.from(r))).toEqual(ref.expertTokens);
      perLayer.forEach((row, l) =>
        expect(
          row.reduce((x, y) => x + y, 0),
          `layer ${l}`,
        ).toBe(isSparseLayer(config, l) ? 19 * config.moe!.topK : 0),
      );
      // More than k experts are used: the routing is not degenerate.
      const sparse = perLayer.find((_, l) => isSparseLayer(config, l))!;
      expect(sparse.filter((n) => n > 0).length).toBeGreaterThan(config.moe!.topK);
      expect(runner.takeExpertLoad()).toEqual(new Float64Array(config.numLayers * E)); // reset by the last take
    });
  }

  it('a saved MoE checkpoint (config.json + per-expert safetensors) loads and runs as the in-memory weights do', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-moe-'));
    try {
      for (const preset of ['tiny-moe', 'tiny-mixtral', 'tiny-qwen2-moe']) {
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

describe('native checks of a Qwen2-MoE manifest (shared expert, dense layer)', () => {
  const config = dummyConfig('tiny-qwen2-moe');
  const full = nativeModelFields(config).tensors;
  const refused = (overrides: Record<string, unknown>, message: RegExp) => {
    const { binding } = loadBinding();
    const options = {
      ...nativeModelFields(config),
      numBlocks: 2,
      blockSize: 16,
      layout: 'block-major' as const,
      kvBuffer: new Uint8Array(2 * config.numLayers * 2 * 16 * config.numKvHeads * config.headDim * 4),
      ...overrides,
    };
    const f = () => nativeSync(() => new binding.CpuLlama(options as never));
    expect(f).toThrow(BadArgumentError);
    expect(f).toThrow(message);
  };

  it('refuses a missing shared tensor, expert tensors in the dense layer, and bad moe options, naming them', () => {
    refused(
      { tensors: full.filter((t) => !(t.role === 'shared_up' && t.layer === 2)) },
      /no tensor for shared_up of layer 2/,
    );
    refused(
      { tensors: full.filter((t) => !(t.role === 'shared_expert_gate' && t.layer === 0)) },
      /no tensor for shared_expert_gate of layer 0/,
    );
    refused(
      { tensors: full.map((t) => (t.role === 'router' && t.layer === 0 ? { ...t, layer: 1 } : t)) },
      /\(router\) is not part of this config \(layer 1 is dense\)/,
    );
    refused(
      { tensors: full.map((t) => (t.role === 'gate' ? { ...t, layer: 0 } : t)) },
      /\(gate\) is not part of this config \(layer 0 is sparse\)/,
    );
    refused({ moe: { ...config.moe, denseLayers: [3] } }, /denseLayers must be distinct layers 0\.\.2 \(got 3\)/);
    refused({ moe: { ...config.moe, denseLayers: [1, 1] } }, /denseLayers must be distinct layers/);
    refused({ moe: { ...config.moe, denseLayers: 1 } }, /'moe\.denseLayers' must be an array/);
    refused(
      { moe: { ...config.moe, sharedExpertIntermediateSize: -4 } },
      /sharedExpertIntermediateSize' must be a positive/,
    );
    // Without the shared expert in the options, its tensors are not part of the config.
    refused({ moe: { ...config.moe, sharedExpertIntermediateSize: 0 } }, /\(shared_gate\) is not part of this config/);
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
    bad({ mlp_only_layers: [0, 48] }, /"mlp_only_layers" must be a list of layer indices 0\.\.47, got \[0,48\]/);
    bad({ mlp_only_layers: 'none' }, /"mlp_only_layers" must be a list of layer indices/);
    bad({ decoder_sparse_step: 49 }, /"decoder_sparse_step" leaves no sparse layer/);
    bad({ decoder_sparse_step: 0 }, /"decoder_sparse_step" must be a positive integer/);
    bad({ num_experts_per_tok: 129 }, /"num_experts_per_tok" \(129\) must be at most the number of experts \(128\)/);
    bad({ num_experts: 0 }, /"num_experts" must be a positive integer/);
  });

  it('the manifest lists router and experts with shard rule expert and their indices; round trip', () => {
    for (const preset of MOE_DUMMY_PRESETS) {
      const c = dummyConfig(preset);
      const m = weightManifest(c);
      const E = c.moe!.numExperts;
      const sparseLayers = Array.from({ length: c.numLayers }, (_, l) => l).filter((l) => isSparseLayer(c, l));
      const experts = m.filter((t) => t.shard === 'expert');
      expect(experts.length).toBe(sparseLayers.length * E * 3);
      for (const t of experts) {
        expect(t.expert).toBeGreaterThanOrEqual(0);
        expect(t.name).toContain(`.experts.${t.expert}.`);
        expect(t.name.startsWith(`model.layers.${t.layer}.`)).toBe(true);
      }
      expect(m.filter((t) => t.role === 'router').map((t) => t.layer)).toEqual(sparseLayers);
      expect(m.filter((t) => t.role === 'router').every((t) => t.shape.join() === `${E},${c.hiddenSize}`)).toBe(true);
      // Dense layers (and only they) have the dense FFN.
      expect([
        ...new Set(m.filter((t) => t.role === 'gate' || t.role === 'up' || t.role === 'down').map((t) => t.layer)),
      ]).toEqual(c.moe!.denseLayers ?? []);
      // The shared expert (Qwen2-MoE): gate / up / down and its gate in every sparse layer.
      const si = c.moe!.sharedExpertIntermediateSize ?? 0;
      for (const [role, shape, shard] of [
        ['shared_gate', [si, c.hiddenSize], 'shared_expert'],
        ['shared_up', [si, c.hiddenSize], 'shared_expert'],
        ['shared_down', [c.hiddenSize, si], 'shared_expert'],
        ['shared_expert_gate', [1, c.hiddenSize], 'replicated'],
      ] as const) {
        const of = m.filter((t) => t.role === role);
        expect(
          of.map((t) => t.layer),
          role,
        ).toEqual(si > 0 ? sparseLayers : []);
        for (const t of of) expect(t).toMatchObject({ shape, shard });
      }
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
    expect(
      weightManifest(dummyConfig('qwen1.5-moe-a2.7b'))
        .filter((t) => t.layer === 23 && t.role.startsWith('shared'))
        .map(({ name, shape }) => ({ name, shape })),
    ).toEqual([
      { name: 'model.layers.23.mlp.shared_expert.gate_proj.weight', shape: [5632, 2048] },
      { name: 'model.layers.23.mlp.shared_expert.up_proj.weight', shape: [5632, 2048] },
      { name: 'model.layers.23.mlp.shared_expert.down_proj.weight', shape: [2048, 5632] },
      { name: 'model.layers.23.mlp.shared_expert_gate.weight', shape: [1, 2048] },
    ]);
  });

  // Qwen/Qwen1.5-MoE-A2.7B's config.json (transformers 5 adds qkv_bias, mlp_only_layers, layer_types).
  const qwen2MoeJson = {
    architectures: ['Qwen2MoeForCausalLM'],
    model_type: 'qwen2_moe',
    vocab_size: 151936,
    hidden_size: 2048,
    intermediate_size: 5632,
    moe_intermediate_size: 1408,
    shared_expert_intermediate_size: 5632,
    num_hidden_layers: 24,
    num_attention_heads: 16,
    num_key_value_heads: 16,
    num_experts: 60,
    num_experts_per_tok: 4,
    norm_topk_prob: false,
    decoder_sparse_step: 1,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    max_position_embeddings: 8192,
    max_window_layers: 21,
    sliding_window: 32768,
    use_sliding_window: false,
    tie_word_embeddings: false,
    torch_dtype: 'bfloat16',
    bos_token_id: 151643,
    eos_token_id: 151643,
  };

  it("parses Qwen1.5-MoE-A2.7B's config.json into the dummy preset's shapes (shared expert, q/k/v bias)", () => {
    const c = parseModelConfig(qwen2MoeJson);
    expect(c.architecture).toBe('Qwen2MoeForCausalLM');
    expect(c.moe).toEqual({
      numExperts: 60,
      topK: 4,
      intermediateSize: 1408,
      normTopkProb: false,
      sharedExpertIntermediateSize: 5632,
    });
    expect(c.attentionBias).toBe(true);
    expect(c.attentionOutputBias).toBe(false);
    expect(c.qkNorm).toBe(false);
    expect(c.slidingWindow).toBeNull();
    const d = dummyConfig('qwen1.5-moe-a2.7b');
    for (const k of [
      'vocabSize',
      'hiddenSize',
      'intermediateSize',
      'numLayers',
      'numHeads',
      'numKvHeads',
      'headDim',
      'moe',
    ] as const)
      expect(c[k], k).toEqual(d[k]);
    expect(parseModelConfig({ ...qwen2MoeJson, qkv_bias: false }).attentionBias).toBe(false);
    expect(parseModelConfig({ ...qwen2MoeJson, model_type: 'qwen2_moe', architectures: undefined }).architecture).toBe(
      'Qwen2MoeForCausalLM',
    );
  });

  it('dense layers among sparse ones, as transformers decides them (mlp_only_layers, decoder_sparse_step)', () => {
    const layers = (patch: Record<string, unknown>) =>
      parseModelConfig({ ...qwen2MoeJson, num_hidden_layers: 6, ...patch }).moe!.denseLayers;
    expect(layers({})).toBeUndefined(); // every layer sparse
    expect(layers({ mlp_only_layers: [4, 1] })).toEqual([1, 4]);
    expect(layers({ decoder_sparse_step: 2 })).toEqual([0, 2, 4]); // sparse where (l + 1) % 2 == 0
    expect(layers({ decoder_sparse_step: 3, mlp_only_layers: [5] })).toEqual([0, 1, 3, 4, 5]);
    const qwen3 = parseModelConfig({ ...qwen3MoeJson, decoder_sparse_step: 2 });
    expect(qwen3.moe!.denseLayers).toHaveLength(24);
    expect(isSparseLayer(qwen3, 0)).toBe(false);
    expect(isSparseLayer(qwen3, 1)).toBe(true);
    // Round trip: the dense layers come back as mlp_only_layers.
    const c = parseModelConfig({ ...qwen2MoeJson, num_hidden_layers: 6, decoder_sparse_step: 2 });
    expect(parseModelConfig(JSON.parse(JSON.stringify(toHfConfig(c))))).toEqual(c);
  });

  it('refuses Qwen2-MoE settings it does not run, naming the field', () => {
    const bad = (patch: Record<string, unknown>, msg: RegExp) => {
      const f = () => parseModelConfig({ ...qwen2MoeJson, ...patch });
      expect(f).toThrow(ModelConfigError);
      expect(f).toThrow(msg);
    };
    bad({ use_sliding_window: true }, /"use_sliding_window" is true; per-layer sliding windows/);
    bad({ shared_expert_intermediate_size: 0 }, /"shared_expert_intermediate_size" must be a positive integer/);
    bad({ mlp_only_layers: [-1] }, /"mlp_only_layers" must be a list of layer indices 0\.\.23/);
  });
});

/**
 * Qwen2-MoE under expert parallelism: the shared expert is whole on every EP rank and added after the combine as
 * one rank adds it, the dense layer runs on every rank, so EP 2 and 4 give one rank's logits bit for bit, also
 * after a placement that rewrites every layer's slots (a dense layer's row moves nothing); under tensor
 * parallelism each rank runs its share of the shared expert's channels and the dense FFN's, within fp32 rounding.
 */
describe('Qwen2-MoE (shared expert, dense layer) under expert and tensor parallelism', () => {
  const config = dummyConfig('tiny-qwen2-moe');
  const weights = [...weightsOf(config)].map(([name, data]) => ({ name, data }));
  const E = config.moe!.numExperts;
  const V = config.vocabSize;
  const runnerFor = (parallel: { ep?: number; tp?: number }) =>
    CpuModelRunner.create({ config, numBlocks: 16, blockSize: 4, threads: 2, weights, parallel });
  const argmax = (row: Float32Array) => row.reduce((best, v, i) => (v > row[best]! ? i : best), 0);

  /** Prefill of two sequences, then decode steps feeding back each one's greedy token; `between` after step 1. */
  async function schedule(runner: CpuModelRunner, between?: () => Promise<void>) {
    const prompts = [tokensOf(7, 1), tokensOf(4, 2)];
    const blocks = [
      [0, 1, 2, 3],
      [5, 4, 6],
    ];
    const lengths = prompts.map((p) => p.length);
    const logits: Float32Array[] = [];
    let out = await runner.forward(forwardBatch(prompts.map((p, i) => ({ blocks: blocks[i]!, start: 0, tokens: p }))));
    logits.push(out);
    for (let step = 1; step <= 3; step++) {
      if (step === 2) await between?.();
      const next = [0, 1].map((i) => argmax(logitsRow(out, V, i)));
      out = await runner.forward(
        forwardBatch(
          next.map((t, i) => ({ blocks: blocks[i]!, start: lengths[i]!++, tokens: [t] })),
          4,
        ),
      );
      logits.push(out);
    }
    return { logits, load: runner.takeExpertLoad() };
  }

  it('ep 2 and ep 4 equal one rank bit for bit, before and after a placement; tp 2 within fp32 rounding', async () => {
    await using one = await runnerFor({});
    const reference = await schedule(one);
    for (const ep of [2, 4]) {
      await using runner = await runnerFor({ ep });
      const got = await schedule(runner, async () => {
        // Every layer's experts reversed: slots change on every rank, the dense layer 1's row included.
        const reversed = Int32Array.from({ length: E }, (_, s) => E - 1 - s);
        const layers = Array.from({ length: config.numLayers }, () => layerPlacementFromSlots(reversed, E));
        const change = await runner.applyExpertPlacement({ numExperts: E, numRanks: ep, slotsPerRank: E / ep, layers });
        expect(change.slotsCopied, 'the two sparse layers only').toBe(2 * E);
      });
      got.logits.forEach((l, i) =>
        expect(Array.from(l), `ep ${ep} step ${i}`).toEqual(Array.from(reference.logits[i]!)),
      );
      expect(Array.from(got.load)).toEqual(Array.from(reference.load));
    }
    await using tp = await runnerFor({ tp: 2 });
    const got = await schedule(tp);
    got.logits.forEach((l, i) =>
      expect(relativeError(l, reference.logits[i]!), `tp 2 step ${i}`).toBeLessThan(TOLERANCE),
    );
  });

  it("shard rule shared_expert: a tp rank's channels with ep 1, whole on every rank with ep > 1", () => {
    const m = weightManifest(config).filter((t) => t.layer === 2);
    const whole = (t: { shape: number[] }) => Float32Array.from({ length: t.shape[0]! * t.shape[1]! }, (_, i) => i);
    const [gate, down, expertGate] = ['shared_gate', 'shared_down', 'shared_expert_gate'].map((role) =>
      m.find((t) => t.role === role)!,
    );
    const H = config.hiddenSize;
    for (let r = 0; r < 2; r++) {
      const tp = { tp: 2, pp: 1, ep: 1 };
      expect(expertShard(config, tp, r).shared).toEqual({ start: r * 24, count: 24 });
      // gate rows [24r, 24r + 24); down columns [24r, 24r + 24) of each of its H rows.
      expect(Array.from(rankSlice(config, tp, r, gate!, whole(gate!))!)).toEqual(
        Array.from({ length: 24 * H }, (_, i) => r * 24 * H + i),
      );
      expect(Array.from(rankSlice(config, tp, r, down!, whole(down!))!)).toEqual(
        Array.from({ length: H * 24 }, (_, i) => Math.floor(i / 24) * 48 + r * 24 + (i % 24)),
      );
      const data = whole(expertGate!);
      expect(rankSlice(config, tp, r, expertGate!, data)).toBe(data);
      for (const ep of [
        { tp: 1, pp: 1, ep: 2 },
        { tp: 2, pp: 1, ep: 2 },
      ]) {
        expect(expertShard(config, ep, r).shared).toEqual({ start: 0, count: 48 });
        const g = whole(gate!);
        expect(rankSlice(config, ep, r, gate!, g)).toBe(g);
      }
    }
  });

  it('a layout that does not divide the shared expert or the dense FFN is refused before loading', async () => {
    const odd = {
      ...config,
      moe: { ...config.moe!, sharedExpertIntermediateSize: 50 },
    };
    await expect(
      CpuModelRunner.create({ config: odd, numBlocks: 4, weights: 'dummy:tiny-qwen2-moe', parallel: { tp: 4 } }),
    ).rejects.toThrow(/tensor parallel size 4 does not divide the shared expert's intermediate size 50/);
    const oddDense = { ...config, intermediateSize: 130 };
    await expect(
      CpuModelRunner.create({ config: oddDense, numBlocks: 4, weights: 'dummy:tiny-qwen2-moe', parallel: { tp: 4 } }),
    ).rejects.toThrow(/tensor parallel size 4 does not divide the model's intermediate size 130/);
  });
});
