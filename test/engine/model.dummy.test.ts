import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BadArgumentError, ModelConfigError } from '../../lib/errors.js';
import {
  DENSE_DUMMY_PRESETS,
  DUMMY_PRESETS,
  Xoshiro128,
  dummyConfig,
  dummyTensor,
  dummyTensorRows,
  dummyTensorSpecs,
  dummyTokenizer,
  dummyWeights,
  isDummyModel,
  loadModelConfig,
  openSafetensors,
  parameterCount,
  parseDummyModel,
  parseModelConfig,
  saveDummyModel,
  toHfConfig,
  type ModelConfig,
} from '../../lib/engine/model/index.js';

const tmp = mkdtempSync(join(tmpdir(), 'tandem-dummy-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const bytesOf = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

describe('dummy presets', () => {
  // Shapes of the public configs, and the parameter counts Meta publishes for them.
  const expected: Record<string, Partial<ModelConfig> & { params?: number }> = {
    tiny: {
      vocabSize: 258,
      hiddenSize: 64,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 2,
      headDim: 16,
      intermediateSize: 128,
      tieWordEmbeddings: false,
      ropeScaling: null,
    },
    'llama-3.2-1b': {
      vocabSize: 128256,
      hiddenSize: 2048,
      numLayers: 16,
      numHeads: 32,
      numKvHeads: 8,
      headDim: 64,
      intermediateSize: 8192,
      tieWordEmbeddings: true,
      ropeTheta: 500000,
      ropeScaling: {
        type: 'llama3',
        factor: 32,
        lowFreqFactor: 1,
        highFreqFactor: 4,
        originalMaxPositionEmbeddings: 8192,
      },
      params: 1_235_814_400,
    },
    'llama-3.1-8b': {
      vocabSize: 128256,
      hiddenSize: 4096,
      numLayers: 32,
      numHeads: 32,
      numKvHeads: 8,
      headDim: 128,
      intermediateSize: 14336,
      tieWordEmbeddings: false,
      ropeTheta: 500000,
      ropeScaling: {
        type: 'llama3',
        factor: 8,
        lowFreqFactor: 1,
        highFreqFactor: 4,
        originalMaxPositionEmbeddings: 8192,
      },
      params: 8_030_261_248,
    },
    'llama-3.1-70b': {
      vocabSize: 128256,
      hiddenSize: 8192,
      numLayers: 80,
      numHeads: 64,
      numKvHeads: 8,
      headDim: 128,
      intermediateSize: 28672,
      tieWordEmbeddings: false,
      ropeTheta: 500000,
      ropeScaling: {
        type: 'llama3',
        factor: 8,
        lowFreqFactor: 1,
        highFreqFactor: 4,
        originalMaxPositionEmbeddings: 8192,
      },
      params: 70_553_706_496,
    },
  };

  it('lists exactly the four presets', () => {
    expect([...DENSE_DUMMY_PRESETS].sort()).toEqual(Object.keys(expected).sort());
  });

  for (const preset of DENSE_DUMMY_PRESETS) {
    it(`dummy:${preset} has the real shapes, names and parameter count`, () => {
      const { params, ...shape } = expected[preset]!;
      const c = dummyConfig(`dummy:${preset}`);
      expect(c).toMatchObject(shape);
      expect(c.architecture).toBe('LlamaForCausalLM');
      expect(c.bosTokenId).toBe(256);
      expect(c.eosTokenIds).toEqual([257]);
      if (params !== undefined) expect(parameterCount(c)).toBe(params);
      // a valid config.json round trip
      expect(parseModelConfig(JSON.parse(JSON.stringify(toHfConfig(c))))).toEqual(c);

      const specs = dummyTensorSpecs(c);
      expect(specs.length).toBe(2 + 9 * c.numLayers + (c.tieWordEmbeddings ? 0 : 1));
      expect(new Set(specs.map((s) => s.name)).size).toBe(specs.length);
      const shapeOf = (name: string) => specs.find((s) => s.name === name)?.shape;
      const last = c.numLayers - 1;
      expect(shapeOf('model.embed_tokens.weight')).toEqual([c.vocabSize, c.hiddenSize]);
      expect(shapeOf(`model.layers.${last}.self_attn.q_proj.weight`)).toEqual([c.numHeads * c.headDim, c.hiddenSize]);
      expect(shapeOf(`model.layers.${last}.self_attn.k_proj.weight`)).toEqual([c.numKvHeads * c.headDim, c.hiddenSize]);
      expect(shapeOf(`model.layers.${last}.self_attn.v_proj.weight`)).toEqual([c.numKvHeads * c.headDim, c.hiddenSize]);
      expect(shapeOf(`model.layers.${last}.self_attn.o_proj.weight`)).toEqual([c.hiddenSize, c.numHeads * c.headDim]);
      expect(shapeOf(`model.layers.${last}.mlp.gate_proj.weight`)).toEqual([c.intermediateSize, c.hiddenSize]);
      expect(shapeOf(`model.layers.${last}.mlp.up_proj.weight`)).toEqual([c.intermediateSize, c.hiddenSize]);
      expect(shapeOf(`model.layers.${last}.mlp.down_proj.weight`)).toEqual([c.hiddenSize, c.intermediateSize]);
      expect(shapeOf(`model.layers.${last}.input_layernorm.weight`)).toEqual([c.hiddenSize]);
      expect(shapeOf(`model.layers.${last}.post_attention_layernorm.weight`)).toEqual([c.hiddenSize]);
      expect(shapeOf(`model.layers.${c.numLayers}.input_layernorm.weight`)).toBeUndefined();
      expect(shapeOf('model.norm.weight')).toEqual([c.hiddenSize]);
      expect(shapeOf('lm_head.weight')).toEqual(c.tieWordEmbeddings ? undefined : [c.vocabSize, c.hiddenSize]);
    });
  }

  it('names and rejects dummy models', () => {
    expect(isDummyModel('dummy:tiny')).toBe(true);
    expect(isDummyModel('/models/llama')).toBe(false);
    expect(parseDummyModel('dummy:llama-3.1-8b')).toBe('llama-3.1-8b');
    expect(() => parseDummyModel('dummy:huge')).toThrow(ModelConfigError);
    expect(() => dummyConfig('dummy:huge')).toThrow(/dummy:huge.*"huge".*dummy:tiny/);
  });

  it('configs are fresh objects', () => {
    const a = dummyConfig('tiny');
    a.numLayers = 99;
    expect(dummyConfig('tiny').numLayers).toBe(2);
  });
});

describe('dummy weights', () => {
  const tiny = dummyConfig('tiny');

  it('the PRNG is deterministic and keyed', () => {
    const draw = (...k: number[]) => {
      const r = new Xoshiro128(...k);
      return Array.from({ length: 8 }, () => r.nextU32());
    };
    expect(draw(1, 2)).toEqual(draw(1, 2));
    expect(draw(1, 2)).not.toEqual(draw(2, 1));
    expect(draw(0)).not.toEqual(draw(0, 0));
    const r = new Xoshiro128(5);
    let sum = 0;
    for (let i = 0; i < 10000; i++) {
      const u = r.nextFloat();
      expect(u >= 0 && u < 1).toBe(true);
      sum += u;
    }
    expect(sum / 10000).toBeGreaterThan(0.48);
    expect(sum / 10000).toBeLessThan(0.52);
    // the bulk fill draws the same sequence as nextFloat
    const [x, y] = [new Xoshiro128(3, 4), new Xoshiro128(3, 4)];
    const filled = new Float32Array(10);
    x.fillCentered(filled, 2, 5, 4);
    expect(Array.from(filled.subarray(2, 7))).toEqual(
      Array.from({ length: 5 }, () => Math.fround((y.nextFloat() - 0.5) * 4)),
    );
    expect(x.nextU32()).toBe(y.nextU32());
    expect(filled[0]).toBe(0);
    expect(filled[7]).toBe(0);
  });

  it('same seed gives the same bytes; another seed gives different ones', () => {
    const a = [...dummyWeights(tiny, 42)];
    const b = [...dummyWeights(tiny, 42)];
    const c = [...dummyWeights(tiny, 43)];
    const big = [...dummyWeights(tiny, 2 ** 40 + 42)];
    expect(a.map((t) => t.name)).toEqual(dummyTensorSpecs(tiny).map((s) => s.name));
    for (let i = 0; i < a.length; i++) {
      const [x, y, z, w] = [a[i]!, b[i]!, c[i]!, big[i]!];
      expect(x.data.length).toBe(x.shape.reduce((p, q) => p * q, 1));
      expect(bytesOf(x.data).equals(bytesOf(y.data))).toBe(true);
      if (x.name.endsWith('norm.weight')) {
        expect(Array.from(x.data).every((v) => v === 1)).toBe(true);
        expect(bytesOf(x.data).equals(bytesOf(z.data))).toBe(true);
      } else {
        expect(bytesOf(x.data).equals(bytesOf(z.data))).toBe(false);
        expect(bytesOf(x.data).equals(bytesOf(w.data))).toBe(false);
      }
    }
    // different tensors of the same shape differ
    const q0 = a.find((t) => t.name === 'model.layers.0.mlp.gate_proj.weight')!.data;
    const q1 = a.find((t) => t.name === 'model.layers.0.mlp.up_proj.weight')!.data;
    expect(bytesOf(q0).equals(bytesOf(q1))).toBe(false);
  });

  it('values have standard deviation 1/sqrt(fan_in) and no structure between rows', () => {
    for (const [name, fanIn] of [
      ['model.layers.1.mlp.down_proj.weight', 128],
      ['model.layers.0.self_attn.k_proj.weight', 64],
      ['model.embed_tokens.weight', 64],
    ] as const) {
      const v = dummyTensor(tiny, 7, name);
      const mean = v.reduce((s, x) => s + x, 0) / v.length;
      const std = Math.sqrt(v.reduce((s, x) => s + (x - mean) ** 2, 0) / v.length);
      expect(Math.abs(mean)).toBeLessThan(0.1 / Math.sqrt(fanIn));
      expect(std).toBeGreaterThan(0.95 / Math.sqrt(fanIn));
      expect(std).toBeLessThan(1.05 / Math.sqrt(fanIn));
      expect(Math.max(...v.map(Math.abs))).toBeLessThanOrEqual(Math.sqrt(3 / fanIn) + 1e-6);
    }
    const e = dummyTensor(tiny, 7, 'model.embed_tokens.weight');
    expect(bytesOf(e.subarray(0, 64)).equals(bytesOf(e.subarray(64, 128)))).toBe(false);
  });

  it('any range of rows equals the same rows of the whole tensor, also for the 70B embedding', () => {
    const whole = dummyTensor(tiny, 9, 'model.embed_tokens.weight');
    const part = dummyTensorRows(tiny, 9, 'model.embed_tokens.weight', 100, 3);
    expect(part).toEqual(whole.subarray(100 * 64, 103 * 64));
    const out = new Float32Array(2 * 64 + 5).fill(-7);
    dummyTensorRows(tiny, 9, 'model.embed_tokens.weight', 257, 1, out);
    expect(out.subarray(0, 64)).toEqual(whole.subarray(257 * 64));
    expect(out[64]).toBe(-7);

    const c70 = dummyConfig('llama-3.1-70b');
    const rows = dummyTensorRows(c70, 1, 'model.embed_tokens.weight', 128_000, 2);
    expect(rows.length).toBe(2 * 8192);
    expect(rows.every(Number.isFinite)).toBe(true);
    expect(dummyTensorRows(c70, 1, 'model.embed_tokens.weight', 128_001, 1)).toEqual(rows.subarray(8192));
    expect(() => dummyTensorRows(tiny, 1, 'model.embed_tokens.weight', 257, 2)).toThrow(BadArgumentError);
    expect(() => dummyTensor(tiny, 1, 'model.layers.2.mlp.up_proj.weight')).toThrow(/no tensor/);
    expect(() => dummyTensor(tiny, -1, 'model.norm.weight')).toThrow(BadArgumentError);
    expect(() => dummyTensor(tiny, 1.5, 'model.norm.weight')).toThrow(BadArgumentError);
  });

  it('a forward pass of dummy:tiny keeps activations finite and logits of unit scale', () => {
    // Minimal fp32 Llama forward (no RoPE: it is a rotation and does not change magnitudes).
    const c = tiny;
    const w = new Map([...dummyWeights(c, 1)].map((t) => [t.name, t.data]));
    const W = (n: string) => w.get(n)!;
    const matvec = (m: Float32Array, x: Float32Array, rows: number) => {
      const cols = x.length;
      const y = new Float32Array(rows);
      for (let r = 0; r < rows; r++) {
        let s = 0;
        for (let k = 0; k < cols; k++) s += m[r * cols + k]! * x[k]!;
        y[r] = s;
      }
      return y;
    };
    const rms = (x: Float32Array, g: Float32Array) => {
      const ms = x.reduce((s, v) => s + v * v, 0) / x.length;
      return x.map((v, i) => (v / Math.sqrt(ms + c.rmsNormEps)) * g[i]!);
    };
    const tokens = dummyTokenizer(c).encode('Hello, tandem!');
    const hs = tokens.map((t) => W('model.embed_tokens.weight').slice(t * c.hiddenSize, (t + 1) * c.hiddenSize));
    const d = c.headDim;
    for (let l = 0; l < c.numLayers; l++) {
      const p = `model.layers.${l}.`;
      const ks: Float32Array[] = [];
      const vs: Float32Array[] = [];
      const qs: Float32Array[] = [];
      for (const h of hs) {
        const x = rms(h, W(`${p}input_layernorm.weight`));
        qs.push(matvec(W(`${p}self_attn.q_proj.weight`), x, c.numHeads * d));
        ks.push(matvec(W(`${p}self_attn.k_proj.weight`), x, c.numKvHeads * d));
        vs.push(matvec(W(`${p}self_attn.v_proj.weight`), x, c.numKvHeads * d));
      }
      hs.forEach((h, t) => {
        const attn = new Float32Array(c.numHeads * d);
        for (let head = 0; head < c.numHeads; head++) {
          const kvh = Math.floor(head / (c.numHeads / c.numKvHeads));
          const scores = ks.slice(0, t + 1).map((k) => {
            let s = 0;
            for (let i = 0; i < d; i++) s += qs[t]![head * d + i]! * k[kvh * d + i]!;
            return s / Math.sqrt(d);
          });
          const m = Math.max(...scores);
          const e = scores.map((s) => Math.exp(s - m));
          const z = e.reduce((a, b) => a + b, 0);
          e.forEach((p_, j) => {
            for (let i = 0; i < d; i++) attn[head * d + i]! += (p_ / z) * vs[j]![kvh * d + i]!;
          });
        }
        const o = matvec(W(`${p}self_attn.o_proj.weight`), attn, c.hiddenSize);
        const h1 = h.map((v, i) => v + o[i]!);
        const x = rms(h1, W(`${p}post_attention_layernorm.weight`));
        const g = matvec(W(`${p}mlp.gate_proj.weight`), x, c.intermediateSize);
        const u = matvec(W(`${p}mlp.up_proj.weight`), x, c.intermediateSize);
        const act = g.map((v, i) => (v / (1 + Math.exp(-v))) * u[i]!);
        const down = matvec(W(`${p}mlp.down_proj.weight`), act, c.hiddenSize);
        hs[t] = h1.map((v, i) => v + down[i]!);
      });
    }
    for (const h of hs) {
      expect(h.every(Number.isFinite)).toBe(true);
      const logits = matvec(W('lm_head.weight'), rms(h, W('model.norm.weight')), c.vocabSize);
      const std = Math.sqrt(logits.reduce((s, v) => s + v * v, 0) / logits.length);
      expect(std).toBeGreaterThan(0.3);
      expect(std).toBeLessThan(3);
    }
  });

  it('saveDummyModel writes a checkpoint that loads back with the same values', () => {
    const dir = join(tmp, 'tiny-f32');
    const written = saveDummyModel(dir, 'dummy:tiny', 5, 'F32');
    expect(written.torchDtype).toBe('float32');
    expect(loadModelConfig(dir)).toEqual(written);
    using ck = openSafetensors(dir);
    const names = dummyTensorSpecs(tiny).map((s) => s.name);
    expect(ck.listTensors()).toEqual(names);
    for (const t of dummyWeights(tiny, 5)) {
      expect(ck.info(t.name).shape).toEqual(t.shape);
      expect(bytesOf(ck.tensorF32(t.name)).equals(bytesOf(t.data))).toBe(true);
    }

    const bf = join(tmp, 'tiny-bf16');
    saveDummyModel(bf, tiny, 5);
    expect(loadModelConfig(bf).torchDtype).toBe('bfloat16');
    using ck2 = openSafetensors(bf);
    const q = ck2.tensorF32('model.layers.1.self_attn.q_proj.weight');
    const ref = dummyTensor(tiny, 5, 'model.layers.1.self_attn.q_proj.weight');
    expect(ck2.info('model.layers.1.self_attn.q_proj.weight').dtype).toBe('BF16');
    q.forEach((v, i) => expect(Math.abs(v - ref[i]!)).toBeLessThanOrEqual(Math.abs(ref[i]!) * 2 ** -8));
  });
});
