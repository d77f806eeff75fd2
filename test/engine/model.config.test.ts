import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ModelConfigError, TandemError } from '../../lib/errors.js';
import {
  expectedTensors,
  loadModelConfig,
  parameterCount,
  parseModelConfig,
  toHfConfig,
} from '../../lib/engine/model/index.js';

// Abridged copies of the public config.json files.
const LLAMA_31_8B = {
  architectures: ['LlamaForCausalLM'],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009],
  hidden_act: 'silu',
  hidden_size: 4096,
  initializer_range: 0.02,
  intermediate_size: 14336,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: 'llama',
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 8,
  pretraining_tp: 1,
  rms_norm_eps: 1e-5,
  rope_scaling: {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
    rope_type: 'llama3',
  },
  rope_theta: 500000.0,
  tie_word_embeddings: false,
  torch_dtype: 'bfloat16',
  transformers_version: '4.43.0.dev0',
  use_cache: true,
  vocab_size: 128256,
};

const QWEN25_05B = {
  architectures: ['Qwen2ForCausalLM'],
  attention_dropout: 0.0,
  bos_token_id: 151643,
  eos_token_id: 151643,
  hidden_act: 'silu',
  hidden_size: 896,
  initializer_range: 0.02,
  intermediate_size: 4864,
  max_position_embeddings: 32768,
  max_window_layers: 24,
  model_type: 'qwen2',
  num_attention_heads: 14,
  num_hidden_layers: 24,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000.0,
  sliding_window: 32768,
  tie_word_embeddings: true,
  torch_dtype: 'bfloat16',
  use_cache: true,
  use_sliding_window: false,
  vocab_size: 151936,
};

const MISTRAL_7B_V01 = {
  architectures: ['MistralForCausalLM'],
  bos_token_id: 1,
  eos_token_id: 2,
  hidden_act: 'silu',
  hidden_size: 4096,
  intermediate_size: 14336,
  max_position_embeddings: 32768,
  model_type: 'mistral',
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-5,
  rope_theta: 10000.0,
  sliding_window: 4096,
  tie_word_embeddings: false,
  torch_dtype: 'bfloat16',
  vocab_size: 32000,
};

