import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runTs } from '../helpers/cli.js';

// bench:engine-ab (bench/engine-ab.ts) on the CPU with dummy:tiny: the baseline and a variant run through
// bench:engine in rotating rounds, each child with the variant's environment (bench:engine records its TANDEM_*
// variables: the proof that the setting reached it), and the table, JSON and chart of the medians.
const dir = mkdtempSync(join(tmpdir(), 'tandem-engine-ab-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const ENGINE = ['--device', 'cpu', '--model', 'dummy:tiny', '--prefill', '16', '--batch', '1,2', '--context', '32'];

interface AbJson {
  variants: { label: string; env: Record<string, string> }[];
  rounds: number;
  complete: boolean;
  runs: { round: number; variant: number; environment: Record<string, string>; rows: unknown[] }[];
  rows: { phase: string; batch: number; ms: number[][]; median: number[]; vsBaseline: number[]; spread: number }[];
}

describe('bench:engine-ab', () => {
  it('runs the baseline and each variant in rotating rounds with their environments, and reports the medians', () => {
    const json = join(dir, 'ab.json');
    const r = runTs(
      'bench/engine-ab.ts',
      ['--variants', 'TANDEM_AB_PROBE=1, TANDEM_AB_OTHER=x', '--rounds', '2', '--json', json, '--', ...ENGINE],
      { TANDEM_API_KEY: 'sekrit' }, // inherited by every run, and never recorded
      120_000,
    );
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toContain('run 4 of 4: round 2, baseline');
    expect(r.stdout).toMatch(
      /^phase\s+batch\s+tokens\s+context\s+baseline ms\s+spread\s+TANDEM_AB_PROBE=1 TANDEM_AB_OTHER=x ms\s+x/m,
    );
    expect(r.stdout).toMatch(/^decode\s+2\s+2\s+32\s/m);

    const out = JSON.parse(readFileSync(json, 'utf8')) as AbJson;
    expect(out.complete).toBe(true);
    expect(out.variants).toEqual([
      { label: 'baseline', env: {} },
      { label: 'TANDEM_AB_PROBE=1 TANDEM_AB_OTHER=x', env: { TANDEM_AB_PROBE: '1', TANDEM_AB_OTHER: 'x' } },
    ]);
    // Round 1 starts with the baseline, round 2 with the variant.
    expect(out.runs.map((x) => [x.round, x.variant])).toEqual([
      [0, 0],
      [0, 1],
      [1, 1],
      [1, 0],
    ]);
    for (const run of out.runs) {
      if (run.variant === 1) expect(run.environment).toMatchObject({ TANDEM_AB_PROBE: '1', TANDEM_AB_OTHER: 'x' });
      else expect(run.environment).not.toHaveProperty('TANDEM_AB_PROBE');
      expect(run.rows).toHaveLength(3); // prefill 16, decode b1 and b2
      expect(run.environment).not.toHaveProperty('TANDEM_API_KEY');
    }
    expect(out.rows.map((x) => `${x.phase} ${x.batch}`)).toEqual(['prefill 1', 'decode 1', 'decode 2']);
    for (const row of out.rows) {
      expect(row.ms.map((xs) => xs.length)).toEqual([2, 2]);
      for (const [v, xs] of row.ms.entries()) expect(row.median[v]).toBeCloseTo((xs[0]! + xs[1]!) / 2, 12);
      expect(row.vsBaseline[0]).toBe(1);
      expect(row.vsBaseline[1]).toBeCloseTo(row.median[0]! / row.median[1]!, 12);
      expect(row.spread).toBeCloseTo(Math.abs(row.ms[0]![0]! - row.ms[0]![1]!) / row.median[0]!, 12);
    }
    expect(readFileSync(join(dir, 'ab.svg'), 'utf8')).toContain('TANDEM_AB_PROBE=1 TANDEM_AB_OTHER=x');
    expect(readFileSync(json, 'utf8') + r.stdout + r.stderr).not.toContain('sekrit');
  });

  it.each([
    [[], /--variants is required/],
    [['--variants', 'lower=1'], /expected NAME=VALUE .* got "lower=1"/],
    [['--variants', 'TANDEM_A'], /expected NAME=VALUE .* got "TANDEM_A"/],
    [['--variants', 'TANDEM_A=1;;TANDEM_B=1'], /an empty variant/],
    [['--variants', 'TANDEM_A=1,TANDEM_A=2'], /TANDEM_A is set twice/],
    [['--variants', 'TANDEM_A=1;TANDEM_A=1'], /TANDEM_A=1 is listed twice/],
    [['--variants', 'TANDEM_A=1', '--rounds', '0'], /--rounds must be an integer in 1..20 \(got 0\)/],
    [['--variants', 'TANDEM_A=1', '--', '--json', 'x.json'], /--json is bench:engine-ab's to set/],
    [['--variants', 'TANDEM_A=1', '--', '--torch=auto'], /--torch is bench:engine-ab's to set/],
    [['--variants', 'TANDEM_A=1', '--bogus'], /Unknown option '--bogus'/],
  ])('refuses %j with exit code 2 before running anything', (args, message) => {
    const json = join(dir, 'refused.json');
    const r = runTs('bench/engine-ab.ts', ['--json', json, ...args]);
    expect(r.status, r.stderr).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stderr).not.toContain('run 1 of');
    expect(existsSync(json)).toBe(false);
  });

  it('stops at a failing run with its message and exit code 1, and writes what finished as incomplete', () => {
    const json = join(dir, 'failed.json');
    const r = runTs('bench/engine-ab.ts', [
      '--variants',
      'TANDEM_AB_PROBE=1',
      '--json',
      json,
      '--',
      '--device',
      'cpu',
      '--model',
      'dummy:nope',
    ]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/bench:engine-ab: baseline \(round 1\) exited with 2:/);
    expect(r.stderr).toContain('unknown dummy preset "nope"');
    const out = JSON.parse(readFileSync(json, 'utf8')) as AbJson;
    expect(out.complete).toBe(false);
    expect(out.runs).toEqual([]);
  });
});
