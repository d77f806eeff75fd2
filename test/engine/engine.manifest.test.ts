import { mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CheckpointError } from '../../lib/errors.js';
import { loadWeights } from '../../lib/engine/cpu.js';
import { expectedTensors, loadModelConfig, type ModelConfig } from '../../lib/engine/model/config.js';
import { dummyConfig, dummyTensorRecipe, dummyTensorRows } from '../../lib/engine/model/dummy.js';
import {
  checkCheckpointTensors,
  nativeManifest,
  weightManifest,
  type ManifestTensor,
} from '../../lib/engine/model/manifest.js';
import { loadBinding } from '../../lib/native/binding.js';
import { ByteProgress, StartPhases } from '../../lib/engine/model/progress.js';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../../lib/engine/model/safetensors.js';

const FIXTURES = join(import.meta.dirname, '..', 'fixtures');
const tmp = mkdtempSync(join(tmpdir(), 'tandem-manifest-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('weight manifest', () => {
  for (const fixture of ['hf-tiny-llama', 'hf-tiny-qwen2']) {
    it(`matches ${fixture}'s safetensors header: names, shapes and dtype`, () => {
      const dir = join(FIXTURES, fixture);
      const config = loadModelConfig(dir);
      const manifest = weightManifest(config);
      const checkpoint = openSafetensors(dir);
      try {
        const inFile = checkpoint.listTensors().filter((n) => !(config.tieWordEmbeddings && n === 'lm_head.weight'));
        expect(manifest.map((t) => t.name).sort()).toEqual(inFile.sort());
        for (const t of manifest) {
          const info = checkpoint.info(t.name);
          expect(info.shape, t.name).toEqual(t.shape);
          expect(info.dtype, t.name).toBe(t.dtype);
        }
        expect(() => checkCheckpointTensors(manifest, checkpoint, dir)).not.toThrow();
      } finally {
        checkpoint.close();
      }
    });
  }

  it('gives each tensor its role, layer and sharding rule; expectedTensors is its names and shapes', () => {
    const qwen = loadModelConfig(join(FIXTURES, 'hf-tiny-qwen2'));
    const manifest = weightManifest(qwen);
    expect(expectedTensors(qwen)).toEqual(manifest.map(({ name, shape }) => ({ name, shape })));
    const byName = new Map(manifest.map((t) => [t.name, t]));
    const rule = (name: string) => byName.get(name)?.shard;
    expect(rule('model.embed_tokens.weight')).toBe('vocab');
    for (const p of ['q_proj', 'k_proj', 'v_proj']) {
      expect(rule(`model.layers.1.self_attn.${p}.weight`)).toBe('column');
      expect(rule(`model.layers.1.self_attn.${p}.bias`)).toBe('column');
    }
    expect(rule('model.layers.0.self_attn.o_proj.weight')).toBe('row');
    expect(rule('model.layers.0.mlp.gate_proj.weight')).toBe('column');
    expect(rule('model.layers.0.mlp.up_proj.weight')).toBe('column');
    expect(rule('model.layers.0.mlp.down_proj.weight')).toBe('row');
    expect(rule('model.layers.0.input_layernorm.weight')).toBe('replicated');
    expect(rule('model.norm.weight')).toBe('replicated');
    expect(byName.get('model.layers.1.mlp.down_proj.weight')).toMatchObject({ role: 'down', layer: 1 });
    expect(byName.get('model.norm.weight')).toMatchObject({ role: 'final_norm', layer: -1 });
    // Every layer has the same roles, once each.
    const roles = (l: number) => manifest.filter((t) => t.layer === l).map((t) => t.role);
    for (let l = 1; l < qwen.numLayers; l++) expect(roles(l)).toEqual(roles(0));
    expect(new Set(roles(0)).size).toBe(roles(0).length);

    const untied: ModelConfig = { ...dummyConfig('tiny'), attentionOutputBias: true };
    const m = weightManifest(untied);
    expect(m.at(-1)).toMatchObject({ name: 'lm_head.weight', role: 'lm_head', shard: 'vocab' });
    expect(m.find((t) => t.name === 'model.layers.0.self_attn.o_proj.bias')).toMatchObject({ shard: 'replicated' });
    expect(m.every((t) => t.dtype === 'BF16')).toBe(true);
  });

  // A copy of the llama fixture with one tensor removed, or one added.
  function variant(name: string, change: (tensors: [string, TensorToWrite][]) => [string, TensorToWrite][]): string {
    const src = join(FIXTURES, 'hf-tiny-llama');
    const dir = join(tmp, name);
    const checkpoint = openSafetensors(src);
    const tensors: [string, TensorToWrite][] = checkpoint.listTensors().map((n) => {
      const info = checkpoint.info(n);
      return [n, { dtype: 'F32', shape: info.shape, data: checkpoint.tensorF32(n) }];
    });
    checkpoint.close();
    writeSafetensors(join(tmp, `${name}.safetensors`), change(tensors));
    rmSync(dir, { recursive: true, force: true });
    // a directory with the config and the changed file
    mkdirSync(dir);
    writeFileSync(join(dir, 'config.json'), readFileSync(join(src, 'config.json')));
    renameSync(join(tmp, `${name}.safetensors`), join(dir, 'model.safetensors'));
    return dir;
  }

  it('a checkpoint missing a tensor fails with CheckpointError naming it, before any tensor loads', () => {
    const missing = 'model.layers.1.mlp.down_proj.weight';
    const dir = variant('missing', (ts) => ts.filter(([n]) => n !== missing));
    const weights = loadWeights(dir);
    expect(() => weights.next()).toThrow(CheckpointError);
    expect(() => [...loadWeights(dir)]).toThrow(new RegExp(`no tensor "${missing.replace(/\./g, '\\.')}"`));
  });

  it('a checkpoint with a tensor the manifest does not know fails with CheckpointError naming it', () => {
    const extra = 'model.layers.0.mlp.extra_proj.weight';
    const dir = variant('unknown', (ts) => [...ts, [extra, { dtype: 'F32', shape: [2], data: new Float32Array(2) }]]);
    expect(() => loadWeights(dir).next()).toThrow(CheckpointError);
    expect(() => loadWeights(dir).next()).toThrow(/"model\.layers\.0\.mlp\.extra_proj\.weight" is not part of/);
  });

  it('a tensor of the wrong shape names the tensor and both shapes', () => {
    const config = dummyConfig('tiny');
    const manifest: ManifestTensor[] = weightManifest(config);
    const shapes = new Map(manifest.map((t) => [t.name, t.shape]));
    shapes.set('model.norm.weight', [config.hiddenSize + 1]);
    const list = { listTensors: () => [...shapes.keys()], info: (n: string) => ({ shape: shapes.get(n)! }) };
    expect(() => checkCheckpointTensors(manifest, list, 'ckpt')).toThrow(
      /ckpt: tensor "model\.norm\.weight" has shape \[65\]; the config needs \[64\]/,
    );
  });
});

