import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DEFAULT_PREFILL_WEIGHT } from '../../lib/router/index.js';
import { DEFAULT_MAX_PREFILL_QUEUE, DEFAULT_MIN_REMOTE_PREFILL_TOKENS } from '../../lib/router/disagg.js';
import {
  defaultGraph,
  GraphError,
  loadGraph,
  parseGraph,
  SHARED_GPU_KV_CACHE_FRACTION,
  type DeploymentGraph,
} from '../../lib/deploy/graph.js';

/** The message of the GraphError that `text` raises. */
function errorOf(text: string, source = 'graph.yaml'): string {
  try {
    parseGraph(text, source);
  } catch (error) {
    expect(error).toBeInstanceOf(GraphError);
    return (error as Error).message;
  }
  throw new Error('the graph parsed');
}

const MINIMAL = `model: dummy:tiny
pools:
  - name: prefill
    role: prefill
  - name: decode
    role: decode
`;

describe('parseGraph', () => {
  it('fills every default', () => {
    const g = parseGraph(MINIMAL);
    expect(g).toEqual<DeploymentGraph>({
      model: 'dummy:tiny',
      mode: 'disagg',
      frontend: { host: '127.0.0.1', port: 8000, replicas: 1, migrationLimit: 3 },
      pools: [
        {
          name: 'prefill',
          role: 'prefill',
          replicas: 1,
          gpusPerReplica: 1,
          tensorParallelSize: 1,
          pipelineParallelSize: 1,
          expertParallelSize: 1,
          device: 'auto',
          engine: { blockSize: 16 },
        },
        {
          name: 'decode',
          role: 'decode',
          replicas: 1,
          gpusPerReplica: 1,
          tensorParallelSize: 1,
          pipelineParallelSize: 1,
          expertParallelSize: 1,
          device: 'auto',
          engine: { blockSize: 16 },
        },
      ],
      disaggregation: {
        minRemotePrefillTokens: DEFAULT_MIN_REMOTE_PREFILL_TOKENS,
        maxPrefillQueue: DEFAULT_MAX_PREFILL_QUEUE,
      },
      router: { policy: 'kv', prefillWeight: DEFAULT_PREFILL_WEIGHT, temperature: 0 },
      planner: { mode: 'off', intervalS: 60, minReplicas: 1 },
    });
  });

  it('router: the policy and the cost weights; a bad policy or weight names the key, its line and the choices', () => {
    const g = parseGraph(`${MINIMAL}router:\n  policy: round-robin\n  prefillWeight: 2.5\n  temperature: 0.1\n`);
    expect(g.router).toEqual({ policy: 'round-robin', prefillWeight: 2.5, temperature: 0.1 });
    expect(parseGraph(`${MINIMAL}router:\n  policy: least-load\n`).router).toEqual({
      policy: 'least-load',
      prefillWeight: DEFAULT_PREFILL_WEIGHT,
      temperature: 0,
    });
    expect(errorOf(`${MINIMAL}router:\n  policy: prefix\n`)).toBe(
      'graph.yaml:8:11: router.policy: must be one of kv, least-load, round-robin, random',
    );
    expect(errorOf(`${MINIMAL}router:\n  temperature: -1\n`)).toBe(
      'graph.yaml:8:16: router.temperature: must be a number >= 0 (0: always the cheapest worker)',
    );
    expect(errorOf(`${MINIMAL}router:\n  prefillWeight: heavy\n`)).toBe(
      'graph.yaml:8:18: router.prefillWeight: must be a number >= 0',
    );
    expect(errorOf(`${MINIMAL}router:\n  polcy: kv\n`)).toBe(
      "graph.yaml:8:3: router: unknown key 'polcy' (known: policy, prefillWeight, temperature)",
    );
    expect(errorOf(`${MINIMAL}router: kv\n`)).toBe('graph.yaml:7:9: router: must be a mapping');
  });

  it('reads a full graph', () => {
    const g = parseGraph(`# two pools on four GPUs
model: dummy:llama-3.2-1b
mode: disagg
frontend:
  host: 0.0.0.0
  port: 9000
pools:
  - name: prefill
    role: prefill
    replicas: 2
    device: cuda
    gpuIds: [0, 1]
    engine: { blockSize: 32, numBlocks: 4096, maxBatchTokens: 8192 }
  - name: decode
    role: decode
    tensorParallelSize: 2
    gpusPerReplica: 2
    device: cuda
    engine:
      kvCacheFraction: 0.85
      maxSequences: 128
disaggregation:
  minRemotePrefillTokens: 64
  maxPrefillQueue: 4
`);
    expect(g.frontend).toEqual({ host: '0.0.0.0', port: 9000, replicas: 1, migrationLimit: 3 });
    expect(g.pools[0]).toMatchObject({ replicas: 2, gpusPerReplica: 1, gpuIds: [0, 1] });
    expect(g.pools[0]!.engine).toEqual({ blockSize: 32, numBlocks: 4096, maxBatchTokens: 8192 });
    expect(g.pools[1]).toMatchObject({ tensorParallelSize: 2, gpusPerReplica: 2 });
    expect(g.pools[1]!.engine).toEqual({ blockSize: 16, kvCacheFraction: 0.85, maxSequences: 128 });
    expect(g.disaggregation).toEqual({ minRemotePrefillTokens: 64, maxPrefillQueue: 4 });
  });

  it('CPU pools default to no GPUs; agg mode takes an aggregated pool', () => {
    const g = parseGraph(`model: dummy:tiny
mode: agg
pools:
  - { name: worker, role: aggregated, device: cpu, engine: { threads: 2 } }
`);
    expect(g.mode).toBe('agg');
    expect(g.pools[0]).toMatchObject({ gpusPerReplica: 0, device: 'cpu', engine: { blockSize: 16, threads: 2 } });
    // A decode pool serves agg mode too.
    expect(parseGraph('model: dummy:tiny\nmode: agg\npools: [{ name: d, role: decode }]').pools[0]!.role).toBe(
      'decode',
    );
  });

  it('points at the line and column of a bad value', () => {
    const text = `model: dummy:tiny
pools:
  - name: prefill
    role: prefill
  - name: decode
    role: decode
    replicas: 0
`;
    expect(errorOf(text)).toBe('graph.yaml:7:15: pools[1].replicas: must be a positive integer');
    expect(errorOf(text.replace('replicas: 0', 'replicas: 1.5'))).toBe(
      'graph.yaml:7:15: pools[1].replicas: must be a positive integer',
    );
    expect(errorOf(text.replace('replicas: 0', 'replicas: two'))).toBe(
      'graph.yaml:7:15: pools[1].replicas: must be a positive integer',
    );
  });

  it('rejects unknown keys at the key, with a suggestion', () => {
    expect(
      errorOf(`model: dummy:tiny
pools:
  - name: p
    role: prefill
    engine:
      block_size: 8
  - name: d
    role: decode
frontend: { port: 8000, hots: x }
`),
    ).toBe(
      [
        "graph.yaml:6:7: pools[0].engine: unknown key 'block_size' (did you mean 'blockSize'?)",
        "graph.yaml:9:25: frontend: unknown key 'hots' (known: host, port, replicas, ports, migrationLimit, apiKeyEnv)",
      ].join('\n'),
    );
    expect(errorOf(`${MINIMAL}extra: 1\n`)).toMatch(/^graph\.yaml:7:1: unknown key 'extra'/);
  });

  it('frontend.apiKeyEnv names the variable that holds the API key; a key itself is refused', () => {
    expect(parseGraph(`${MINIMAL}frontend: { apiKeyEnv: MY_KEY_1 }\n`).frontend).toEqual({
      host: '127.0.0.1',
      port: 8000,
      replicas: 1,
      migrationLimit: 3,
      apiKeyEnv: 'MY_KEY_1',
    });
    expect(errorOf(`${MINIMAL}frontend: { apiKeyEnv: 'my key' }\n`)).toBe(
      'graph.yaml:7:24: frontend.apiKeyEnv: must be the name of an environment variable (letters, digits, _)',
    );
    expect(errorOf(`${MINIMAL}frontend: { apiKey: sk-123 }\n`)).toBe(
      "graph.yaml:7:13: frontend: unknown key 'apiKey': an API key does not belong in a graph file; put it in " +
        'an environment variable and name that in apiKeyEnv',
    );
  });

  it('reports every schema error, in document order', () => {
    const message = errorOf(
      `model: 42
mode: both
frontend:
  port: 70000
pools:
  - name: "bad name"
    role: decoder
    device: tpu
    engine: { kvCacheFraction: 1.5 }
`,
      'x.yaml',
    );
    expect(message.split('\n')).toEqual([
      'x.yaml:1:8: model: must be a string: a model directory or dummy:<preset>',
      'x.yaml:2:7: mode: must be one of disagg, agg',
      'x.yaml:4:9: frontend.port: must be an integer in 0..65535',
      'x.yaml:6:11: pools[0].name: must be 1 to 63 letters, digits, - or _, starting with a letter or digit',
      'x.yaml:7:11: pools[0].role: must be one of prefill, decode, aggregated',
      'x.yaml:8:13: pools[0].device: must be one of cpu, cuda, auto',
      'x.yaml:9:32: pools[0].engine.kvCacheFraction: must be a number in (0, 1]',
    ]);
  });

  it('missing fields point at the mapping that lacks them', () => {
    expect(errorOf('pools:\n  - name: a\n    role: decode\n')).toBe('graph.yaml:1:1: model: is required');
    expect(errorOf('model: dummy:tiny\npools:\n  - name: a\n  - name: b\n    role: decode\n')).toBe(
      'graph.yaml:3:5: pools[0].role: is required',
    );
    expect(errorOf('model: dummy:tiny\npools: []\n')).toBe('graph.yaml:2:8: pools: must list at least one pool');
    expect(errorOf('')).toBe('graph.yaml:1:1: a deployment graph must be a mapping with model and pools');
  });

  it('YAML syntax errors carry their position', () => {
    expect(errorOf('model: dummy:tiny\npools: [\n')).toMatch(/^graph\.yaml:\d+:\d+: .+/);
    expect(errorOf('model: a\nmodel: b\npools: []\n')).toMatch(/^graph\.yaml:2:1: Map keys must be unique/);
  });

  it('semantic checks: roles against mode', () => {
    expect(errorOf('model: dummy:tiny\npools:\n  - { name: d, role: decode }\n')).toBe(
      'graph.yaml:3:3: pools: mode disagg needs at least one prefill and one decode pool (no prefill pool)',
    );
    expect(errorOf('model: dummy:tiny\npools:\n  - { name: p, role: prefill }\n')).toMatch(/\(no decode pool\)$/);
    expect(errorOf('model: dummy:tiny\nmode: agg\npools:\n  - { name: p, role: prefill }\n')).toBe(
      [
        'graph.yaml:4:3: pools: mode agg needs an aggregated (or decode) pool',
        'graph.yaml:4:22: pools[0].role: mode agg runs no prefill pools (use mode disagg)',
      ].join('\n'),
    );
  });

  it('expertParallelSize per pool: checked against the model at the field; ranks are max(tp, ep) x pp', () => {
    const pool = (model: string, extra: string) => `model: ${model}
pools:
  - name: p
    role: prefill
    device: cpu
${extra}
  - name: d
    role: decode
`;
    const g = parseGraph(pool('dummy:tiny-moe', '    expertParallelSize: 4'));
    expect(g.pools[0]).toMatchObject({ expertParallelSize: 4, tensorParallelSize: 1, gpusPerReplica: 0 });
    expect(g.pools[1]).toMatchObject({ expertParallelSize: 1 });
    const gpu = parseGraph(pool('dummy:tiny-moe', '    expertParallelSize: 2').replace('    device: cpu\n', ''));
    expect(gpu.pools[0]).toMatchObject({ expertParallelSize: 2, gpusPerReplica: 2 });
    expect(errorOf(pool('dummy:tiny-moe', '    expertParallelSize: 3'))).toBe(
      "graph.yaml:6:25: pools[0].expertParallelSize: expert parallel size 3 does not divide the model's 8 experts",
    );
    expect(errorOf(pool('dummy:tiny', '    expertParallelSize: 2'))).toMatch(
      /^graph\.yaml:6:25: pools\[0\]\.expertParallelSize: expert parallel size 2 needs a mixture-of-experts model/,
    );
  });

  it('semantic checks: GPUs, devices, names, KV sizing, presets', () => {
    const pools = (extra: string) => `model: dummy:tiny
pools:
  - name: p
    role: prefill
${extra}
  - name: d
    role: decode
`;
    expect(errorOf(pools('    device: cpu\n    gpusPerReplica: 1'))).toBe(
      'graph.yaml:6:21: pools[0].gpusPerReplica: must be 0 on device cpu',
    );
    expect(errorOf(pools('    device: cpu\n    tensorParallelSize: 3'))).toBe(
      "graph.yaml:6:25: pools[0].tensorParallelSize: tensor parallel size 3 does not divide the model's 4 attention heads",
    );
    expect(errorOf(pools('    tensorParallelSize: 2\n    gpusPerReplica: 3'))).toBe(
      'graph.yaml:6:21: pools[0].gpusPerReplica: must equal tensorParallelSize x pipelineParallelSize (2): one GPU per rank, or 1: every rank on one GPU',
    );
    expect(errorOf(pools('    replicas: 2\n    gpuIds: [0]'))).toBe(
      'graph.yaml:6:13: pools[0].gpuIds: must list replicas x gpusPerReplica = 2 GPU indices (got 1)',
    );
    expect(errorOf(pools('    engine: { numBlocks: 10, kvCacheFraction: 0.5 }'))).toBe(
      'graph.yaml:5:47: pools[0].engine.kvCacheFraction: set numBlocks or kvCacheFraction, not both',
    );
    expect(errorOf(pools('  - name: p\n    role: decode'))).toBe(
      "graph.yaml:5:11: pools[1].name: 'p' is already the name of pools[0]",
    );
    expect(errorOf(MINIMAL.replace('dummy:tiny', 'dummy:huge'))).toBe(
      "graph.yaml:1:8: model: unknown dummy preset 'huge' (known: tiny, llama-3.2-1b, llama-3.1-8b, llama-3.1-70b, tiny-moe, tiny-mixtral, tiny-qwen2-moe, qwen3-30b-a3b, mixtral-8x7b, qwen1.5-moe-a2.7b)",
    );
  });
});

