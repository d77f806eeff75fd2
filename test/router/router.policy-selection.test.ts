import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { UsageError } from '../../lib/cli/args.js';
import { graphOf } from '../../lib/cli/start.js';
import { GraphError } from '../../lib/deploy/graph.js';

const dir = mkdtempSync(join(tmpdir(), 'tandem-router-policy-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function graphFile(router: string): string {
  const file = join(dir, `g${Math.random().toString(36).slice(2)}.yaml`);
  writeFileSync(
    file,
    `model: dummy:tiny\nmode: agg\npools:\n  - name: agg\n    role: aggregated\n    device: cpu\n${router}`,
  );
  return file;
}

describe('routing policy: the graph, then --router-policy', () => {
  it("the graph's router.policy; the flag overrides it; kv when neither says", async () => {
    const file = graphFile('router:\n  policy: random\n  temperature: 0.5\n');
    expect((await graphOf({ file })).router).toEqual({ policy: 'random', prefillWeight: 1, temperature: 0.5 });
    expect((await graphOf({ file, 'router-policy': 'least-load' })).router.policy).toBe('least-load');
    expect((await graphOf({ file: graphFile('') })).router.policy).toBe('kv');
    expect((await graphOf({ file: graphFile(''), 'router-policy': 'round-robin' })).router.policy).toBe('round-robin');
  });

  it('a bad policy: a UsageError (flag) or a GraphError (file) that lists the policies', async () => {
    const flag = graphOf({ file: graphFile(''), 'router-policy': 'cache' });
    await expect(flag).rejects.toBeInstanceOf(UsageError);
    await expect(flag).rejects.toThrow(
      '--router-policy must be one of kv, least-load, round-robin, random (got cache)',
    );
    const file = graphFile('router:\n  policy: cache\n');
    await expect(graphOf({ file })).rejects.toBeInstanceOf(GraphError);
    await expect(graphOf({ file })).rejects.toThrow(
      `${file}:8:11: router.policy: must be one of kv, least-load, round-robin, random`,
    );
  });
});
