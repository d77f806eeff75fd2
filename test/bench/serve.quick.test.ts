import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import type { BenchServeReport } from '../../lib/bench/serve.js';

// `npm run bench:serve -- --quick` end to end, as CI runs it: it starts the embedded CPU deployment (dummy:tiny,
// a prefill and a decode worker) on a free loopback port, sweeps three rates, stops everything and exits 0.
// What is checked is what the run must get right whatever the machine's speed: every request completed with
// exactly the prompt and output lengths asked for (exact prompts; ignore_eos and min_tokens), timings that
// add up, and the table, JSON and charts written. No timing is asserted.
const root = join(import.meta.dirname, '..', '..');
const run = promisify(execFile);

describe('bench serve --quick', () => {
  it('runs the CPU deployment through a sweep and writes the table, the JSON and the charts', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-bench-serve-'));
    const json = join(dir, 'quick.json');
    const { stdout } = await run(process.execPath, ['--import', 'tsx', 'bench/serve.ts', '--quick', '--json', json], {
      cwd: root,
      timeout: 150_000,
      maxBuffer: 16 << 20,
    });
    expect(stdout).toMatch(/^load\s+ok\/sent\s+req\/s\s+out tok\/s\s+TTFT ms p50 \/ p90 \/ p99/m);
    expect(stdout).toMatch(/^rate 8\/s\s+32\/32 /m);
    expect(stdout).toContain(`wrote ${json}`);

    const report = JSON.parse(readFileSync(json, 'utf8')) as BenchServeReport;
    expect(report.targets).toHaveLength(1);
    const target = report.targets[0]!;
    expect(target).toMatchObject({ label: 'disagg', kind: 'default', model: 'dummy:tiny' });
    expect(target.points.length).toBeGreaterThanOrEqual(1);
    expect(target.points[0]!.load).toMatchObject({ kind: 'rate', value: 8 });
    for (const point of target.points) {
      expect(point.requests).toHaveLength(32);
      expect(point.stats.completed).toBe(32);
      expect(point.promptTokensOff).toBe(0);
      for (const r of point.requests) {
        expect(r).toMatchObject({ error: null, usage: true, outputTokens: 32, promptTokens: 640 });
        expect(r.ttftMs).toBeGreaterThan(0);
        expect(r.e2eMs).toBeGreaterThanOrEqual(r.ttftMs!);
        expect(r.sentMs).toBeGreaterThanOrEqual(r.scheduledMs!);
      }
      // Goodput and attainment are what the per-request timings say.
      const met = point.requests.filter(
        (r) => r.ttftMs! <= 2000 && (r.e2eMs - r.ttftMs!) / (r.outputTokens - 1) <= 25,
      ).length;
      expect(point.stats.sloMet).toBe(met);
      expect(point.stats.attainment).toBe(met / 32);
    }
    expect(report.workload).toMatchObject({ requestsPerPoint: 32, isl: '640', osl: '32' });
    expect(existsSync(join(dir, 'quick-goodput.svg'))).toBe(true);
    expect(readFileSync(join(dir, 'quick-latency.svg'), 'utf8')).toContain('Time to first token');
  }, 160_000);
});
