import { mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CheckpointError, ModelConfigError } from '../../lib/errors.js';
import {
  SafetensorsCheckpoint,
  SafetensorsFile,
  f32ToF16Bits,
  openSafetensors,
  writeSafetensors,
} from '../../lib/engine/model/index.js';

const tmp = mkdtempSync(join(tmpdir(), 'tandem-st-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

let n = 0;
const fresh = (name = 'x.safetensors') => join(tmp, `${n++}-${name}`);

/** Deterministic values over a wide range of magnitudes and both signs. */
function values(count: number, seed = 1): Float32Array {
  const out = new Float32Array(count);
  let s = seed;
  for (let i = 0; i < count; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    const u = s / 2 ** 32;
    out[i] = (u - 0.5) * 2 ** ((i % 13) - 6);
  }
  return out;
}

/** A safetensors file built by hand from a header object (independent of writeSafetensors). */
function handMade(path: string, header: unknown, data: Uint8Array, headerOverride?: Buffer): void {
  const json = headerOverride ?? Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, data]));
}

function expectCheckpointError(fn: () => unknown, ...parts: string[]): CheckpointError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(CheckpointError);
  expect(caught).toBeInstanceOf(ModelConfigError);
  const err = caught as CheckpointError;
  expect(err.code).toBe('TANDEM_BAD_CHECKPOINT');
  for (const p of parts) expect(err.message).toContain(p);
  return err;
}

