import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { GraphError, loadGraph, parseGraph } from '../../lib/deploy/graph.js';
import { correctionOptions } from '../../lib/planner/spec.js';

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

  it('takes the load-based correction knobs, in seconds, and turns them into counts of corrections', () => {
    const g = parseGraph(
      `${BASE}planner:\n  mode: load\n  ttftMs: 200\n  itlMs: 20\n  intervalS: 2\n  scaleUpAfterS: 5\n  scaleDownAfterS: 8\n  scaleDownBelow: 0.3\n  cooldownS: 20\n`,
    );
    expect(g.planner).toMatchObject({ scaleUpAfterS: 5, scaleDownAfterS: 8, scaleDownBelow: 0.3, cooldownS: 20 });
    // Mode load corrects every intervalS (2 s): 5 s of misses is 3 corrections (rounded up), 8 s is 4.
    expect(correctionOptions(g.planner)).toEqual({
      scaleUpAfter: 3,
      scaleDownAfter: 4,
      scaleDownBelow: 0.3,
      cooldownMs: 20_000,
    });
    // Mode sla corrects every min(intervalS, correctionIntervalS).
    const sla = parseGraph(
      `${BASE}planner:\n  mode: sla\n  ttftMs: 200\n  itlMs: 20\n  profile: p.json\n  correctionIntervalS: 3\n  scaleUpAfterS: 9\n`,
    );
    expect(correctionOptions(sla.planner)).toEqual({ scaleUpAfter: 3 });
    // Knobs left out stay out (load-correction.ts has the defaults).
    expect(correctionOptions(parseGraph(`${BASE}planner:\n  mode: load\n  ttftMs: 1\n  itlMs: 1\n`).planner)).toEqual(
      {},
    );
  });

  it('bad correction knobs name their line', () => {
    const on = `${BASE}planner:\n  mode: load\n  ttftMs: 200\n  itlMs: 20\n  intervalS: 5\n`;
    expect(graphError(`${on}  cooldownS: -1\n`)).toContain('planner.cooldownS: must be a number of seconds >= 0');
    expect(graphError(`${on}  scaleDownBelow: 1.5\n`)).toContain('planner.scaleDownBelow: must be a number in (0, 1)');
    expect(graphError(`${on}  scaleUpAfterS: 2\n`)).toContain(
      'planner.scaleUpAfterS: must be at least the correction interval (5 s)',
    );
    expect(graphError(`${on}  correctionIntervalS: 2\n`)).toContain(
      'planner.correctionIntervalS: is for mode sla only',
    );
    expect(graphError(`${on}  scaleUpAfter: 2\n`)).toMatch(
      /planner: unknown key 'scaleUpAfter' \(known: .*scaleUpAfterS, scaleDownAfterS, scaleDownBelow, cooldownS, reshape, connector, kubernetes\)/,
    );
  });

  it('connector kubernetes: defaults filled, options validated, the kubeconfig relative to the graph file', () => {
    const on = `${BASE}planner:\n  mode: load\n  ttftMs: 200\n  itlMs: 20\n`;
    expect(parseGraph(on).planner.connector).toBeUndefined(); // local
    expect(parseGraph(`${on}  connector: kubernetes\n`).planner.kubernetes).toEqual({
      name: 'tandem',
      workloadKind: 'StatefulSet',
      readyTimeoutS: 600,
    });
    expect(
      parseGraph(
        `${on}  connector: kubernetes\n  kubernetes: {name: llm, namespace: serving, workloadKind: Deployment}\n`,
      ).planner.kubernetes,
    ).toEqual({ name: 'llm', namespace: 'serving', workloadKind: 'Deployment', readyTimeoutS: 600 });
    expect(graphError(`${on}  connector: k8s\n`)).toContain('planner.connector: must be one of local, kubernetes');
    expect(graphError(`${on}  connector: kubernetes\n  kubernetes: {namespace: Serving}\n`)).toContain(
      'planner.kubernetes.namespace: must be a Kubernetes name',
    );
    expect(graphError(`${on}  connector: kubernetes\n  kubernetes: {namespce: x}\n`)).toContain(
      "planner.kubernetes: unknown key 'namespce' (known: name, namespace, kubeconfig, workloadKind, readyTimeoutS)",
    );
    expect(graphError(`${on}  kubernetes: {namespace: x}\n`)).toContain(
      'planner.kubernetes: is for connector kubernetes only',
    );
    const dir = mkdtempSync(join(tmpdir(), 'tandem-planner-graph-'));
    try {
      const file = join(dir, 'graph.yaml');
      writeFileSync(file, `${on}  connector: kubernetes\n  kubernetes: {kubeconfig: kube/config}\n`);
      expect(loadGraph(file).planner.kubernetes!.kubeconfig).toBe(join(dir, 'kube', 'config'));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('reshape: on with a profile and the local connector; otherwise an error at the field', () => {
    const sla = `${BASE}planner:\n  mode: sla\n  ttftMs: 200\n  itlMs: 20\n  profile: p.json\n`;
    expect(parseGraph(`${sla}  reshape: true\n`).planner.reshape).toBe(true);
    expect(parseGraph(sla).planner.reshape).toBeUndefined();
    expect(graphError(`${sla}  reshape: yes please\n`)).toContain(
      'g.yaml:14:12: planner.reshape: must be true or false',
    );
    expect(graphError(`${BASE}planner:\n  mode: load\n  ttftMs: 200\n  itlMs: 20\n  reshape: true\n`)).toContain(
      "planner.reshape: needs a profile: the layouts are compared on the profile's measurements",
    );
    expect(graphError(`${BASE}planner:\n  profile: p.json\n  reshape: true\n`)).toContain(
      'planner.reshape: is for mode load or sla (the planner is off)',
    );
    expect(graphError(`${sla}  reshape: true\n  connector: kubernetes\n`)).toContain(
      'planner.reshape: is for connector local only: the kubernetes connector does not re-shape pools',
    );
  });
});