// The formula the GPU kernel (native/kernels/dummy_init.cu) implements, written out here on its own: row r is
// xoshiro128** seeded by splitmix32 steps over (keys..., r); value = fround((u24 / 2^24 - 0.5) * width).
function formulaRow(keys: readonly number[], row: number, cols: number, width: number): Float32Array {
  const G = 0x9e3779b9;
  let s = 0x2545f491;
  const mix = (x: number) => {
    let z = x;
    z = Math.imul(z ^ (z >>> 16), 0x21f0aafd);
    z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
    return (z ^ (z >>> 15)) >>> 0;
  };
  for (const k of [...keys, row]) s = (((s ^ k) + G) | 0) + G;
  const next = () => {
    s = (s + G) | 0;
    return mix(s);
  };
  let [a, b, c, d] = [next(), next(), next(), next()];
  if ((a | b | c | d) === 0) a = 1;
  const out = new Float32Array(cols);
  const rotl = (x: number, k: number) => (x << k) | (x >>> (32 - k));
  for (let i = 0; i < cols; i++) {
    const r = Math.imul(rotl(Math.imul(b, 5), 7), 9) >>> 0;
    const t = b << 9;
    c ^= a;
    d ^= b;
    b ^= c;
    a ^= d;
    c ^= t;
    d = rotl(d, 11);
    out[i] = ((r >>> 8) / 2 ** 24 - 0.5) * width;
  }
  return out;
}

describe('dummy generator', () => {
  const config = dummyConfig('tiny');

  it('CPU values equal the counter-based formula the GPU kernel computes, from the recipe it is given', () => {
    for (const seed of [0, 7, 2 ** 33 + 5]) {
      for (const t of weightManifest(config)) {
        const values = dummyTensorRows(config, seed, t.name);
        const recipe = dummyTensorRecipe(config, seed, t.name);
        if (recipe.kind === 'ones') {
          expect(t.name).toMatch(/norm\.weight$/);
          expect(values.every((v) => v === 1)).toBe(true);
          continue;
        }
        const cols = t.shape.length === 1 ? t.shape[0]! : t.shape[1]!;
        const rows = t.shape.length === 1 ? 1 : t.shape[0]!;
        const fanIn = t.role === 'embed' || t.role === 'lm_head' ? config.hiddenSize : cols;
        expect(recipe.width).toBeCloseTo((2 * Math.sqrt(3)) / Math.sqrt(fanIn), 12);
        expect(recipe.keys[0]).toBe(seed % 2 ** 32);
        expect(recipe.keys[1]).toBe(Math.floor(seed / 2 ** 32));
        for (const r of [0, 1, rows - 1]) {
          expect(values.subarray(r * cols, (r + 1) * cols), `${t.name} row ${r}`).toEqual(
            formulaRow(recipe.keys, r, cols, recipe.width),
          );
        }
      }
    }
  });

  it('tensors of the same shape get different keys (the name is hashed into them)', () => {
    const a = dummyTensorRecipe(config, 0, 'model.layers.0.mlp.gate_proj.weight');
    const b = dummyTensorRecipe(config, 0, 'model.layers.0.mlp.up_proj.weight');
    expect(a.kind === 'uniform' && b.kind === 'uniform' && a.keys[2] !== b.keys[2]).toBe(true);
  });
});

