import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { GraphError, loadGraph, parseGraph } from '../../lib/serve/graph.js';

// The deployment graph's planner section: defaults, required SLAs, positions of errors, unknown keys, and the
// rules that span sections (one prefill and one decode pool, mode disagg).
const BASE = `model: dummy:tiny
pools:
  - name: prefill
    role: prefill
    device: cpu
  - name: decode
    role: decode
    device: cpu
`;

function graphError(text: string): string {
  try {
    parseGraph(text, 'g.yaml');
  } catch (error) {
    expect(error).toBeInstanceOf(GraphError);
    expect((error as GraphError).code).toBe('TANDEM_BAD_GRAPH');
    return (error as Error).message;
  }
  throw new Error('the graph parsed');
}

describe('graph planner section', () => {
  it('is off by default, with the spec defaults filled in', () => {
    expect(parseGraph(BASE).planner).toEqual({ mode: 'off', intervalS: 60, minReplicas: 1 });
  });

  it('takes mode load with its SLAs', () => {
    const g = parseGraph(`${BASE}planner:\n  mode: load\n  ttftMs: 200\n  itlMs: 20\n  intervalS: 5\n  maxGpus: 4\n`);
    expect(g.planner).toEqual({ mode: 'load', ttftMs: 200, itlMs: 20, intervalS: 5, minReplicas: 1, maxGpus: 4 });
  });

  it('mode load without SLAs: each missing SLA named, at the planner line', () => {
    const msg = graphError(`${BASE}planner:\n  mode: load\n`);
    expect(msg).toContain('g.yaml:10:3: planner.ttftMs: is required when mode is load');
    expect(msg).toContain('g.yaml:10:3: planner.itlMs: is required when mode is load');
  });

  it('mode sla without a profile says how to make one', () => {
    expect(graphError(`${BASE}planner:\n  mode: sla\n  ttftMs: 100\n  itlMs: 10\n`)).toContain(
      'planner.profile: is required when mode is sla (write one with tandem profile)',
    );
  });

  it('a bad value names its line and column; an unknown key suggests the near one', () => {
    expect(graphError(`${BASE}planner:\n  mode: fast\n`)).toContain(
      'g.yaml:10:9: planner.mode: must be one of off, load, sla',
    );
    expect(graphError(`${BASE}planner:\n  mode: load\n  ttftMs: -1\n  itlMs: 5\n`)).toContain(
      'g.yaml:11:11: planner.ttftMs: must be a positive number of milliseconds',
    );
    expect(graphError(`${BASE}planner:\n  interval_s: 5\n`)).toContain(
      "g.yaml:10:3: planner: unknown key 'interval_s' (did you mean 'intervalS'?)",
    );
  });

  it('a planner that is on needs mode disagg and one pool of each role', () => {
    expect(
      graphError(
        'model: dummy:tiny\nmode: agg\npools:\n  - name: a\n    role: aggregated\nplanner:\n  mode: load\n  ttftMs: 1\n  itlMs: 1\n',
      ),
    ).toContain('planner.mode: planner mode load needs mode disagg');
    expect(
      graphError(
        `${BASE}  - name: decode2\n    role: decode\n    device: cpu\nplanner:\n  mode: load\n  ttftMs: 1\n  itlMs: 1\n`,
      ),
    ).toContain('pools: planner mode load moves workers between one prefill and one decode pool (2 decode pools)');
    // Off, any pools go.
    expect(parseGraph(`${BASE}  - name: decode2\n    role: decode\n    device: cpu\n`).planner.mode).toBe('off');
  });

  it('a profile path is relative to the graph file', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-planner-graph-'));
    try {
      const file = join(dir, 'graph.yaml');
      writeFileSync(file, `${BASE}planner:\n  mode: sla\n  ttftMs: 100\n  itlMs: 10\n  profile: profiles/p.json\n`);
      expect(loadGraph(file).planner.profile).toBe(join(dir, 'profiles', 'p.json'));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
