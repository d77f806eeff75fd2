import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BenchServeReport } from '../../lib/bench/serve.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';

// bench serve against more than one target, and against a server it did not start: two deployment graphs
// started in turn and printed side by side with ratios; a running deployment found by URL (its model asked
// of /v1/models), driven through the chat API in a closed loop, where the prompts' lengths must match the
// server's count of the chat template exactly. Small workloads, loopback only; no timing is asserted.
const root = join(import.meta.dirname, '..', '..');
const dir = mkdtempSync(join(tmpdir(), 'tandem-bench-compare-'));

async function bench(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--import', 'tsx', 'bench/serve.ts', ...args],
      { cwd: root, timeout: 120_000, maxBuffer: 16 << 20 },
      (error, stdout, stderr) =>
        resolve({ code: error ? ((error as { code?: number }).code ?? -1) : 0, stdout, stderr }),
    );
  });
}

describe('bench serve: comparisons and running servers', () => {
  let running: Deployment;
  beforeAll(async () => {
    running = await startDeployment(defaultGraph({ gpus: 0, mode: 'agg', port: 0 }), { log: () => {} });
  });
  afterAll(async () => {
    await running?.stop({ drainMs: 500 });
  });

  it('--deploy a,b: each started, measured on the same workload, stopped; side by side with ratios', async () => {
    const json = join(dir, 'compare.json');
    const { code, stdout, stderr } = await bench([
      '--deploy',
      'bench/deploy/agg-cpu.yaml,bench/deploy/disagg-cpu.yaml',
      ...['--rate', '16', '--num-requests', '8', '--isl', '600', '--osl', '8', '--warmup', '1'],
      ...['--json', json, '--no-charts'],
    ]);
    expect(stderr).not.toMatch(/Error/);
    expect(code).toBe(0);
    expect(stdout).toMatch(/^side by side:$/m);
    expect(stdout).toMatch(/^load\s+metric\s+agg-cpu\s+disagg-cpu\s+disagg-cpu \/ agg-cpu$/m);
    expect(stdout).toMatch(/^rate 16\/s\s+goodput req\/s\s+\S+\s+\S+\s+\S+x$/m);
    expect(stdout).toMatch(/^best\s+max goodput req\/s/m);
    const report = JSON.parse(readFileSync(json, 'utf8')) as BenchServeReport;
    expect(report.targets.map((t) => [t.label, t.kind, t.graph!.mode])).toEqual([
      ['agg-cpu', 'deploy', 'agg'],
      ['disagg-cpu', 'deploy', 'disagg'],
    ]);
    // The same workload for both: the same prompt lengths and schedule.
    const [a, b] = report.targets.map((t) => t.points[0]!.requests);
    expect(a!.map((r) => r.scheduledMs)).toEqual(b!.map((r) => r.scheduledMs));
    for (const r of [...a!, ...b!]) expect(r).toMatchObject({ error: null, promptTokens: 600, outputTokens: 8 });
  }, 130_000);

  it('--url: the model from /v1/models; chat prompts of exact length; a closed loop', async () => {
    const json = join(dir, 'url.json');
    const { code, stdout } = await bench([
      ...['--url', running.frontend.url, '--api', 'chat', '--concurrency', '1,3'],
      ...['--num-requests', '6', '--isl', 'uniform:40:90', '--osl', '5', '--warmup', '0', '--min-attainment', '0'],
      ...['--json', json, '--no-charts'],
    ]);
    expect(code).toBe(0);
    const host = new URL(running.frontend.url).host;
    expect(stdout).toContain(`${host}: dummy:tiny at ${running.frontend.url}`);
    const report = JSON.parse(readFileSync(json, 'utf8')) as BenchServeReport;
    const t = report.targets[0]!;
    expect(t.points.map((p) => p.load.label)).toEqual(['concurrency 1', 'concurrency 3']);
    for (const p of t.points) {
      expect(p.promptTokensOff).toBe(0);
      for (const r of p.requests) expect(r).toMatchObject({ error: null, outputTokens: 5, scheduledMs: null });
      const asked = p.requests.map((r) => r.promptTokens!);
      expect(asked.every((n) => n >= 40 && n <= 90)).toBe(true);
    }
  }, 130_000);

  it('a broken graph, a server that is not there, a wrong command line: one line and exit status 1 or 2', async () => {
    const bad = join(dir, 'bad.yaml');
    writeFileSync(bad, 'model: dummy:tiny\nmode: agg\npools:\n  - { name: a, role: aggregated, replicas: 0 }\n');
    const graph = await bench(['--deploy', `bench/deploy/agg-cpu.yaml,${bad}`, '--quick', '--no-charts']);
    expect(graph.code).toBe(1);
    expect(graph.stderr).toMatch(/^bench:serve: .*bad\.yaml:4:\d+: pools\[0\]\.replicas: /m);
    expect(graph.stdout).toBe('');

    const free = createServer();
    await new Promise<void>((resolve) => free.listen(0, '127.0.0.1', resolve));
    const port = (free.address() as { port: number }).port;
    await new Promise((resolve) => free.close(resolve));
    const gone = await bench(['--url', `http://127.0.0.1:${port}`, '--quick', '--no-charts']);
    expect(gone.code).toBe(1);
    expect(gone.stderr).toMatch(
      new RegExp(`^bench:serve: cannot reach http://127\\.0\\.0\\.1:${port}/v1/models: .*ECONNREFUSED`, 'm'),
    );

    const usage = await bench(['--rate', '1', '--concurrency', '2']);
    expect(usage.code).toBe(2);
    expect(usage.stderr.trim()).toBe(
      'bench:serve: --rate (open loop) and --concurrency (closed loop) exclude each other',
    );
  }, 60_000);
});