describe('start-up log', () => {
  it('phases log their time; progress is throttled and ends with a summary', async () => {
    let now = 0;
    const lines: string[] = [];
    const phases = new StartPhases(
      (l) => lines.push(l),
      () => now,
    );
    await phases.run('open device', () => {
      now += 812;
    });
    expect(lines).toEqual(['open device: 812 ms']);
    const progress = new ByteProgress(
      'loading weights',
      16.1e9,
      (l) => lines.push(l),
      () => now,
      1000,
    );
    for (let i = 0; i < 10; i++) {
      now += 100;
      progress.add(0.21e9);
    }
    expect(lines.length).toBe(2); // one line after a second, not one per tensor
    expect(lines[1]).toBe('loading weights 13% (2.1/16.1 GB, 2.1 GB/s, ETA 7 s)');
    progress.finish();
    expect(lines[2]).toBe('loading weights: 2.1 GB in 1000 ms (2.1 GB/s)');
    expect(phases.elapsedMs()).toBe(1812);
  });
});

describe('native runners take their weights from the manifest', () => {
  const config = { ...dummyConfig('tiny'), maxPositionEmbeddings: 64 };
  const rawOptions = (tensors: { name: string; role: string; layer: number }[]) => ({
    ...config,
    tensors,
    numBlocks: 2,
    blockSize: 16,
    layout: 'block-major' as const,
    kvBuffer: new Uint8Array(2 * config.numLayers * 2 * 16 * config.numKvHeads * config.headDim * 4),
  });

  it('registers each tensor under the name the manifest gives', () => {
    const { binding } = loadBinding();
    const tensors = nativeManifest(weightManifest(config)).map((t) =>
      t.role === 'final_norm' ? { ...t, name: 'model.final_norm.renamed' } : t,
    );
    const raw = new binding.CpuLlama(rawOptions(tensors));
    try {
      expect(raw.missingWeights()).toEqual(tensors.map((t) => t.name));
      expect(() => raw.setWeight('model.norm.weight', new Float32Array(config.hiddenSize))).toThrow(
        /'model\.norm\.weight' is not part of this model/,
      );
      raw.setWeight('model.final_norm.renamed', new Float32Array(config.hiddenSize));
      expect(raw.missingWeights()).not.toContain('model.final_norm.renamed');
    } finally {
      raw.dispose();
    }
  });

  it('an incomplete, duplicated or misplaced manifest is refused, naming the tensor or role', () => {
    const { binding } = loadBinding();
    const full = nativeManifest(weightManifest(config));
    const without = full.filter((t) => !(t.role === 'down' && t.layer === 1));
    expect(() => new binding.CpuLlama(rawOptions(without))).toThrow(/no tensor for down of layer 1/);
    const twice = [...full, { ...full[3]!, name: 'copy' }];
    expect(() => new binding.CpuLlama(rawOptions(twice))).toThrow(/two tensors for .* the second 'copy'/);
    const badLayer = full.map((t) => (t.role === 'q' && t.layer === 0 ? { ...t, layer: 9 } : t));
    expect(() => new binding.CpuLlama(rawOptions(badLayer))).toThrow(/has layer 9; the model has layers 0\.\.1/);
    const badRole = [...full, { name: 'x', role: 'lora_a', layer: 0 }];
    expect(() => new binding.CpuLlama(rawOptions(badRole))).toThrow(/unknown weight role 'lora_a'/);
    const tiedHead = [...full.filter((t) => t.role !== 'lm_head')];
    expect(() => new binding.CpuLlama(rawOptions(tiedHead))).toThrow(/no tensor for lm_head/);
    expect(() => new binding.CpuLlama({ ...rawOptions(full), tensors: undefined as never })).toThrow(
      /option 'tensors' must be the weight manifest/,
    );
  });
});