const tmp = mkdtempSync(join(tmpdir(), 'tandem-config-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function expectError(fn: () => unknown, ...parts: string[]): ModelConfigError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(ModelConfigError);
  expect(caught).toBeInstanceOf(TandemError);
  const err = caught as ModelConfigError;
  expect(err.code).toBe('TANDEM_BAD_MODEL');
  for (const p of parts) expect(err.message).toContain(p);
  return err;
}

describe('parseModelConfig', () => {
  it('reads Llama 3.1 8B, including llama3 rope scaling and a list of eos ids', () => {
    const c = parseModelConfig(LLAMA_31_8B);
    expect(c).toEqual({
      architecture: 'LlamaForCausalLM',
      vocabSize: 128256,
      hiddenSize: 4096,
      intermediateSize: 14336,
      numLayers: 32,
      numHeads: 32,
      numKvHeads: 8,
      headDim: 128,
      rmsNormEps: 1e-5,
      ropeTheta: 500000,
      ropeScaling: {
        type: 'llama3',
        factor: 8,
        lowFreqFactor: 1,
        highFreqFactor: 4,
        originalMaxPositionEmbeddings: 8192,
      },
      maxPositionEmbeddings: 131072,
      tieWordEmbeddings: false,
      attentionBias: false,
      attentionOutputBias: false,
      slidingWindow: null,
      bosTokenId: 128000,
      eosTokenIds: [128001, 128008, 128009],
      torchDtype: 'bfloat16',
    });
    expect(parameterCount(c)).toBe(8_030_261_248);
  });

  it('reads Qwen2: q/k/v bias, tied embeddings, a single eos id, no sliding window unless enabled', () => {
    const c = parseModelConfig(QWEN25_05B);
    expect(c.architecture).toBe('Qwen2ForCausalLM');
    expect(c.attentionBias).toBe(true);
    expect(c.attentionOutputBias).toBe(false);
    expect(c.tieWordEmbeddings).toBe(true);
    expect(c.headDim).toBe(64);
    expect(c.eosTokenIds).toEqual([151643]);
    expect(c.slidingWindow).toBeNull();
    expect(c.ropeScaling).toBeNull();
    expect(c.rmsNormEps).toBe(1e-6);
    const names = expectedTensors(c).map((t) => t.name);
    expect(names).toContain('model.layers.0.self_attn.q_proj.bias');
    expect(names).toContain('model.layers.23.self_attn.v_proj.bias');
    expect(names).not.toContain('model.layers.0.self_attn.o_proj.bias');
    expect(names).not.toContain('lm_head.weight');
    const kBias = expectedTensors(c).find((t) => t.name === 'model.layers.0.self_attn.k_proj.bias');
    expect(kBias?.shape).toEqual([2 * 64]);
    // Qwen2.5-0.5B has 494,032,768 parameters.
    expect(parameterCount(c)).toBe(494_032_768);
    expect(parseModelConfig({ ...QWEN25_05B, use_sliding_window: true }).slidingWindow).toBe(32768);
  });

  it('reads Mistral with its sliding window', () => {
    const c = parseModelConfig(MISTRAL_7B_V01);
    expect(c.architecture).toBe('MistralForCausalLM');
    expect(c.slidingWindow).toBe(4096);
    expect(c.attentionBias).toBe(false);
    expect(parseModelConfig({ ...MISTRAL_7B_V01, sliding_window: null }).slidingWindow).toBeNull();
  });

  it('applies defaults: kv heads = heads, explicit head_dim, model_type when architectures is absent', () => {
    const { architectures: _a, num_key_value_heads: _k, rope_scaling: _r, torch_dtype: _d, ...rest } = LLAMA_31_8B;
    const c = parseModelConfig({ ...rest, head_dim: 64, dtype: 'float16' });
    expect(c.architecture).toBe('LlamaForCausalLM');
    expect(c.numKvHeads).toBe(32);
    expect(c.headDim).toBe(64);
    expect(c.ropeScaling).toBeNull();
    expect(c.torchDtype).toBe('float16');
    expect(parseModelConfig({ ...LLAMA_31_8B, rope_scaling: { rope_type: 'default' } }).ropeScaling).toBeNull();
    expect(parseModelConfig({ ...LLAMA_31_8B, head_dim: null }).headDim).toBe(128);
    const llamaBias = parseModelConfig({ ...LLAMA_31_8B, attention_bias: true });
    expect(llamaBias.attentionBias && llamaBias.attentionOutputBias).toBe(true);
  });

  it('round-trips through toHfConfig', () => {
    for (const json of [LLAMA_31_8B, QWEN25_05B, MISTRAL_7B_V01]) {
      const c = parseModelConfig(json);
      expect(parseModelConfig(JSON.parse(JSON.stringify(toHfConfig(c))))).toEqual(c);
    }
  });

  it('rejects unsupported architectures, naming the file and the field', () => {
    expectError(
      () => parseModelConfig({ ...LLAMA_31_8B, architectures: ['GPT2LMHeadModel'] }, '/m/config.json'),
      '/m/config.json',
      '"architectures"',
      'GPT2LMHeadModel',
    );
    const { architectures: _a, ...noArch } = LLAMA_31_8B;
    expectError(() => parseModelConfig({ ...noArch, model_type: 'gpt2' }, 'x.json'), 'x.json', '"model_type"', 'gpt2');
    expectError(() => parseModelConfig([], 'x.json'), 'x.json', 'not a JSON object');
  });

  it('rejects missing and invalid fields, naming each', () => {
    const { hidden_size: _h, ...noHidden } = LLAMA_31_8B;
    expectError(() => parseModelConfig(noHidden, 'a/config.json'), 'a/config.json', '"hidden_size"', 'missing');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, vocab_size: -3 }), '"vocab_size"', '-3');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, num_hidden_layers: 2.5 }), '"num_hidden_layers"');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, intermediate_size: '14336' }), '"intermediate_size"');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, num_key_value_heads: 5 }), '"num_key_value_heads"', 'divide');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, num_attention_heads: 48 }), '"hidden_size"', 'multiple');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, rms_norm_eps: 0 }), '"rms_norm_eps"');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, tie_word_embeddings: 'yes' }), '"tie_word_embeddings"');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, eos_token_id: ['x'] }), '"eos_token_id"');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, torch_dtype: 'int8' }), '"torch_dtype"', 'int8');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, hidden_act: 'gelu' }), '"hidden_act"');
    expectError(() => parseModelConfig({ ...LLAMA_31_8B, mlp_bias: true }), '"mlp_bias"');
    expectError(
      () => parseModelConfig({ ...LLAMA_31_8B, rope_scaling: { rope_type: 'yarn', factor: 4 } }),
      '"rope_scaling.rope_type"',
      'yarn',
    );
    const { low_freq_factor: _l, ...scaling } = LLAMA_31_8B.rope_scaling;
    expectError(
      () => parseModelConfig({ ...LLAMA_31_8B, rope_scaling: scaling }),
      '"rope_scaling.low_freq_factor"',
      'missing',
    );
  });
});

describe('loadModelConfig', () => {
  it('reads <dir>/config.json and names the file in errors', () => {
    const dir = join(tmp, 'good');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(tmp, 'config.json'), JSON.stringify(QWEN25_05B));
    expect(loadModelConfig(tmp).vocabSize).toBe(151936);
    expect(loadModelConfig(join(tmp, 'config.json')).tieWordEmbeddings).toBe(true);

    writeFileSync(join(tmp, 'bad.json'), '{"architectures": [');
    expectError(() => loadModelConfig(join(tmp, 'bad.json')), join(tmp, 'bad.json'), 'not valid JSON');

    writeFileSync(join(tmp, 'novocab.json'), JSON.stringify({ ...QWEN25_05B, vocab_size: undefined }));
    expectError(() => loadModelConfig(join(tmp, 'novocab.json')), join(tmp, 'novocab.json'), '"vocab_size"');

    expectError(() => loadModelConfig(join(tmp, 'nope')), join(tmp, 'nope'));
    expectError(() => loadModelConfig(dir), join(dir, 'config.json'), 'cannot read');
  });
});
