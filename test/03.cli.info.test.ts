import { describe, expect, it } from 'vitest';
import { runTs } from './helpers/cli.js';

describe('tandem CLI', () => {
  it('info --json prints the capabilities JSON', () => {
    const r = runTs('lib/cli/main.ts', ['info', '--json']);
    expect(r.status, r.stderr).toBe(0);
    const c = JSON.parse(r.stdout) as Record<string, unknown>;
    for (const key of ['schemaVersion', 'tandem', 'node', 'cpu', 'cuda', 'nccl', 'ucx', 'cublas', 'kernels']) {
      expect(c).toHaveProperty(key);
    }
  });

  it('info prints a readable report with each backend and its state', () => {
    const r = runTs('lib/cli/main.ts', ['info']);
    expect(r.status, r.stderr).toBe(0);
    for (const line of [/^CUDA: (available|unavailable)/m, /^NCCL: /m, /^UCX: /m, /^cuBLAS: /m, /^Kernels: /m]) {
      expect(r.stdout).toMatch(line);
    }
  });

  it('rejects an unknown command with usage and exit code 2', () => {
    const r = runTs('lib/cli/main.ts', ['frobnicate']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("unknown command 'frobnicate'");
  });

  it('--version prints the package version', () => {
    const r = runTs('lib/cli/main.ts', ['--version']);
    expect(r.stdout.trim()).toMatch(/^\d+\.\d+\.\d+$/);
  });
});