describe('safetensors round trip', () => {
  it('F32 is exact, including -0, infinities, NaN and subnormals; header is 8-byte aligned', () => {
    const path = fresh();
    const special = new Float32Array([0, -0, Infinity, -Infinity, NaN, 1e-45, -3.4e38, 1 / 3]);
    const big = values(3 * 5 * 7);
    writeSafetensors(
      path,
      { special: { dtype: 'F32', shape: [8], data: special }, big: { dtype: 'F32', shape: [3, 5, 7], data: big } },
      { format: 'pt' },
    );
    const bytes = readFileSync(path);
    const headerLen = Number(bytes.readBigUInt64LE(0));
    expect(headerLen % 8).toBe(0);
    expect(bytes.length).toBe(8 + headerLen + 8 * 4 + 105 * 4);
    using f = SafetensorsFile.open(path);
    expect(f.listTensors()).toEqual(['special', 'big']);
    expect(f.metadata).toEqual({ format: 'pt' });
    expect(f.info('big')).toMatchObject({ dtype: 'F32', shape: [3, 5, 7], byteLength: 420, file: path });
    expect(Array.from(f.tensorF32('special'))).toEqual(Array.from(special));
    expect(Object.is(f.tensorF32('special')[1], -0)).toBe(true);
    expect(f.tensorF32('big')).toEqual(big);
  });

  it('BF16 rounds to nearest even and reads back exactly what was stored', () => {
    const path = fresh();
    const exact = new Float32Array([
      1, // 0x3f80
      1 + 2 ** -8, // halfway between 1 and 1+2^-7: ties to even, 1
      1 + 3 * 2 ** -8, // halfway between 1+2^-7 and 1+2^-6: ties to even, 1+2^-6
      1 + 2 ** -8 + 2 ** -20, // just above half: rounds up to 1+2^-7
      Math.PI, // 3.140625
      -2.5,
      65504,
    ]);
    const expected = [1, 1, 1 + 2 ** -6, 1 + 2 ** -7, 3.140625, -2.5, 65536];
    const random = values(4096, 7);
    writeSafetensors(path, [
      ['exact', { dtype: 'BF16', shape: [exact.length], data: exact }],
      ['random', { dtype: 'BF16', shape: [64, 64], data: random }],
      ['bits', { dtype: 'BF16', shape: [2], data: new Uint16Array([0x3f80, 0xc020]) }],
    ]);
    using ck = openSafetensors(path);
    expect(Array.from(ck.tensorF32('exact'))).toEqual(expected);
    expect(ck.readRaw('exact').readUInt16LE(0)).toBe(0x3f80);
    expect(Array.from(ck.tensorF32('bits'))).toEqual([1, -2.5]);
    const back = ck.tensorF32('random');
    for (let i = 0; i < random.length; i++) {
      const x = random[i]!;
      // bf16 keeps 8 significant bits: error at most half an ulp, 2^-8 of |x|.
      expect(Math.abs(back[i]! - x)).toBeLessThanOrEqual(Math.abs(x) * 2 ** -8);
      // and the stored value has only 8 significant bits.
      const bits = new Uint32Array(new Float32Array([back[i]!]).buffer)[0]!;
      expect(bits & 0xffff).toBe(0);
    }
    expect(back.some((v, i) => v !== random[i])).toBe(true);
  });

  it('F16 conversion: normals, subnormals, overflow, ties to even, NaN', () => {
    const cases: [number, number][] = [
      [1, 0x3c00],
      [-2, 0xc000],
      [0.1, 0x2e66],
      [65504, 0x7bff],
      [65519, 0x7bff], // below the halfway point to 65536
      [65520, 0x7c00], // rounds to infinity
      [2 ** -24, 0x0001], // smallest subnormal
      [2 ** -25, 0x0000], // tie with zero: even
      [1.5 * 2 ** -25, 0x0001],
      [3 * 2 ** -25, 0x0002], // tie between 1 and 2 subnormal ulps: even
      [2 ** -14, 0x0400], // smallest normal
      [1 + 2 ** -11, 0x3c00], // tie: even
      [1 + 3 * 2 ** -11, 0x3c02], // tie: even (up)
      [-Infinity, 0xfc00],
      [-0, 0x8000],
    ];
    for (const [v, bits] of cases) expect([v, f32ToF16Bits(v)]).toEqual([v, bits]);
    expect(f32ToF16Bits(NaN) & 0x7c00).toBe(0x7c00);
    expect(f32ToF16Bits(NaN) & 0x3ff).not.toBe(0);

    const path = fresh();
    const random = values(1000, 3);
    const input = new Float32Array(cases.map(([v]) => v));
    writeSafetensors(path, {
      a: { dtype: 'F16', shape: [input.length], data: input },
      r: { dtype: 'F16', shape: [10, 100], data: random },
    });
    using ck = openSafetensors(path);
    const raw = ck.readRaw('a');
    cases.forEach(([, bits], i) => expect(raw.readUInt16LE(2 * i)).toBe(bits));
    const back = ck.tensorF32('a');
    expect(back[0]).toBe(1);
    expect(back[5]).toBe(Infinity);
    expect(back[6]).toBe(2 ** -24);
    expect(back[2]).toBeCloseTo(0.0999755859375, 12);
    const r = ck.tensorF32('r');
    for (let i = 0; i < random.length; i++) {
      const x = random[i]!;
      // values here are normal in f16 (|x| >= 2^-14 or tiny absolute error)
      expect(Math.abs(r[i]! - x)).toBeLessThanOrEqual(Math.max(Math.abs(x) * 2 ** -11, 2 ** -25));
    }
  });

  it('reads a hand-made file: unpadded header, tensors out of order, raw reads into a target', () => {
    const path = fresh();
    const a = new Float32Array([1, 2, 3, 4, 5, 6]);
    const b = new Uint16Array([0x3f80, 0x4000, 0x4040]); // bf16 1, 2, 3
    const data = Buffer.concat([Buffer.from(b.buffer), Buffer.from(a.buffer)]);
    handMade(
      path,
      {
        a: { dtype: 'F32', shape: [2, 3], data_offsets: [6, 30] },
        b: { dtype: 'BF16', shape: [3], data_offsets: [0, 6] },
        i: { dtype: 'I32', shape: [0], data_offsets: [30, 30] },
      },
      data,
    );
    using f = SafetensorsFile.open(path);
    expect(f.listTensors()).toEqual(['a', 'b', 'i']);
    expect(Array.from(f.tensorF32('a'))).toEqual([1, 2, 3, 4, 5, 6]);
    expect(Array.from(f.tensorF32('b'))).toEqual([1, 2, 3]);
    const target = Buffer.alloc(40, 0xee);
    f.readRaw('a', target);
    expect(new Float32Array(target.buffer.slice(target.byteOffset, target.byteOffset + 24))).toEqual(a);
    expect(target[24]).toBe(0xee);
    expectCheckpointError(() => f.readRaw('a', Buffer.alloc(10)), 'tensor "a"', 'needs 24');
    expectCheckpointError(() => f.tensorF32('i'), path, 'tensor "i"', 'I32');
    expectCheckpointError(() => f.info('zzz'), path, '"zzz"');
    f.close();
    expectCheckpointError(() => f.readRaw('a'), path, 'closed');
  });
});

