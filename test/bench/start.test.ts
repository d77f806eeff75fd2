import { spawnSync } from 'node:child_process';
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  statfsSync,
  statSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadModelConfig } from '../../lib/engine/model/config.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { openSafetensors } from '../../lib/engine/model/safetensors.js';
import { loadTokenizer } from '../../lib/engine/tokenizer.js';
import { runTs } from '../helpers/cli.js';

// bench:start (bench/start.ts) on the CPU with dummy:tiny: the checkpoint it writes (a published checkpoint's layout:
// sharded, indexed, bf16, with a tokenizer), the disk and Tandem rows measured on it in a fresh process each, the
// JSON and chart, the clean-up, the reuse of a checkpoint already there, and its refusals.
const root = mkdtempSync(join(tmpdir(), 'tandem-start-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
const TINY = ['--model', 'dummy:tiny', '--device', 'cpu', '--torch', 'off', '--runs', '1'];

interface StartJson {
  complete: boolean;
  checkpoint: {
    reused: boolean;
    shards: { file: string; bytes: number }[];
    fileBytes: number;
    tensorBytes: number;
    tensors: number;
  };
  filesystem: { type: string; freeBytes: number };
  rows: { row: string; seconds: number[]; median: number; bytes: number; cache: string; errors: string[] }[];
  tandemPhases: { run: number; phases: { phase: string; ms: number }[] };
  measurements: { row: string; run: number; finite?: boolean; log?: string[]; cache: { method: string } }[];
}

const torchHere =
  spawnSync('python3', ['-c', 'import torch, safetensors'], { encoding: 'utf8', timeout: 120_000 }).status === 0;

describe('bench:start', () => {
  it('writes a sharded bf16 checkpoint with a tokenizer, measures the disk and Tandem on it, and keeps it with --keep', () => {
    const dir = join(root, 'kept');
    const json = join(root, 'kept.json');
    const r = runTs('bench/start.ts', ['--dir', dir, ...TINY, '--keep', '--json', json], {}, 120_000);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/filesystem \S+, [\d.]+ \S+ free of/);
    expect(r.stderr).toContain('writing a dummy:tiny checkpoint (bf16, 4 shards');
    expect(r.stderr).toContain('kept the checkpoint');
    expect(r.stdout).toMatch(/^disk: sequential read of the shards\s+(cold|warm)\s/m);
    expect(r.stdout).toMatch(/^Tandem: openModel to ready\s+(cold|warm)\s/m);
    expect(r.stdout).toMatch(/^ {2}config and tokenizer: \d+ ms$/m);

    // The layout of a published checkpoint: the index maps every tensor to a shard that holds it.
    const index = JSON.parse(readFileSync(join(dir, 'model.safetensors.index.json'), 'utf8')) as {
      metadata: { total_size: number };
      weight_map: Record<string, string>;
    };
    const shards = [...new Set(Object.values(index.weight_map))].sort();
    expect(shards).toEqual([1, 2, 3, 4].map((i) => `model-0000${i}-of-00004.safetensors`));
    const checkpoint = openSafetensors(dir);
    let tensorBytes = 0;
    try {
      for (const [name, file] of Object.entries(index.weight_map)) {
        const info = checkpoint.info(name);
        expect(info.file).toBe(join(dir, file));
        expect(info.dtype).toBe('BF16');
        tensorBytes += info.byteLength;
        const values = checkpoint.tensorF32(name);
        expect(values.every((x) => Number.isFinite(x) && Math.abs(x) <= 1)).toBe(true);
      }
      expect(checkpoint.listTensors().sort()).toEqual(Object.keys(index.weight_map).sort());
    } finally {
      checkpoint.close();
    }
    expect(index.metadata.total_size).toBe(tensorBytes);

    // The config round-trips: the preset's shape, with the tokenizer's ids (its 384 ids over the preset's 258).
    const config = loadModelConfig(dir);
    const tiny = dummyConfig('tiny');
    expect(config).toMatchObject({
      architecture: tiny.architecture,
      hiddenSize: tiny.hiddenSize,
      numLayers: tiny.numLayers,
      numHeads: tiny.numHeads,
      numKvHeads: tiny.numKvHeads,
      intermediateSize: tiny.intermediateSize,
      vocabSize: 384,
      bosTokenId: 0,
      eosTokenIds: [1],
      torchDtype: 'bfloat16',
    });
    const tokenizer = loadTokenizer(dir, config.eosTokenIds);
    const ids = tokenizer.encode('Hello world');
    expect(Math.max(...ids)).toBeLessThan(config.vocabSize);
    expect(tokenizer.decode(ids)).toBe('Hello world');

    const out = JSON.parse(readFileSync(json, 'utf8')) as StartJson;
    expect(out.complete).toBe(true);
    expect(out.checkpoint.reused).toBe(false);
    expect(out.checkpoint.tensorBytes).toBe(tensorBytes);
    const fileBytes = shards.reduce((a, f) => a + statSync(join(dir, f)).size, 0);
    expect(out.checkpoint.fileBytes).toBe(fileBytes);
    expect(out.checkpoint.shards.reduce((a, s) => a + s.bytes, 0)).toBe(fileBytes);
    const disk = out.rows.find((x) => x.row === 'disk')!;
    expect(disk.bytes).toBe(fileBytes);
    expect(disk.seconds).toHaveLength(1);
    const tandem = out.rows.find((x) => x.row === 'tandem')!;
    expect(tandem.seconds).toHaveLength(1);
    expect(tandem.errors).toEqual([]);
    expect(tandem.bytes).toBe(tensorBytes);
    expect(out.rows.map((x) => x.row)).toEqual(['disk', 'tandem']);
    expect(out.tandemPhases.phases.map((p) => p.phase)).toEqual([
      'config and tokenizer',
      'CPU model runner and weights',
    ]);
    const tandemRun = out.measurements.find((m) => m.row === 'tandem')!;
    expect(tandemRun.finite).toBe(true);
    expect(tandemRun.log!.at(-1)).toMatch(/^model .* open on cpu in \d+ ms$/);
    expect(readFileSync(join(root, 'kept.svg'), 'utf8')).toContain('Tandem: openModel to ready');
  }, 150_000);

  it('reuses a checkpoint already in the folder and leaves it there', () => {
    const dir = join(root, 'kept');
    expect(existsSync(join(dir, 'config.json'))).toBe(true); // from the test above
    const before = readdirSync(dir).sort();
    const json = join(root, 'reused.json');
    const r = runTs('bench/start.ts', ['--dir', dir, ...TINY, '--shards', '2', '--json', json], {}, 120_000);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/reusing the checkpoint in .* \(4 shard\(s\)/);
    expect(r.stderr).not.toContain('writing');
    expect(r.stderr).not.toContain('removed');
    expect(readdirSync(dir).sort()).toEqual(before);
    const out = JSON.parse(readFileSync(json, 'utf8')) as StartJson;
    expect(out.checkpoint.reused).toBe(true);
    expect(out.checkpoint.shards).toHaveLength(4);
  }, 150_000);

  it('removes the checkpoint it wrote: the folder it made, or only its files in an empty folder given', () => {
    const made = join(root, 'made', 'ckpt');
    const r = runTs(
      'bench/start.ts',
      ['--dir', made, ...TINY, '--shards', '2', '--json', join(root, 'made.json')],
      {},
      120_000,
    );
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toContain('removed the checkpoint');
    expect(existsSync(made)).toBe(false);
    const out = JSON.parse(readFileSync(join(root, 'made.json'), 'utf8')) as StartJson;
    expect(out.checkpoint.shards.map((s) => s.file)).toEqual([
      'model-00001-of-00002.safetensors',
      'model-00002-of-00002.safetensors',
    ]);

    const empty = join(root, 'empty');
    mkdirSync(empty);
    const e = runTs(
      'bench/start.ts',
      ['--dir', empty, ...TINY, '--shards', '1', '--json', join(root, 'empty.json')],
      {},
      120_000,
    );
    expect(e.status, e.stderr).toBe(0);
    expect(existsSync(empty)).toBe(true);
    expect(readdirSync(empty)).toEqual([]);
  }, 150_000);

  it('reports a checkpoint Tandem cannot open as a failed row with exit code 1, and refuses one it cannot read', () => {
    // A copy of the kept checkpoint whose config.json disagrees with its tensors' shapes: the headers read, the
    // disk row runs, and Tandem's openModel refuses the tensors.
    const dir = join(root, 'mismatched');
    cpSync(join(root, 'kept'), dir, { recursive: true });
    const configFile = join(dir, 'config.json');
    const hf = JSON.parse(readFileSync(configFile, 'utf8')) as Record<string, unknown>;
    writeFileSync(configFile, JSON.stringify({ ...hf, intermediate_size: 256 }));
    const json = join(root, 'mismatched.json');
    const r = runTs('bench/start.ts', ['--dir', dir, ...TINY, '--json', json], {}, 120_000);
    expect(r.status, r.stderr).toBe(1);
    expect(r.stdout).toMatch(/^Tandem: openModel to ready\s.*0 \(1 failed\)$/m);
    expect(r.stdout).toMatch(/^Tandem: openModel to ready: failed: bench\/start-tandem\.ts exited with 1: .*mlp/m);
    const out = JSON.parse(readFileSync(json, 'utf8')) as StartJson;
    expect(out.complete).toBe(true);
    expect(out.rows.find((x) => x.row === 'disk')!.seconds).toHaveLength(1);
    expect(out.rows.find((x) => x.row === 'tandem')!.errors).toHaveLength(1);
    expect(existsSync(join(dir, 'model-00001-of-00004.safetensors'))).toBe(true); // not ours to remove

    // A shard cut short: the checkpoint is refused before anything runs.
    truncateSync(join(dir, 'model-00002-of-00004.safetensors'), 100);
    const t = runTs('bench/start.ts', ['--dir', dir, ...TINY, '--json', join(root, 'truncated.json')]);
    expect(t.status, t.stderr).toBe(2);
    expect(t.stderr).toMatch(
      /--dir .*: its checkpoint cannot be read: .*model-00002-of-00004\.safetensors: .*truncated/,
    );
    expect(t.stderr.trim().split('\n')).toHaveLength(1);
  }, 150_000);

  it.each([
    [['--dir', 'x', '--bogus'], /Unknown option '--bogus'/],
    [[...TINY], /--dir is required/],
    [['--dir', 'DIR', '--runs', '0'], /--runs must be an integer in 1..20 \(got 0\)/],
    [['--dir', 'DIR', '--runs', '2.5'], /--runs must be an integer in 1..20 \(got 2.5\)/],
    [['--dir', 'DIR', '--shards', '0'], /--shards must be an integer in 1..256/],
    [['--dir', 'DIR', '--device', 'bogus'], /--device must be cuda or cpu \(got bogus\)/],
    [['--dir', 'DIR', '--torch', 'maybe'], /--torch must be one of auto, on, off \(got maybe\)/],
    [['--dir', 'DIR', '--model', 'dummy:nope'], /--model: .*unknown dummy preset "nope"/],
    [['--dir', 'DIR', '--model', '/some/checkpoint'], /--model must be dummy:<preset>/],
    [
      ['--dir', 'DIR', '--model', 'dummy:tiny', '--shards', '200'],
      /--shards 200: the \d+ tensors of this model do not fill 200 shards/,
    ],
    [['--dir', 'FILE'], /--dir .* is a file, not a folder/],
    [['--dir', 'OTHER'], /holds files but no checkpoint/],
  ])('refuses %j with exit code 2 before writing anything', (args, message) => {
    const file = join(root, 'a-file');
    writeFileSync(file, 'not a folder');
    const other = join(root, 'other');
    mkdirSync(other, { recursive: true });
    writeFileSync(join(other, 'notes.txt'), 'mine');
    const dir = join(root, 'refused');
    const json = join(root, 'refused.json');
    const mapped = args.map((a) => (a === 'DIR' ? dir : a === 'FILE' ? file : a === 'OTHER' ? other : a));
    const r = runTs('bench/start.ts', ['--device', 'cpu', '--torch', 'off', '--json', json, ...mapped]);
    expect(r.status, r.stderr).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stderr.trim().split('\n')).toHaveLength(1); // one line, and nothing before it
    expect(existsSync(dir)).toBe(false);
    expect(existsSync(json)).toBe(false);
    expect(readdirSync(other)).toEqual(['notes.txt']);
  });

  it.skipIf(torchHere)('refuses --torch on where python3 cannot import torch and safetensors', () => {
    const dir = join(root, 'no-torch');
    const r = runTs('bench/start.ts', ['--dir', dir, '--model', 'dummy:tiny', '--device', 'cpu', '--torch', 'on']);
    expect(r.status, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/bench:start: --torch on, but PyTorch cannot run here: .*(torch|python3)/);
    expect(existsSync(dir)).toBe(false);
  });

  // dummy:llama-3.1-70b is 141 GB in bf16: more than the disk of the temporary folder has free, on most machines.
  it.skipIf(statfsSync(tmpdir()).bavail * statfsSync(tmpdir()).bsize > 140e9)(
    'refuses a checkpoint larger than the free space of the folder',
    () => {
      const dir = join(root, 'too-big');
      const r = runTs('bench/start.ts', [
        '--dir',
        dir,
        '--model',
        'dummy:llama-3.1-70b',
        '--device',
        'cpu',
        '--torch',
        'off',
      ]);
      expect(r.status, r.stderr).toBe(2);
      expect(r.stderr).toMatch(/the checkpoint needs 141\.\d GB .*has [\d.]+ \S+ free/);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(existsSync(dir)).toBe(false);
    },
  );
});
