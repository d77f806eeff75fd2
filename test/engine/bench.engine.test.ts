import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { probeCuda } from '../../lib/cuda/index.js';
import { packageRoot } from '../../lib/native/paths.js';
import { runTs } from '../helpers/cli.js';

interface BenchRow {
  phase: 'prefill' | 'decode';
  batch: number;
  tokens: number;
  msP50: number;
  tokensPerSec: number;
  tflops: number;
  boundMs?: number;
  vsBound?: number;
}

const gpu = (await probeCuda()).available;
const dir = mkdtempSync(join(tmpdir(), 'tandem-bench-engine-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const positive = (x: unknown) => typeof x === 'number' && Number.isFinite(x) && x > 0;

describe('bench:engine', () => {
  it('measures prefill and decode on the CPU against a memory baseline, and writes the JSON', () => {
    const file = join(dir, 'engine.json');
    const r = runTs(
      'bench/engine.ts',
      ['--device', 'cpu', '--model', 'dummy:tiny', '--quick', '--json', file],
      {},
      120_000,
    );
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^phase\s+batch\s+tokens/m);
    expect(r.stdout).toMatch(/^prefill\s/m);
    expect(r.stdout).toMatch(/^decode\s/m);

    const out = JSON.parse(readFileSync(file, 'utf8')) as {
      host: { cpu: { cores: number } };
      model: string;
      device: { kind: string; dtype: string };
      config: { hiddenSize: number };
      baseline: { copyGBps: number; readGBps: number };
      rows: BenchRow[];
    };
    expect(out.model).toBe('dummy:tiny');
    expect(out.device).toMatchObject({ kind: 'cpu', dtype: 'fp32' });
    expect(out.config.hiddenSize).toBe(64);
    expect(out.host.cpu.cores).toBeGreaterThan(0);
    expect(positive(out.baseline.copyGBps)).toBe(true);
    expect(out.baseline.readGBps).toBeGreaterThanOrEqual(2 * out.baseline.copyGBps);

    const prefill = out.rows.filter((row) => row.phase === 'prefill');
    const decode = out.rows.filter((row) => row.phase === 'decode');
    expect(prefill.length).toBeGreaterThan(0);
    expect(decode.map((row) => row.batch)).toEqual([1, 4]);
    for (const row of out.rows) {
      for (const key of ['msP50', 'tokensPerSec', 'tflops'] as const) expect(positive(row[key]), key).toBe(true);
      expect(row.tokensPerSec).toBeCloseTo(row.tokens / (row.msP50 / 1e3), 6);
    }
    for (const row of decode) {
      expect(row.tokens).toBe(row.batch);
      expect(positive(row.boundMs)).toBe(true);
      expect(row.vsBound).toBeGreaterThan(0);
      expect(row.vsBound).toBeLessThanOrEqual(1.5);
    }
  }, 150_000);

  it('runs the rows of --prefill, --context and --batch, and says in one line why PyTorch has no columns', () => {
    const file = join(dir, 'matrix.json');
    const r = runTs(
      'bench/engine.ts',
      [
        '--device',
        'cpu',
        '--model',
        'dummy:tiny',
        '--quick',
        '--prefill',
        '40,16',
        '--context',
        '24,72',
        '--batch',
        '3,1',
        '--json',
        file,
      ],
      {},
      120_000,
    );
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('no PyTorch rows: the PyTorch comparison runs on cuda only, and this run is on the CPU');
    // No column without a value: MFU and PyTorch columns are for cuda runs.
    expect(r.stdout).toMatch(
      /^phase\s+batch\s+tokens\s+context\s+ms p50\s+ms min\s+tokens\/s\s+TFLOP\/s\s+read GB\/s\s+bound ms\s+% bound$/m,
    );
    const out = JSON.parse(readFileSync(file, 'utf8')) as {
      torch: { available: boolean; reason: string };
      gemmCeilings: unknown[];
      rows: (BenchRow & { context: number; mfu?: number; torch?: unknown })[];
    };
    expect(out.torch).toEqual({
      available: false,
      reason: 'the PyTorch comparison runs on cuda only, and this run is on the CPU',
    });
    expect(out.gemmCeilings).toEqual([]);
    const cases = out.rows.map((row) => [row.phase, row.batch, row.tokens, row.context]);
    expect(cases).toEqual([
      ['prefill', 1, 16, 16],
      ['prefill', 1, 40, 40],
      ['decode', 1, 1, 24],
      ['decode', 3, 3, 24],
      ['decode', 1, 1, 72],
      ['decode', 3, 3, 72],
    ]);
    for (const row of out.rows) {
      expect(row.mfu).toBeUndefined();
      expect(row.torch).toBeUndefined();
    }
    // A decode row reads every token of its context: the bound grows with it at the same batch.
    const bound = (batch: number, context: number) =>
      out.rows.find((row) => row.phase === 'decode' && row.batch === batch && row.context === context)!.boundMs!;
    expect(bound(3, 72)).toBeGreaterThan(bound(3, 24));
  }, 150_000);

  it('--help lists the options and exits 0; a bad --torch exits 2', () => {
    const help = runTs('bench/engine.ts', ['--help']);
    expect(help.status).toBe(0);
    for (const option of ['--prefill', '--context', '--batch', '--torch', '--quick', '--json'])
      expect(help.stdout).toContain(option);
    // The GPU-host bundle's ./run passes `-- --help` through as it is.
    const bundled = runTs('bench/engine.ts', ['--', '--help']);
    expect(bundled.status, bundled.stderr).toBe(0);
    expect(bundled.stdout).toBe(help.stdout);
    const bad = runTs('bench/engine.ts', ['--device', 'cpu', '--torch', 'maybe']);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain('--torch must be auto or off (got maybe)');
  });

  it.skipIf(spawnSync('python3', ['--version']).status !== 0)(
    'bench/engine_torch.py refuses what it cannot run with one line and exit code 2, not a traceback',
    () => {
      // Without torch it says so; with torch (a GPU host) the cases are checked first and these lack a model.
      const r = spawnSync('python3', [join(packageRoot, 'bench/engine_torch.py'), '{"prefill": [512]}'], {
        encoding: 'utf8',
        timeout: 120_000,
      });
      expect(r.status, r.stderr).toBe(2);
      expect(r.stdout).toBe('');
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/^engine_torch: (cannot import torch: |the cases need a 'model' object)/);
    },
  );

  it('rejects an unknown preset with its message and exit code 2', () => {
    const r = runTs('bench/engine.ts', ['--device', 'cpu', '--model', 'dummy:nope']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('unknown dummy preset "nope"');
  });

  // On a GPU host --device cuda would run the whole benchmark; that is for the lead's GPU runs, not this suite.
  it.skipIf(gpu)('--device cuda without a GPU says why and exits 2', () => {
    const r = runTs('bench/engine.ts', ['--device', 'cuda', '--quick']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('CUDA unavailable');
  });
});
