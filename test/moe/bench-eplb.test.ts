import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { capabilities } from '../../lib/index.js';

interface PlacementRow {
  shape: string;
  zipf: number;
  redundantSlotsPerRank: number;
  imbalanceStatic: number;
  imbalanceBalanced: number;
}

describe('bench:eplb --quick', () => {
  it('writes its JSON; balancing lowers the imbalance on skewed routing and while serving a skewed model', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-eplb-'));
    try {
      const out = join(dir, 'eplb.json');
      const stdout = execFileSync(
        process.execPath,
        ['--import', 'tsx', 'bench/eplb.ts', '--quick', '--out', out, '--chart', join(dir, 'eplb.svg')],
        { encoding: 'utf8', timeout: 120_000, stdio: ['ignore', 'pipe', 'ignore'] },
      );
      expect(stdout).toContain('bench:eplb');
      const report = JSON.parse(readFileSync(out, 'utf8')) as {
        placement: PlacementRow[];
        serving: { imbalanceBefore: number; imbalanceAfter: number; decisions: { applied: boolean }[] };
        cpuRanks: { imbalanceBefore: number; imbalanceAfter: number; decisions: { applied: boolean }[] };
      };
      expect(report.placement.length).toBe(4 * 3 * 4);
      for (const r of report.placement) {
        if (r.redundantSlotsPerRank === 0) continue;
        // with a redundant slot per rank, every skewed case ends well below the static placement
        expect(r.imbalanceBalanced, `${r.shape} zipf ${r.zipf}`).toBeLessThan(r.imbalanceStatic);
        expect(r.imbalanceBalanced, `${r.shape} zipf ${r.zipf}`).toBeLessThan(1.5);
      }
      // serving the skewed dummy MoE: the balancer acts, and the steps after are better balanced than those before
      expect(report.serving.decisions.some((d) => d.applied)).toBe(true);
      expect(report.serving.imbalanceAfter).toBeLessThan(report.serving.imbalanceBefore);
      // the same on real CPU EP ranks balancing themselves, measured from the ranks' own counts
      expect(report.cpuRanks.decisions.some((d) => d.applied)).toBe(true);
      expect(report.cpuRanks.imbalanceAfter).toBeLessThan(report.cpuRanks.imbalanceBefore);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 180_000);
});

describe('bench:eplb --device', () => {
  const run = (args: string[]) => {
    try {
      const stdout = execFileSync(process.execPath, ['--import', 'tsx', 'bench/eplb.ts', ...args], {
        encoding: 'utf8',
        timeout: 60_000,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      return { status: 0, stdout, stderr: '' };
    } catch (error) {
      const e = error as { status: number; stdout: string; stderr: string };
      return { status: e.status, stdout: e.stdout, stderr: e.stderr };
    }
  };

  it('refuses a device other than cpu or cuda with exit status 2 before running anything', () => {
    const r = run(['--device', 'gpu', '--quick']);
    expect(r.status).toBe(2);
    expect(r.stderr).toBe('bench:eplb: --device must be cpu or cuda (got gpu)\n');
    expect(r.stdout).toBe('');
  }, 60_000);

  it('--device cuda without a GPU says why and exits 1 without a report', async (ctx) => {
    if ((await capabilities()).cuda.available) ctx.skip(); // with a GPU it runs (docs/measurements.md)
    const dir = mkdtempSync(join(tmpdir(), 'tandem-eplb-cuda-'));
    try {
      const out = join(dir, 'eplb.json');
      const r = run(['--device', 'cuda', '--quick', '--out', out, '--chart', join(dir, 'eplb.svg')]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/^bench:eplb --device cuda: .*CUDA/);
      expect(() => readFileSync(out)).toThrow();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);
});