describe('sharded checkpoints', () => {
  function shardedDir() {
    const dir = fresh('sharded');
    mkdirSync(dir);
    const w1 = values(12, 11);
    const w2 = values(20, 12);
    const w3 = values(4, 13);
    writeSafetensors(join(dir, 'model-00001-of-00002.safetensors'), {
      'model.embed_tokens.weight': { dtype: 'BF16', shape: [3, 4], data: w1 },
      'model.norm.weight': { dtype: 'F32', shape: [4], data: w3 },
    });
    writeSafetensors(join(dir, 'model-00002-of-00002.safetensors'), {
      'lm_head.weight': { dtype: 'F16', shape: [5, 4], data: w2 },
    });
    const index = {
      metadata: { total_size: 12 * 2 + 16 + 40 },
      weight_map: {
        'model.embed_tokens.weight': 'model-00001-of-00002.safetensors',
        'model.norm.weight': 'model-00001-of-00002.safetensors',
        'lm_head.weight': 'model-00002-of-00002.safetensors',
      },
    };
    writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify(index));
    return { dir, w1, w2, w3, index };
  }

  it('opens a directory through its index and reads each tensor from its shard', () => {
    const { dir, w2, w3 } = shardedDir();
    using ck = SafetensorsCheckpoint.open(dir);
    expect(ck.files.length).toBe(2);
    expect(ck.listTensors().sort()).toEqual(['lm_head.weight', 'model.embed_tokens.weight', 'model.norm.weight']);
    expect(ck.info('lm_head.weight').file).toBe(join(dir, 'model-00002-of-00002.safetensors'));
    expect(ck.info('lm_head.weight').dtype).toBe('F16');
    expect(ck.tensorF32('model.norm.weight')).toEqual(w3);
    const lm = ck.tensorF32('lm_head.weight');
    lm.forEach((v, i) => expect(Math.abs(v - w2[i]!)).toBeLessThanOrEqual(Math.abs(w2[i]!) * 2 ** -11 + 2 ** -25));
    expect(ck.info('model.embed_tokens.weight').shape).toEqual([3, 4]);
    expectCheckpointError(() => ck.tensorF32('missing'), '"missing"');
  });

  it('prefers the index when both exist; falls back to model.safetensors', () => {
    const { dir } = shardedDir();
    writeSafetensors(join(dir, 'model.safetensors'), {
      only: { dtype: 'F32', shape: [1], data: new Float32Array([9]) },
    });
    using ck = openSafetensors(dir);
    expect(ck.has('only')).toBe(false);
    rmSync(join(dir, 'model.safetensors.index.json'));
    using single = openSafetensors(dir);
    expect(single.listTensors()).toEqual(['only']);
    expect(single.tensorF32('only')[0]).toBe(9);
  });

  it('rejects an index naming a tensor its shard lacks, a missing shard, or a path outside the directory', () => {
    const { dir, index } = shardedDir();
    const indexPath = join(dir, 'model.safetensors.index.json');
    writeFileSync(
      indexPath,
      JSON.stringify({
        weight_map: { ...index.weight_map, 'model.layers.0.mlp.up_proj.weight': 'model-00002-of-00002.safetensors' },
      }),
    );
    expectCheckpointError(
      () => openSafetensors(dir),
      'model-00002-of-00002.safetensors',
      '"model.layers.0.mlp.up_proj.weight"',
    );
    writeFileSync(
      indexPath,
      JSON.stringify({ weight_map: { ...index.weight_map, x: 'model-00003-of-00003.safetensors' } }),
    );
    expectCheckpointError(() => openSafetensors(dir), 'model-00003-of-00003.safetensors', 'cannot open');
    writeFileSync(indexPath, JSON.stringify({ weight_map: { x: '../elsewhere.safetensors' } }));
    expectCheckpointError(() => openSafetensors(dir), 'weight_map["x"]');
    writeFileSync(indexPath, JSON.stringify({ metadata: {} }));
    expectCheckpointError(() => openSafetensors(dir), indexPath, '"weight_map"');
  });

  it('rejects a tensor present in two shards, and a directory with no checkpoint', () => {
    const dir = fresh('dup');
    mkdirSync(dir);
    const t = { dtype: 'F32' as const, shape: [1], data: new Float32Array([1]) };
    writeSafetensors(join(dir, 'a.safetensors'), { w: t });
    writeSafetensors(join(dir, 'b.safetensors'), { w: t, v: t });
    writeFileSync(
      join(dir, 'model.safetensors.index.json'),
      JSON.stringify({ weight_map: { w: 'a.safetensors', v: 'b.safetensors' } }),
    );
    expectCheckpointError(() => openSafetensors(dir), '"w"', 'also appears');
    const empty = fresh('empty');
    mkdirSync(empty);
    expectCheckpointError(() => openSafetensors(empty), empty, 'model.safetensors');
    expectCheckpointError(() => openSafetensors(join(empty, 'nope')), 'nope');
  });
});

