/**
 * The kubernetes connector against a fake Kubernetes API server (no cluster here): a loopback HTTP server plays
 * the API's apps/v1 StatefulSet and Deployment endpoints (scale subresource, status), records every request the
 * official client sends, and answers 404, 409, 500 or nothing at all when a test asks it to.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { KubeConfig } from '@kubernetes/client-node';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  KubernetesApiError,
  KubernetesConflictError,
  KubernetesConnector,
  KubernetesNotFoundError,
  KubernetesTimeoutError,
  kubernetesConnectorOptions,
  type KubernetesConnectorOptions,
} from '../../lib/planner/connectors/kubernetes.js';
import { parseGraph } from '../../lib/deploy/graph.js';
import { PlannerActionError } from '../../lib/planner/connectors/index.js';
import { ReshapeUnsupportedError } from '../../lib/planner/errors.js';

interface Recorded {
  method: string;
  path: string;
  contentType?: string;
  authorization?: string;
  body?: unknown;
}

interface FakeWorkload {
  replicas: number;
  resourceVersion: number;
  generation: number;
  /** Pods that exist / are ready right now (the fake's controller moves them toward `replicas` on each read). */
  pods: number;
  ready: number;
  /** Reads of the status before the fake's controller catches up (0: at once). */
  lag: number;
  /** Reads the fake controller never gets past (a pod that never becomes ready). */
  stuck?: boolean;
}

type Fault =
  { status: number; times: number; when: (r: Recorded) => boolean } | { hang: true; when: (r: Recorded) => boolean };

const NS = 'serving';
const STS = '/apis/apps/v1/namespaces/serving/statefulsets';
const DEPLOY = '/apis/apps/v1/namespaces/serving/deployments';

/** The fake API server: apps/v1 objects by `<resource>/<name>`. */
class FakeApiServer {
  readonly requests: Recorded[] = [];
  readonly objects = new Map<string, FakeWorkload>();
  faults: Fault[] = [];
  private server!: Server;
  url = '';