describe('loadGraph', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-graph-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('names the file in errors and resolves the model directory against it', () => {
    mkdirSync(join(dir, 'models', 'm'), { recursive: true });
    const file = join(dir, 'graph.yaml');
    writeFileSync(file, MINIMAL.replace('dummy:tiny', './models/m'));
    expect(loadGraph(file).model).toBe(join(dir, 'models', 'm'));

    writeFileSync(file, MINIMAL.replace('dummy:tiny', './models/none'));
    expect(() => loadGraph(file)).toThrow(
      `${file}:1:8: model: model directory ${join(dir, 'models', 'none')} does not exist`,
    );
    expect(() => loadGraph(join(dir, 'missing.yaml'))).toThrow(/missing\.yaml:1:1: cannot read/);
  });
});

describe('defaultGraph', () => {
  it('no GPU: both workers on the CPU with dummy:tiny', () => {
    const g = defaultGraph({ gpus: 0 });
    expect(g.model).toBe('dummy:tiny');
    expect(g.mode).toBe('disagg');
    expect(g.frontend).toEqual({ host: '127.0.0.1', port: 8000, replicas: 1, migrationLimit: 3 });
    expect(g.pools.map((p) => [p.name, p.role, p.device, p.gpusPerReplica, p.gpuIds])).toEqual([
      ['prefill', 'prefill', 'cpu', 0, undefined],
      ['decode', 'decode', 'cpu', 0, undefined],
    ]);
  });

  it('one GPU: both workers on it, sharing its memory', () => {
    const g = defaultGraph({ gpus: 1, model: '/models/llama' });
    expect(g.model).toBe('/models/llama');
    expect(g.pools.map((p) => [p.role, p.device, p.gpuIds, p.engine.kvCacheFraction])).toEqual([
      ['prefill', 'cuda', [0], SHARED_GPU_KV_CACHE_FRACTION],
      ['decode', 'cuda', [0], SHARED_GPU_KV_CACHE_FRACTION],
    ]);
  });

  it('two GPUs or more: prefill on GPU 0, decode on GPU 1', () => {
    for (const gpus of [2, 8]) {
      const g = defaultGraph({ gpus });
      expect(g.pools.map((p) => [p.role, p.device, p.gpuIds, p.engine.kvCacheFraction])).toEqual([
        ['prefill', 'cuda', [0], undefined],
        ['decode', 'cuda', [1], undefined],
      ]);
    }
  });

  it('agg mode: one aggregated worker', () => {
    expect(defaultGraph({ gpus: 0, mode: 'agg' }).pools.map((p) => p.role)).toEqual(['aggregated']);
    expect(() => defaultGraph({ gpus: -1 })).toThrow(TypeError);
  });
});