describe('corrupt and truncated files', () => {
  function good() {
    const path = fresh();
    writeSafetensors(path, {
      first: { dtype: 'F32', shape: [16], data: values(16) },
      second: { dtype: 'BF16', shape: [4, 8], data: values(32) },
    });
    return path;
  }

  it('a file truncated inside the data names the file and the tensor cut short', () => {
    const path = good();
    const size = readFileSync(path).length;
    truncateSync(path, size - 10);
    expectCheckpointError(() => SafetensorsFile.open(path), path, 'tensor "second"', 'truncated');
  });

  it('a file truncated inside the header or its length', () => {
    const path = good();
    truncateSync(path, 20);
    expectCheckpointError(() => SafetensorsFile.open(path), path, 'truncated');
    truncateSync(path, 5);
    expectCheckpointError(() => SafetensorsFile.open(path), path, 'truncated');
  });

  it('an absurd header length, invalid JSON, or a non-object header', () => {
    const path = good();
    const bytes = readFileSync(path);
    bytes.writeBigUInt64LE(2n ** 40n, 0);
    writeFileSync(path, bytes);
    expectCheckpointError(() => SafetensorsFile.open(path), path, 'header length');
    handMade(path, null, new Uint8Array(0), Buffer.from('{"a": {"dtype": "F32"'));
    expectCheckpointError(() => SafetensorsFile.open(path), path, 'not valid JSON');
    handMade(path, [1, 2], new Uint8Array(0));
    expectCheckpointError(() => SafetensorsFile.open(path), path, 'not a JSON object');
  });

  it('entries inconsistent with their shape, dtype or neighbours name the tensor', () => {
    const data = new Uint8Array(64);
    const path = fresh();
    const cases: [Record<string, unknown>, string[]][] = [
      [{ w: { dtype: 'F32', shape: [4], data_offsets: [0, 12] } }, ['tensor "w"', 'needs 16']],
      [{ w: { dtype: 'Q4', shape: [4], data_offsets: [0, 16] } }, ['tensor "w"', 'unknown dtype']],
      [{ w: { dtype: 'F32', shape: [-1], data_offsets: [0, 16] } }, ['tensor "w"', 'shape']],
      [{ w: { dtype: 'F32', shape: [4], data_offsets: [16, 0] } }, ['tensor "w"', 'data_offsets']],
      [{ w: { dtype: 'F32', shape: [32], data_offsets: [0, 128] } }, ['tensor "w"', 'truncated']],
      [
        {
          w: { dtype: 'F32', shape: [4], data_offsets: [0, 16] },
          v: { dtype: 'F32', shape: [4], data_offsets: [8, 24] },
        },
        ['"w"', '"v"', 'overlap'],
      ],
      [{ __metadata__: { a: 1 } }, ['__metadata__']],
      [{ w: 'F32' }, ['tensor "w"']],
    ];
    for (const [header, parts] of cases) {
      handMade(path, header, data);
      expectCheckpointError(() => SafetensorsFile.open(path), path, ...parts);
    }
  });

  it('writeSafetensors rejects data that does not match the shape', () => {
    const path = fresh();
    expectCheckpointError(
      () => writeSafetensors(path, { w: { dtype: 'F32', shape: [2, 3], data: new Float32Array(5) } }),
      'tensor "w"',
      '5 values',
    );
  });
});