  async start(): Promise<void> {
    this.server = createServer((req, res) => {
      let raw = '';
      req.on('data', (d: Buffer) => (raw += d.toString()));
      req.on('end', () => this.handle(req, res, raw));
    });
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  stop(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  reset(workloads: Record<string, Partial<FakeWorkload> & { replicas: number }>): void {
    this.requests.length = 0;
    this.faults = [];
    this.objects.clear();
    for (const [key, w] of Object.entries(workloads))
      this.objects.set(key, { resourceVersion: 100, generation: 1, pods: w.replicas, ready: w.replicas, lag: 0, ...w });
  }

  private send(res: ServerResponse, status: number, body: unknown): void {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  }

  private statusBody(code: number, reason: string, message: string) {
    return { kind: 'Status', apiVersion: 'v1', status: 'Failure', message, reason, code };
  }

  private handle(req: IncomingMessage, res: ServerResponse, raw: string): void {
    const recorded: Recorded = {
      method: req.method!,
      path: req.url!,
      ...(req.headers['content-type'] ? { contentType: req.headers['content-type'] } : {}),
      ...(req.headers.authorization ? { authorization: req.headers.authorization } : {}),
      ...(raw ? { body: JSON.parse(raw) as unknown } : {}),
    };
    this.requests.push(recorded);
    for (const fault of this.faults) {
      if (!fault.when(recorded)) continue;
      if ('hang' in fault) return; // never answers
      if (fault.times > 0) {
        fault.times--;
        this.send(res, fault.status, this.statusBody(fault.status, 'Fault', `injected ${fault.status}`));
        return;
      }
    }
    const m = /^\/apis\/apps\/v1\/namespaces\/([^/]+)\/(statefulsets|deployments)\/([^/?]+)(\/scale)?$/.exec(req.url!);
    const w = m && m[1] === NS ? this.objects.get(`${m[2]}/${m[3]}`) : undefined;
    if (!m || !w) {
      this.send(res, 404, this.statusBody(404, 'NotFound', `${m?.[2] ?? 'object'} "${m?.[3] ?? req.url}" not found`));
      return;
    }
    const [, , resource, name, scale] = m;
    const meta = { name, namespace: NS, resourceVersion: String(w.resourceVersion), generation: w.generation };
    if (scale && req.method === 'PATCH') {
      const patch = recorded.body as { metadata?: { resourceVersion?: string }; spec?: { replicas?: number } };
      const rv = patch.metadata?.resourceVersion;
      if (rv !== undefined && rv !== String(w.resourceVersion)) {
        this.send(res, 409, this.statusBody(409, 'Conflict', 'the object has been modified'));
        return;
      }
      w.replicas = patch.spec!.replicas!;
      w.resourceVersion++;
      w.generation++;
    } else if (req.method !== 'GET') {
      this.send(res, 405, this.statusBody(405, 'MethodNotAllowed', 'not here'));
      return;
    }
    if (scale) {
      this.send(res, 200, {
        kind: 'Scale',
        apiVersion: 'autoscaling/v1',
        metadata: { ...meta, resourceVersion: String(w.resourceVersion) },
        spec: { replicas: w.replicas },
        status: { replicas: w.pods },
      });
      return;
    }
    // A read of the workload: the fake controller brings the pods one step closer each time, after `lag` reads.
    let observedGeneration = w.generation;
    if (w.stuck || w.lag > 0) {
      if (!w.stuck) w.lag--;
      observedGeneration = w.generation - 1;
    } else {
      w.pods = w.replicas;
      w.ready = w.replicas;
    }
    this.send(res, 200, {
      kind: resource === 'statefulsets' ? 'StatefulSet' : 'Deployment',
      apiVersion: 'apps/v1',
      metadata: meta,
      spec: { replicas: w.replicas },
      status: { replicas: w.pods, readyReplicas: w.ready, observedGeneration },
    });
  }
}

const api = new FakeApiServer();
beforeAll(() => api.start());
afterAll(() => api.stop());
afterEach(() => (api.faults = []));

function kubeConfig(): KubeConfig {
  const kc = new KubeConfig();
  kc.loadFromOptions({
    // http needs skipTLSVerify in client-node (a real API server is https).
    clusters: [{ name: 'fake', server: api.url, skipTLSVerify: true }],
    users: [{ name: 'planner', token: 'planner-token' }],
    contexts: [{ name: 'fake', cluster: 'fake', user: 'planner' }],
    currentContext: 'fake',
  });
  return kc;
}

function connect(extra: Partial<KubernetesConnectorOptions> = {}): Promise<KubernetesConnector> {
  return KubernetesConnector.connect({
    namespace: NS,
    workloads: {
      prefill: { kind: 'StatefulSet', name: 'tandem-prefill' },
      decode: { kind: 'StatefulSet', name: 'tandem-decode' },
    },
    kubeConfig: kubeConfig(),
    pollMs: 5,
    readyTimeoutMs: 2_000,
    requestTimeoutMs: 2_000,
    ...extra,
  });
}

const brief = (r: Recorded) => `${r.method} ${r.path}`;

describe('kubernetes connector against a fake Kubernetes API server (no cluster here)', () => {
  it('reads both pools, then adds a replica: GET scale, merge-PATCH with the resourceVersion, polls the StatefulSet until ready', async () => {
    api.reset({
      'statefulsets/tandem-prefill': { replicas: 2 },
      'statefulsets/tandem-decode': { replicas: 1, lag: 2 },
    });
    const k = await connect();
    expect(k.kind).toBe('kubernetes');
    expect(k.replicas()).toEqual({ prefill: 2, decode: 1 });
    expect(api.requests.map(brief)).toEqual([`GET ${STS}/tandem-prefill/scale`, `GET ${STS}/tandem-decode/scale`]);
    for (const r of api.requests) expect(r.authorization).toBe('Bearer planner-token');

    api.requests.length = 0;
    const pod = await k.addReplica('decode');
    expect(pod).toBe('tandem-decode-1');
    expect(k.replicas()).toEqual({ prefill: 2, decode: 2 });
    const [read, patch, ...polls] = api.requests;
    expect(brief(read!)).toBe(`GET ${STS}/tandem-decode/scale`);
    expect(patch).toMatchObject({
      method: 'PATCH',
      path: `${STS}/tandem-decode/scale`,
      contentType: 'application/merge-patch+json',
      body: { metadata: { resourceVersion: '100' }, spec: { replicas: 2 } },
    });
    // The fake controller lags two reads: the connector polls until the controller has seen the change.
    expect(polls.map(brief)).toEqual(Array(3).fill(`GET ${STS}/tandem-decode`));
    expect(api.objects.get('statefulsets/tandem-decode')).toMatchObject({ replicas: 2, ready: 2 });
  });

  it('removes a replica (the highest ordinal goes) and waits until its pod is gone', async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 3 }, 'statefulsets/tandem-decode': { replicas: 1 } });
    const k = await connect();
    api.requests.length = 0;
    expect(await k.removeReplica('prefill')).toBe('tandem-prefill-2');
    expect(api.requests[1]).toMatchObject({
      method: 'PATCH',
      contentType: 'application/merge-patch+json',
      body: { spec: { replicas: 2 } },
    });
    expect(k.replicas()).toEqual({ prefill: 2, decode: 1 });
  });

  it('a move is a scale-down of one pool, then a scale-up of the other, in that order', async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 3 }, 'statefulsets/tandem-decode': { replicas: 1 } });
    const k = await connect();
    api.requests.length = 0;
    expect(await k.moveReplica('prefill', 'decode')).toBe('tandem-decode-1');
    const patches = api.requests.filter((r) => r.method === 'PATCH');
    expect(patches.map((r) => [r.path, (r.body as { spec: { replicas: number } }).spec.replicas])).toEqual([
      [`${STS}/tandem-prefill/scale`, 2],
      [`${STS}/tandem-decode/scale`, 2],
    ]);
    expect(k.replicas()).toEqual({ prefill: 2, decode: 2 });
  });

  it("layouts: the graph's, for every replica the workload asks for; a re-shape is refused before any API call", async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 1 }, 'statefulsets/tandem-decode': { replicas: 2 } });
    const k = await connect({ layouts: { decode: { tp: 2, pp: 1, ep: 1 } } });
    const tp2 = { tp: 2, pp: 1, ep: 1 };
    expect(k.layouts()).toEqual({
      prefill: {
        layout: 'tp1',
        parallelism: { tp: 1, pp: 1, ep: 1 },
        replicas: [{ name: 'tandem-prefill-0', layout: 'tp1', parallelism: { tp: 1, pp: 1, ep: 1 } }],
      },
      decode: {
        layout: 'tp2',
        parallelism: tp2,
        replicas: [
          { name: 'tandem-decode-0', layout: 'tp2', parallelism: tp2 },
          { name: 'tandem-decode-1', layout: 'tp2', parallelism: tp2 },
        ],
      },
    });
    api.requests.length = 0;
    const refused = k.reshapePool('decode', { tp: 1, pp: 1, ep: 1 }, 4);
    await expect(refused).rejects.toBeInstanceOf(ReshapeUnsupportedError);
    await expect(refused).rejects.toMatchObject({
      code: 'TANDEM_RESHAPE_UNSUPPORTED',
      message:
        'the kubernetes connector does not re-shape pools: StatefulSet serving/tandem-decode runs tp2 from its pod ' +
        'template; for 4 x tp1, render and apply the graph with that layout',
    });
    expect(api.requests).toEqual([]);
    expect(k.replicas()).toEqual({ prefill: 1, decode: 2 });
  });

  it('scales Deployments through their own scale subresource', async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 1 }, 'deployments/decoders': { replicas: 1 } });
    const k = await connect({
      workloads: {
        prefill: { kind: 'StatefulSet', name: 'tandem-prefill' },
        decode: { kind: 'Deployment', name: 'decoders' },
      },
    });
    api.requests.length = 0;
    await k.addReplica('decode');
    expect(api.requests.slice(0, 3).map(brief)).toEqual([
      `GET ${DEPLOY}/decoders/scale`,
      `PATCH ${DEPLOY}/decoders/scale`,
      `GET ${DEPLOY}/decoders`,
    ]);
  });

  it('404: a workload that does not exist is a KubernetesNotFoundError naming it', async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 1 } });
    const failure = await connect().catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(KubernetesNotFoundError);
    expect(failure).toMatchObject({ code: 'TANDEM_K8S_NOT_FOUND', status: 404 });
    expect((failure as Error).message).toContain('StatefulSet serving/tandem-decode');
    expect((failure as Error).message).toContain('tandem k8s render');
  });

  it('409: a concurrent change is read again and retried; one that persists is a KubernetesConflictError', async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 1 }, 'statefulsets/tandem-decode': { replicas: 1 } });
    const k = await connect({ conflictRetries: 2 });
    // Someone else scales decode to 3 after the connector read it: the connector's patch carries the old version.
    const w = api.objects.get('statefulsets/tandem-decode')!;
    w.replicas = 3;
    w.resourceVersion++;
    api.requests.length = 0;
    api.faults = [{ status: 409, times: 1, when: (r) => r.method === 'PATCH' }];
    await k.addReplica('decode');
    // The first patch hit the injected 409; the second, after a fresh read, counts from the other change (3 -> 4).
    const patches = api.requests.filter((r) => r.method === 'PATCH').map((r) => r.body);
    expect(patches).toEqual([
      { metadata: { resourceVersion: '101' }, spec: { replicas: 4 } },
      { metadata: { resourceVersion: '101' }, spec: { replicas: 4 } },
    ]);
    expect(k.replicas().decode).toBe(4);

    api.faults = [{ status: 409, times: 10, when: (r) => r.method === 'PATCH' }];
    const failure = await k.addReplica('decode').catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(KubernetesConflictError);
    expect(failure).toMatchObject({ code: 'TANDEM_K8S_CONFLICT', status: 409 });
    expect(api.objects.get('statefulsets/tandem-decode')!.replicas).toBe(4);
  });

  it('500: a KubernetesApiError with the status and the API message; a failed scale-up of a move puts the other pool back', async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 2 }, 'statefulsets/tandem-decode': { replicas: 1 } });
    const k = await connect();
    api.faults = [{ status: 500, times: 1, when: (r) => r.method === 'PATCH' && r.path.includes('tandem-decode') }];
    const failure = await k.moveReplica('prefill', 'decode').catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(KubernetesApiError);
    expect(failure).toMatchObject({ code: 'TANDEM_K8S_API', status: 500 });
    expect((failure as Error).message).toMatch(
      /patch the scale of StatefulSet serving\/tandem-decode: HTTP 500 \(injected 500\)/,
    );
    // prefill went 2 -> 1 for the move, then back to 2 when decode could not take the replica.
    expect(api.objects.get('statefulsets/tandem-prefill')!.replicas).toBe(2);
    expect(api.objects.get('statefulsets/tandem-decode')!.replicas).toBe(1);
    expect(k.replicas()).toEqual({ prefill: 2, decode: 1 });
  });

  it('timeouts: an API call with no answer, and pods that never become ready, are KubernetesTimeoutErrors', async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 1 }, 'statefulsets/tandem-decode': { replicas: 1 } });
    const k = await connect({ requestTimeoutMs: 200, readyTimeoutMs: 300 });
    api.faults = [{ hang: true, when: (r) => r.method === 'PATCH' }];
    const hung = await k.addReplica('prefill').catch((e: unknown) => e);
    expect(hung).toBeInstanceOf(KubernetesTimeoutError);
    expect((hung as Error).message).toContain('no answer within 200 ms');
    api.faults = [];

    api.objects.get('statefulsets/tandem-prefill')!.stuck = true;
    const notReady = await k.addReplica('prefill').catch((e: unknown) => e);
    expect(notReady).toBeInstanceOf(KubernetesTimeoutError);
    expect(notReady).toMatchObject({ code: 'TANDEM_K8S_TIMEOUT' });
    expect((notReady as Error).message).toMatch(/did not reach 2 ready replicas within 300 ms/);
    // The new count stays (a pod may still be pulling its image): the planner counts from it.
    expect(k.replicas().prefill).toBe(2);
  });

  it('never removes or moves the last replica of a pool (no PATCH sent)', async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 1 }, 'statefulsets/tandem-decode': { replicas: 1 } });
    const k = await connect();
    api.requests.length = 0;
    await expect(k.removeReplica('decode')).rejects.toBeInstanceOf(PlannerActionError);
    await expect(k.moveReplica('prefill', 'decode')).rejects.toBeInstanceOf(PlannerActionError);
    expect(api.requests.filter((r) => r.method === 'PATCH')).toEqual([]);
  });

  it('refresh() sees a change made by someone else', async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 1 }, 'statefulsets/tandem-decode': { replicas: 1 } });
    const k = await connect();
    api.objects.get('statefulsets/tandem-prefill')!.replicas = 4;
    expect(k.replicas().prefill).toBe(1);
    await k.refresh();
    expect(k.replicas().prefill).toBe(4);
  });

  it("the graph's planner.kubernetes section names the workloads: <name>-<pool> in its namespace", async () => {
    const graph = parseGraph(`model: dummy:tiny
pools:
  - {name: pf, role: prefill, device: cpu}
  - {name: dc, role: decode, device: cpu}
planner: {mode: load, ttftMs: 1, itlMs: 1, connector: kubernetes, kubernetes: {name: llm, namespace: serving, readyTimeoutS: 2}}
`);
    const options = kubernetesConnectorOptions(graph.planner.kubernetes!, { prefill: 'pf', decode: 'dc' });
    expect(options).toEqual({
      namespace: 'serving',
      workloads: { prefill: { kind: 'StatefulSet', name: 'llm-pf' }, decode: { kind: 'StatefulSet', name: 'llm-dc' } },
      readyTimeoutMs: 2000,
    });
    api.reset({ 'statefulsets/llm-pf': { replicas: 2 }, 'statefulsets/llm-dc': { replicas: 3 } });
    const k = await KubernetesConnector.connect({ ...options, kubeConfig: kubeConfig() });
    expect(k.replicas()).toEqual({ prefill: 2, decode: 3 });
    expect(api.requests.map(brief)).toEqual([`GET ${STS}/llm-pf/scale`, `GET ${STS}/llm-dc/scale`]);
  });

  it("without a namespace, the kubeconfig context's namespace is used", async () => {
    api.reset({ 'statefulsets/tandem-prefill': { replicas: 1 }, 'statefulsets/tandem-decode': { replicas: 1 } });
    const kc = new KubeConfig();
    kc.loadFromOptions({
      clusters: [{ name: 'fake', server: api.url, skipTLSVerify: true }],
      users: [{ name: 'planner', token: 't' }],
      contexts: [{ name: 'fake', cluster: 'fake', user: 'planner', namespace: NS }],
      currentContext: 'fake',
    });
    const k = await KubernetesConnector.connect({
      workloads: {
        prefill: { kind: 'StatefulSet', name: 'tandem-prefill' },
        decode: { kind: 'StatefulSet', name: 'tandem-decode' },
      },
      kubeConfig: kc,
    });
    expect(k.replicas()).toEqual({ prefill: 1, decode: 1 });
    expect(api.requests[0]!.path).toBe(`${STS}/tandem-prefill/scale`);
  });
});
