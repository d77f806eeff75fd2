/**
 * `tandem k8s render`: the manifests validate offline against the Kubernetes schemas (kubernetes-models), hold
 * what the graph says, and a graph Kubernetes cannot take is refused with a message; mutated manifests fail
 * validation, so the validator is shown to bite.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import type { IContainer } from 'kubernetes-models/v1/Container';
import type { IStatefulSet } from 'kubernetes-models/apps/v1/StatefulSet';
import type { IDeployment } from 'kubernetes-models/apps/v1/Deployment';
import type { IService } from 'kubernetes-models/v1/Service';
import type { IConfigMap } from 'kubernetes-models/v1/ConfigMap';
import type { IRole } from 'kubernetes-models/rbac.authorization.k8s.io/v1/Role';
import type { IRoleBinding } from 'kubernetes-models/rbac.authorization.k8s.io/v1/RoleBinding';
import {
  K8sManifestError,
  K8sRenderError,
  manifestProblems,
  renderKubernetes,
  validateManifests,
  WORKER_DRAIN_TIMEOUT_S,
  WORKER_PORTS,
  WORKER_TERMINATION_GRACE_S,
  type K8sObject,
} from '../../lib/deploy/index.js';
import { parseGraph } from '../../lib/deploy/graph.js';
import { UsageError } from '../../lib/cli/args.js';
import { k8sMain } from '../../lib/cli/k8s.js';
import { runTs } from '../helpers/cli.js';

const GRAPH = `# two GPU pools and a CPU pool
model: dummy:tiny
frontend: {port: 8080, apiKeyEnv: MY_API_KEY}
pools:
  - name: prefill
    role: prefill
    device: cuda
    replicas: 3
    gpuIds: [0, 1, 2]
  - name: decode
    role: decode
    device: cuda
    replicas: 2
    tensorParallelSize: 4
    engine: {blockSize: 32, kvCacheFraction: 0.8}
  - name: decode-cpu
    role: decode
    device: cpu
    engine: {threads: 2}
`;

/** One prefill and one decode pool, a planner that scales them through the Kubernetes API. */
const PLANNER_GRAPH = `model: dummy:tiny
frontend: {port: 8000}
pools:
  - {name: prefill, role: prefill, device: cuda}
  - {name: decode, role: decode, device: cuda, replicas: 2}
planner: {mode: load, ttftMs: 500, itlMs: 50, connector: kubernetes}
`;

