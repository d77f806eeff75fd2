/**
 * The command lines of `tandem worker --join` and `tandem frontend --join`: what they refuse, and that the
 * commands `tandem k8s render` puts in its pods are command lines tandem takes.
 */
import { describe, expect, it } from 'vitest';
import { parseCommandLine } from '../../lib/cli/args.js';
import { renderKubernetes } from '../../lib/deploy/k8s/render.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { runTs } from '../helpers/cli.js';

describe('tandem worker / frontend command lines', () => {
  it('refuse a missing --join, --pool or --graph with exit status 2', () => {
    for (const [args, message] of [
      [['worker', '--pool', 'decode', '--graph', 'g.yaml'], /needs --join/],
      [['worker', '--join', 'etcd://127.0.0.1:1', '--graph', 'g.yaml'], /needs --pool/],
      [['frontend', '--join', 'etcd://127.0.0.1:1'], /needs --graph/],
      [
        ['worker', '--join', 'etcd://127.0.0.1:1', '--pool', 'p', '--graph', 'g', '--kv-backend', 'nccl'],
        /--kv-backend/,
      ],
      [
        ['frontend', '--join', 'etcd://127.0.0.1:1', '--graph', 'g', '--pool', 'p'],
        /unknown option --pool for frontend/,
      ],
      [['serve', '-f', 'g.yaml', '--namespace', 'ns'], /--namespace goes with --control/],
    ] as const) {
      const r = runTs('lib/cli/main.ts', [...args]);
      expect(r.status, r.stderr).toBe(2);
      expect(r.stderr).toMatch(message);
    }
  });

  it('the pods of tandem k8s render run command lines tandem takes', () => {
    const g = defaultGraph({ gpus: 0, mode: 'disagg', port: 8000 });
    const { files } = renderKubernetes(g);
    const args = files
      .flatMap((f) => f.objects)
      .flatMap((o) => ('spec' in o && o.spec && 'template' in o.spec ? o.spec.template.spec!.containers : []))
      .map((c) => c.args ?? [])
      .filter((a) => a[0] === 'worker' || a[0] === 'frontend');
    expect(args.map((a) => a[0]).sort()).toEqual(['frontend', 'worker', 'worker']);
    for (const a of args) expect(() => parseCommandLine(a), a.join(' ')).not.toThrow();
  });
});