const dir = mkdtempSync(join(tmpdir(), 'tandem-k8s-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function find<T extends K8sObject>(objects: readonly K8sObject[], kind: T['kind'], name: string): T {
  const found = objects.find((o) => o.kind === kind && o.metadata?.name === name);
  if (!found)
    throw new Error(`no ${kind}/${name} in ${objects.map((o) => `${o.kind}/${o.metadata?.name}`).join(', ')}`);
  return found as T;
}
const container = (w: IStatefulSet | IDeployment): IContainer => w.spec!.template.spec!.containers[0]!;

describe('tandem k8s render', () => {
  const graphFile = join(dir, 'graph.yaml');
  writeFileSync(graphFile, GRAPH);
  const out = join(dir, 'out');
  let run: ReturnType<typeof runTs>;
  beforeAll(() => {
    run = runTs('lib/cli/main.ts', [
      'k8s',
      'render',
      '-f',
      graphFile,
      '--out',
      out,
      '--image',
      'registry.example/tandem:0.1.0',
      '--namespace',
      'serving',
    ]);
  });

  /** What the command wrote, read back from its files. */
  const written = (): K8sObject[] =>
    readdirSync(out)
      .sort()
      .flatMap((f) => parseAllDocuments(readFileSync(join(out, f), 'utf8')).map((d) => d.toJS() as K8sObject));

  it('writes one file per component, and every manifest validates against the Kubernetes schemas', () => {
    expect(run.stderr).toContain('gpuIds are not used on Kubernetes');
    expect(run.status).toBe(0);
    expect(readdirSync(out).sort()).toEqual([
      '00-graph.yaml',
      '02-etcd.yaml',
      '10-frontend.yaml',
      '20-pool-decode-cpu.yaml',
      '20-pool-decode.yaml',
      '20-pool-prefill.yaml',
    ]);
    const objects = written();
    expect(objects.map((o) => `${o.kind}/${o.metadata!.name}`).sort()).toEqual([
      'ConfigMap/tandem-graph',
      'Deployment/tandem-frontend',
      'Service/tandem-decode',
      'Service/tandem-decode-cpu',
      'Service/tandem-etcd',
      'Service/tandem-frontend',
      'Service/tandem-prefill',
      'StatefulSet/tandem-decode',
      'StatefulSet/tandem-decode-cpu',
      'StatefulSet/tandem-etcd',
      'StatefulSet/tandem-prefill',
    ]);
    expect(manifestProblems(objects)).toEqual([]);
    for (const o of objects) expect(o.metadata!.namespace, `${o.kind}/${o.metadata!.name}`).toBe('serving');
  });

  it('each pool is a StatefulSet with the graph replicas and GPUs, behind a headless Service', () => {
    const objects = written();
    const expected = [
      { pool: 'prefill', role: 'prefill', replicas: 3, gpus: 1 },
      { pool: 'decode', role: 'decode', replicas: 2, gpus: 4 },
      { pool: 'decode-cpu', role: 'decode', replicas: 1, gpus: 0 },
    ];
    for (const { pool, role, replicas, gpus } of expected) {
      const set = find<IStatefulSet>(objects, 'StatefulSet', `tandem-${pool}`);
      const svc = find<IService>(objects, 'Service', `tandem-${pool}`);
      expect(set.spec!.replicas).toBe(replicas);
      expect(set.spec!.serviceName).toBe(svc.metadata!.name);
      expect(svc.spec!.clusterIP).toBe('None');
      expect(set.spec!.selector.matchLabels).toEqual(set.spec!.template.metadata!.labels);
      expect(svc.spec!.selector).toEqual(set.spec!.selector.matchLabels);
      expect(set.spec!.template.metadata!.labels).toMatchObject({ 'tandem.dev/pool': pool, 'tandem.dev/role': role });
      const c = container(set);
      expect(c.image).toBe('registry.example/tandem:0.1.0');
      expect(c.args).toEqual([
        'worker',
        '--join',
        'etcd://tandem-etcd.serving.svc:2379',
        '--pool',
        pool,
        '--graph',
        '/etc/tandem/graph.yaml',
        '--host',
        '0.0.0.0',
        '--port',
        String(WORKER_PORTS.requests),
        '--kv-port',
        String(WORKER_PORTS.kv),
        '--status-port',
        String(WORKER_PORTS.status),
        '--drain-timeout',
        String(WORKER_DRAIN_TIMEOUT_S),
      ]);
      // The kubelet's SIGKILL comes after the grace period: the worker's drain on SIGTERM must fit in it.
      expect(set.spec!.template.spec!.terminationGracePeriodSeconds).toBe(WORKER_TERMINATION_GRACE_S);
      expect(WORKER_TERMINATION_GRACE_S).toBeGreaterThan(WORKER_DRAIN_TIMEOUT_S);
      expect(c.resources?.limits?.['nvidia.com/gpu']).toBe(gpus > 0 ? gpus : undefined);
      const mounts = (c.volumeMounts ?? []).map((m) => m.mountPath);
      if (gpus > 0) expect(mounts).toContain('/dev/shm');
      else expect(mounts).not.toContain('/dev/shm');
      expect(c.ports!.map((p) => [p.name, p.containerPort])).toEqual(Object.entries(WORKER_PORTS));
      expect(c.livenessProbe!.httpGet).toEqual({ path: '/live', port: 'status' });
      expect(c.readinessProbe!.httpGet).toEqual({ path: '/health', port: 'status' });
      expect(c.env).toContainEqual({
        name: 'TANDEM_TOKEN',
        valueFrom: { secretKeyRef: { name: 'tandem-token', key: 'token' } },
      });
      expect(set.spec!.template.spec!.automountServiceAccountToken).toBe(false);
    }
    expect(container(find<IStatefulSet>(objects, 'StatefulSet', 'tandem-decode-cpu')).resources!.requests).toEqual({
      cpu: 2,
    });
  });

  it('the frontend listens on the graph port, mounts no account token (no planner here), and gets the API key from the Secret', () => {
    const objects = written();
    const deployment = find<IDeployment>(objects, 'Deployment', 'tandem-frontend');
    const svc = find<IService>(objects, 'Service', 'tandem-frontend');
    expect(svc.spec!.ports).toEqual([{ name: 'http', port: 8080, targetPort: 'http' }]);
    const c = container(deployment);
    expect(c.ports).toEqual([{ name: 'http', containerPort: 8080 }]);
    expect(c.args).toEqual(expect.arrayContaining(['frontend', '--port', '8080', '--host', '0.0.0.0']));
    expect(c.livenessProbe!.httpGet).toEqual({ path: '/live', port: 'http' });
    expect(c.readinessProbe!.httpGet).toEqual({ path: '/health', port: 'http' });
    expect(c.env).toContainEqual({
      name: 'MY_API_KEY',
      valueFrom: { secretKeyRef: { name: 'tandem-token', key: 'api-key' } },
    });
    expect(deployment.spec!.template.spec!.serviceAccountName).toBeUndefined();
    expect(deployment.spec!.template.spec!.automountServiceAccountToken).toBe(false);
  });

  it('the ConfigMap holds the graph as loaded, for the pods: the same graph, listening on all interfaces', () => {
    const map = find<IConfigMap>(written(), 'ConfigMap', 'tandem-graph');
    const inPod = parseGraph(map.data!['graph.yaml']!);
    const original = parseGraph(GRAPH);
    expect(inPod.frontend.host).toBe('0.0.0.0');
    expect(inPod.pools[0]!.gpuIds).toBeUndefined();
    const { gpuIds: _gpuIds, ...prefill } = original.pools[0]!;
    expect(inPod).toEqual({
      ...original,
      frontend: { ...original.frontend, host: '0.0.0.0' },
      pools: [prefill, ...original.pools.slice(1)],
    });
  });

  it('--etcd uses an existing etcd and renders none', () => {
    const { files } = renderKubernetes(parseGraph(GRAPH), { etcd: 'etcd://etcd.infra:2379' });
    const objects = files.flatMap((f) => f.objects);
    expect(objects.some((o) => o.metadata!.name === 'tandem-etcd')).toBe(false);
    expect(container(find<IStatefulSet>(objects, 'StatefulSet', 'tandem-decode')).args).toContain(
      'etcd://etcd.infra:2379',
    );
    expect(manifestProblems(objects)).toEqual([]);
  });

  it('stdout carries one YAML stream when no --out is given', () => {
    const r = runTs('lib/cli/main.ts', ['k8s', 'render', '-f', graphFile]);
    expect(r.status).toBe(0);
    const docs = parseAllDocuments(r.stdout).map((d) => d.toJS() as K8sObject);
    expect(docs).toHaveLength(11);
    expect(manifestProblems(docs)).toEqual([]);
  });
});

describe('a planner with the kubernetes connector', () => {
  const render = (text: string, options = {}) =>
    renderKubernetes(parseGraph(text), { name: 'llm', namespace: 'serving', ...options });

  it('gets a service account allowed exactly what the connector calls, for its two StatefulSets; the frontend runs under it', () => {
    const { files, notes } = render(PLANNER_GRAPH);
    expect(files.map((f) => f.file)).toContain('01-planner-rbac.yaml');
    const objects = files.flatMap((f) => f.objects);
    expect(manifestProblems(objects)).toEqual([]);
    const role = find<IRole>(objects, 'Role', 'llm-planner');
    expect(role.rules).toEqual([
      {
        apiGroups: ['apps'],
        resources: ['statefulsets'],
        resourceNames: ['llm-prefill', 'llm-decode'],
        verbs: ['get'],
      },
      {
        apiGroups: ['apps'],
        resources: ['statefulsets/scale'],
        resourceNames: ['llm-prefill', 'llm-decode'],
        verbs: ['get', 'patch'],
      },
    ]);
    // The names it may scale are the StatefulSets rendered.
    for (const name of role.rules![0]!.resourceNames!) find<IStatefulSet>(objects, 'StatefulSet', name);
    const binding = find<IRoleBinding>(objects, 'RoleBinding', 'llm-planner');
    expect(binding.roleRef).toEqual({ apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'llm-planner' });
    expect(binding.subjects).toEqual([{ kind: 'ServiceAccount', name: 'llm-planner', namespace: 'serving' }]);
    find(objects, 'ServiceAccount', 'llm-planner');
    const frontendSpec = find<IDeployment>(objects, 'Deployment', 'llm-frontend').spec!.template.spec!;
    expect(frontendSpec.serviceAccountName).toBe('llm-planner');
    expect(frontendSpec.automountServiceAccountToken).toBeUndefined();
    // Workers never get a token.
    for (const set of ['llm-prefill', 'llm-decode'])
      expect(find<IStatefulSet>(objects, 'StatefulSet', set).spec!.template.spec!.automountServiceAccountToken).toBe(
        false,
      );
    expect(notes.join('\n')).not.toContain('kubeconfig');
  });

  it("the pods' graph names the rendered workloads and namespace, and no kubeconfig", () => {
    const { files, notes } = render(
      PLANNER_GRAPH.replace(
        'connector: kubernetes}',
        'connector: kubernetes, kubernetes: {kubeconfig: /home/me/.kube/config}}',
      ),
    );
    const map = find<IConfigMap>(
      files.flatMap((f) => f.objects),
      'ConfigMap',
      'llm-graph',
    );
    expect(parseGraph(map.data!['graph.yaml']!).planner.kubernetes).toEqual({
      name: 'llm',
      namespace: 'serving',
      workloadKind: 'StatefulSet',
      readyTimeoutS: 600,
    });
    expect(notes.join('\n')).toContain('planner.kubernetes.kubeconfig is not used in the pods');
  });

  it('no RBAC for a planner that is off or local', () => {
    for (const planner of ['{mode: off, connector: kubernetes}', '{mode: load, ttftMs: 1, itlMs: 1}']) {
      const { files } = render(PLANNER_GRAPH.replace(/planner: .*/, `planner: ${planner}`));
      expect(files.map((f) => f.file)).not.toContain('01-planner-rbac.yaml');
    }
  });

  it('a kubernetes section that names other workloads, another namespace, or Deployments is refused', () => {
    const withSection = (section: string) =>
      PLANNER_GRAPH.replace('connector: kubernetes}', `connector: kubernetes, kubernetes: ${section}}`);
    expect(() => render(withSection('{name: other}'))).toThrow(K8sRenderError);
    expect(() => render(withSection('{name: other}'))).toThrow(/planner.kubernetes.name 'other'.*--name 'llm'/);
    expect(() => render(withSection('{namespace: prod}'))).toThrow(/planner.kubernetes.namespace 'prod'/);
    expect(() => render(withSection('{workloadKind: Deployment}'))).toThrow(/writes each pool as a StatefulSet/);
    expect(() => render(withSection('{name: llm, namespace: serving}'))).not.toThrow();
  });
});

describe('graphs and options Kubernetes cannot take', () => {
  it('a bad graph: the graph error with file, line and column; exit 1', () => {
    const bad = join(dir, 'bad.yaml');
    writeFileSync(bad, 'model: dummy:tiny\npools:\n  - {name: p, role: prefill, replicas: 0}\n');
    const r = runTs('lib/cli/main.ts', ['k8s', 'render', '-f', bad]);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`${bad}:3:`);
    expect(r.stderr).toContain('pools[0].replicas: must be a positive integer');
    expect(r.stdout).toBe('');
  });

  it('a wrong command line: exit 2 with what is wrong', () => {
    const graph = join(dir, 'ok.yaml');
    writeFileSync(graph, GRAPH);
    const r = runTs('lib/cli/main.ts', ['k8s', 'render', '-f', graph, '--bogus']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("tandem: Unknown option '--bogus' (see tandem k8s --help)");
    const cases: [string[], RegExp][] = [
      [[], /k8s needs render \(got nothing\)/],
      [['apply'], /k8s needs render \(got 'apply'\)/],
      [['render'], /needs -f graph.yaml/],
      [['render', '-f', graph, '--out'], /Option '--out <value>' argument missing/],
      [['render', '-f', graph, '--etcd', 'nohost'], /--etcd: etcd endpoint 'nohost'/],
      [['render', '-f', graph, '--image', ''], /--image must not be empty/],
    ];
    for (const [args, message] of cases) expect(() => k8sMain(args), args.join(' ')).toThrow(message);
    for (const [args] of cases) expect(() => k8sMain(args)).toThrow(UsageError);
  });

  it('names Kubernetes refuses, and a port it cannot expose, are typed errors naming the field', () => {
    const withPool = (name: string) =>
      parseGraph(`model: dummy:tiny\nmode: agg\npools:\n  - {name: ${name}, role: aggregated}\n`);
    expect(() => renderKubernetes(withPool('Decode_A'))).toThrow(K8sRenderError);
    expect(() => renderKubernetes(withPool('Decode_A'))).toThrow(/pools\[0\]\.name 'Decode_A'/);
    expect(() => renderKubernetes(withPool('a'.repeat(50)))).toThrow(/at most 52 characters/);
    expect(() => renderKubernetes(withPool('ok'), { name: 'Tandem' })).toThrow(
      /--name 'Tandem' is not a Kubernetes name/,
    );
    expect(() => renderKubernetes(withPool('ok'), { namespace: 'a.b' })).toThrow(/--namespace 'a.b'/);
    expect(() => renderKubernetes(withPool('ok'), { image: 'has space' })).toThrow(/--image/);
    const anyPort = parseGraph(
      `model: dummy:tiny\nmode: agg\nfrontend: {port: 0}\npools:\n  - {name: a, role: aggregated}\n`,
    );
    expect(() => renderKubernetes(anyPort)).toThrow(/frontend.port is 0/);
    try {
      renderKubernetes(withPool('Decode_A'));
    } catch (error) {
      expect((error as K8sRenderError).code).toBe('TANDEM_K8S_RENDER');
    }
  });
});

describe('the validator bites', () => {
  const objects = [
    ...renderKubernetes(parseGraph(GRAPH)).files.flatMap((f) => f.objects),
    ...renderKubernetes(parseGraph(PLANNER_GRAPH)).files.find((f) => f.file === '01-planner-rbac.yaml')!.objects,
  ];
  const mutated = (kind: string, name: string, mutate: (o: Record<string, any>) => void): unknown[] =>
    objects.map((o) => {
      if (o.kind !== kind || o.metadata!.name !== name) return o;
      const copy = structuredClone(o) as Record<string, any>;
      mutate(copy);
      return copy;
    });

  it('the rendered manifests pass as they are', () => {
    expect(() => validateManifests(objects)).not.toThrow();
  });

  const cases: [string, string, string, (o: Record<string, any>) => void, RegExp][] = [
    [
      'replicas as text',
      'StatefulSet',
      'tandem-decode',
      (o) => (o.spec.replicas = 'two'),
      /StatefulSet\/tandem-decode: \/spec\/replicas must be integer/,
    ],
    [
      'a container port as text',
      'Deployment',
      'tandem-frontend',
      (o) => (o.spec.template.spec.containers[0].ports[0].containerPort = '8080'),
      /containerPort must be integer/,
    ],
    [
      'no selector',
      'StatefulSet',
      'tandem-prefill',
      (o) => delete o.spec.selector,
      /must have required property selector/,
    ],
    [
      'no containers',
      'Deployment',
      'tandem-frontend',
      (o) => delete o.spec.template.spec.containers,
      /required property containers/,
    ],
    [
      'a probe without its port',
      'StatefulSet',
      'tandem-prefill',
      (o) => delete o.spec.template.spec.containers[0].livenessProbe.httpGet.port,
      /livenessProbe\/httpGet must have required property port/,
    ],
    ['a rule without verbs', 'Role', 'tandem-planner', (o) => delete o.rules[0].verbs, /required property verbs/],
    [
      'a binding without its role',
      'RoleBinding',
      'tandem-planner',
      (o) => delete o.roleRef,
      /required property roleRef/,
    ],
    [
      'a Service port as text',
      'Service',
      'tandem-frontend',
      (o) => (o.spec.ports[0].port = 'http'),
      /ports\/0\/port must be integer/,
    ],
    [
      'a ConfigMap value that is not text',
      'ConfigMap',
      'tandem-graph',
      (o) => (o.data['graph.yaml'] = { model: 1 }),
      /must be string/,
    ],
    [
      'a kind the validator does not know',
      'StatefulSet',
      'tandem-etcd',
      (o) => (o.kind = 'StatefulSett'),
      /not a kind this validator knows/,
    ],
  ];
  for (const [what, kind, name, mutate, message] of cases)
    it(`fails: ${what}`, () => {
      const broken = mutated(kind, name, mutate);
      const problems = manifestProblems(broken);
      expect(problems.join('\n')).toMatch(message);
      expect(() => validateManifests(broken)).toThrow(K8sManifestError);
    });
});
