/**
 * The kubernetes connector: the planner acts on the pools' workloads through the Kubernetes API (the official
 * `@kubernetes/client-node`). Each pool is one workload, as `tandem k8s render` writes it: the StatefulSet
 * `<name>-<pool>` (a Deployment works too); the connector changes its `scale` subresource only.
 *
 * - add: read the pool's scale, patch `spec.replicas` one up (a JSON merge patch carrying the resourceVersion it
 *   read, so a concurrent change, an HPA or a person, is a 409 and not overwritten: the connector reads again
 *   and retries, `conflictRetries` times), then wait until the workload reports that many ready replicas;
 * - remove: the same, one down, then wait until the workload has that many pods. The StatefulSet controller
 *   deletes the highest ordinal; its worker gets SIGTERM and drains: frontends choose it no more, its requests
 *   in flight finish (up to its drain timeout, 30 s, within the pod's terminationGracePeriodSeconds), then it
 *   leaves etcd and exits; requests still running then migrate to other workers (lib/frontend/migration.ts);
 * - move: on Kubernetes a worker cannot change role in place (its pod belongs to its pool's workload), so a
 *   role switch is a scale-down of one pool and a scale-up of the other, in that order: the GPU the first frees
 *   is what the second's pod schedules on. When the scale-up is refused, the connector puts the first pool back
 *   (best effort) and reports the error.
 * - re-shape: not supported (ReshapeUnsupportedError, before any API call): a pool's pods come from its workload's
 *   one pod template, whose layout `tandem k8s render` wrote; running another layout is a new workload, which is
 *   a deployment's business, not a scaling connector's. `layouts()` reports each pool's layout as the graph gives
 *   it, for every replica the workload asks for.
 * Every API call is bounded by `requestTimeoutMs`, every wait for the pods by `readyTimeoutMs`; a failure is a
 * KubernetesApiError (404: KubernetesNotFoundError, 409 after the retries: KubernetesConflictError, no answer or
 * pods not ready in time: KubernetesTimeoutError). A readiness timeout leaves the new replica count in place (a
 * pod may still be pulling its image); `replicas()` then says what the workload asks for, so the planner counts
 * from there. The last replica of a pool is never removed or moved.
 */
import {
  ApiException,
  AppsV1Api,
  KubeConfig,
  Observable,
  PatchStrategy,
  type ConfigurationOptions,
  type RequestContext,
  type ResponseContext,
  type V1Deployment,
  type V1Scale,
  type V1StatefulSet,
} from '@kubernetes/client-node';
import { BadArgumentError, TandemError } from '../../errors.js';
import { ReshapeUnsupportedError } from '../errors.js';
import type { Pool } from '../load-correction.js';
import { layoutName, type Parallelism } from '../profile.js';
import type { KubernetesPlannerSpec } from '../spec.js';
import { poolLayout, replicaLayout, type PlannerConnector, type PoolLayout } from './index.js';
import { PlannerActionError } from './local.js';

export const WORKLOAD_KINDS = ['StatefulSet', 'Deployment'] as const;
export type WorkloadKind = (typeof WORKLOAD_KINDS)[number];
/** Default bound on the wait for a scaled workload's pods (a GPU pod loads its model first). */
export const DEFAULT_READY_TIMEOUT_MS = 600_000;
/** Default bound on one API call. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
/** Default time between two reads of a workload's status while waiting for its pods. */
export const DEFAULT_POLL_MS = 2_000;
/** Default number of fresh read-and-patch attempts after a 409. */
export const DEFAULT_CONFLICT_RETRIES = 3;

/** A pool's workload. */
export interface PoolWorkload {
  kind: WorkloadKind;
  name: string;
}

/** A Kubernetes API call failed; `status` is the HTTP status (undefined: no answer). The pools are as they were unless the message says otherwise. */
export class KubernetesApiError extends TandemError {
  constructor(
    message: string,
    readonly status?: number,
    code = 'TANDEM_K8S_API',
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

/** The workload (or namespace) does not exist: the graph's planner names a workload `tandem k8s render` did not write. */
export class KubernetesNotFoundError extends KubernetesApiError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 404, 'TANDEM_K8S_NOT_FOUND', options);
  }
}

/** The workload's scale changed under the connector every time it tried (409 Conflict after the retries). */
export class KubernetesConflictError extends KubernetesApiError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 409, 'TANDEM_K8S_CONFLICT', options);
  }
}

/** An API call got no answer in time, or the workload's pods were not ready (or not gone) in time. */
export class KubernetesTimeoutError extends KubernetesApiError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, undefined, 'TANDEM_K8S_TIMEOUT', options);
  }
}

export interface KubernetesConnectorOptions {
  /** Default: the kubeconfig context's namespace (in a pod, its own), else `default`. */
  namespace?: string;
  workloads: Record<Pool, PoolWorkload>;
  /** The layout each pool's pod template runs (the graph's). Default tp 1, pp 1, ep 1. */
  layouts?: Partial<Record<Pool, Parallelism>>;
  /** Credentials and API server. Default: `kubeconfig` loaded, else the pod's service account, $KUBECONFIG or ~/.kube/config. */
  kubeConfig?: KubeConfig;
  /** A kubeconfig file to load (ignored when `kubeConfig` is given). */
  kubeconfig?: string;
  readyTimeoutMs?: number;
  requestTimeoutMs?: number;
  pollMs?: number;
  conflictRetries?: number;
  log?: (line: string) => void;
}

/**
 * The connector's options from the graph's `planner.kubernetes` section: pool P's workload is `<name>-<P's pool
 * name>`, as `tandem k8s render --name <name>` writes it.
 */
export function kubernetesConnectorOptions(
  spec: KubernetesPlannerSpec,
  poolNames: Record<Pool, string>,
  layouts?: Partial<Record<Pool, Parallelism>>,
): KubernetesConnectorOptions {
  const workload = (pool: Pool): PoolWorkload => ({ kind: spec.workloadKind, name: `${spec.name}-${poolNames[pool]}` });
  return {
    ...(spec.namespace !== undefined ? { namespace: spec.namespace } : {}),
    ...(spec.kubeconfig !== undefined ? { kubeconfig: spec.kubeconfig } : {}),
    workloads: { prefill: workload('prefill'), decode: workload('decode') },
    ...(layouts ? { layouts } : {}),
    readyTimeoutMs: spec.readyTimeoutS * 1000,
  };
}

/** The client's options for one call: a deadline on the request, and the patch's content type. */
function callOptions(timeoutMs: number, contentType?: string): ConfigurationOptions {
  return {
    middleware: [
      {
        pre: (context: RequestContext) => {
          context.setSignal(AbortSignal.timeout(timeoutMs));
          if (contentType) context.setHeaderParam('Content-Type', contentType);
          return new Observable(Promise.resolve(context));
        },
        post: (response: ResponseContext) => new Observable(Promise.resolve(response)),
      },
    ],
    middlewareMergeStrategy: 'append',
  };
}

interface WorkloadStatus {
  /** The replicas the workload asks for. */
  spec: number;
  /** Pods it has (ready or not, terminating ones included). */
  pods: number;
  ready: number;
  /** The controller has seen the latest spec. */
  observed: boolean;
}

export class KubernetesConnector implements PlannerConnector {
  readonly kind = 'kubernetes';
  private readonly api: AppsV1Api;
  private readonly namespace: string;
  private readonly workloads: Record<Pool, PoolWorkload>;
  private readonly readyTimeoutMs: number;
  private readonly requestTimeoutMs: number;
  private readonly pollMs: number;
  private readonly conflictRetries: number;
  private readonly log: (line: string) => void;
  private readonly current: Record<Pool, number> = { prefill: 0, decode: 0 };
  private readonly layoutOf: Record<Pool, Parallelism>;

  private constructor(options: KubernetesConnectorOptions) {
    let kc = options.kubeConfig;
    if (!kc) {
      kc = new KubeConfig();
      try {
        if (options.kubeconfig !== undefined) kc.loadFromFile(options.kubeconfig);
        else kc.loadFromDefault();
      } catch (error) {
        throw new BadArgumentError(
          `cannot load the kubeconfig ${options.kubeconfig ?? '(default)'}: ${(error as Error).message}`,
        );
      }
    }
    const { workloads } = options;
    const namespace = options.namespace ?? kc.getContextObject(kc.getCurrentContext())?.namespace ?? 'default';
    if (!/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(namespace) || namespace.length > 63)
      throw new BadArgumentError(`namespace '${namespace}' is not a Kubernetes namespace name`);
    for (const pool of ['prefill', 'decode'] as const) {
      const w = workloads[pool];
      if (!w || !WORKLOAD_KINDS.includes(w.kind) || !w.name)
        throw new BadArgumentError(`the ${pool} pool needs a workload (kind ${WORKLOAD_KINDS.join(' or ')}, name)`);
    }
    const positive = (name: string, v: number | undefined, fallback: number) => {
      const value = v ?? fallback;
      if (!(value > 0 && Number.isFinite(value)))
        throw new BadArgumentError(`${name} must be a positive number (got ${String(v)})`);
      return value;
    };
    this.namespace = namespace;
    this.workloads = { prefill: { ...workloads.prefill }, decode: { ...workloads.decode } };
    this.readyTimeoutMs = positive('readyTimeoutMs', options.readyTimeoutMs, DEFAULT_READY_TIMEOUT_MS);
    this.requestTimeoutMs = positive('requestTimeoutMs', options.requestTimeoutMs, DEFAULT_REQUEST_TIMEOUT_MS);
    this.pollMs = positive('pollMs', options.pollMs, DEFAULT_POLL_MS);
    this.conflictRetries = options.conflictRetries ?? DEFAULT_CONFLICT_RETRIES;
    if (!Number.isSafeInteger(this.conflictRetries) || this.conflictRetries < 0)
      throw new BadArgumentError(`conflictRetries must be an integer >= 0 (got ${String(options.conflictRetries)})`);
    this.log = options.log ?? (() => {});
    const single = { tp: 1, pp: 1, ep: 1 };
    this.layoutOf = { prefill: options.layouts?.prefill ?? single, decode: options.layouts?.decode ?? single };
    this.api = kc.makeApiClient(AppsV1Api);
  }

  /** A connector that has read both pools' replica counts (so `replicas()` is true from the start). */
  static async connect(options: KubernetesConnectorOptions): Promise<KubernetesConnector> {
    const connector = new KubernetesConnector(options);
    await connector.refresh();
    return connector;
  }

  /** Replicas each pool's workload asks for, as last read or set. */
  replicas(): Record<Pool, number> {
    return { ...this.current };
  }

  /** Reads both pools' scales again (someone else may have changed them). */
  async refresh(): Promise<void> {
    for (const pool of ['prefill', 'decode'] as const)
      this.current[pool] = (await this.readScale(pool)).spec?.replicas ?? 0;
  }

  /** Each pool's template layout, for every replica its workload asks for. */
  layouts(): Record<Pool, PoolLayout> {
    const of = (pool: Pool) =>
      poolLayout(
        Array.from({ length: this.current[pool] }, (_, i) => replicaLayout(this.podName(pool, i), this.layoutOf[pool])),
      );
    return { prefill: of('prefill'), decode: of('decode') };
  }

  /** Not supported: see the module comment. */
  reshapePool(pool: Pool, parallelism: Parallelism, replicas: number): Promise<string[]> {
    return Promise.reject(
      new ReshapeUnsupportedError(
        `the kubernetes connector does not re-shape pools: ${this.describe(pool)} runs ${layoutName(this.layoutOf[pool])} ` +
          `from its pod template; for ${replicas} x ${layoutName(parallelism)}, render and apply the graph with that layout`,
      ),
    );
  }

  async addReplica(pool: Pool): Promise<string> {
    const target = await this.scaleBy(pool, +1);
    await this.waitFor(pool, target, (s) => s.observed && s.ready >= target, `${target} ready replicas`);
    return this.podName(pool, target - 1);
  }

  async removeReplica(pool: Pool): Promise<string> {
    const target = await this.scaleBy(pool, -1);
    await this.waitFor(pool, target, (s) => s.observed && s.pods <= target, `at most ${target} pods`);
    return this.podName(pool, target);
  }

  async moveReplica(from: Pool, to: Pool): Promise<string> {
    if (from === to) throw new PlannerActionError(`cannot move a replica from ${from} to itself`);
    const removed = await this.removeReplica(from);
    let target: number;
    try {
      target = await this.scaleBy(to, +1);
    } catch (error) {
      this.log(`scaling ${this.describe(to)} up failed; scaling ${this.describe(from)} back up`);
      await this.scaleBy(from, +1).catch((restore: unknown) =>
        this.log(`could not scale ${this.describe(from)} back up: ${(restore as Error).message}`),
      );
      throw error;
    }
    await this.waitFor(to, target, (s) => s.observed && s.ready >= target, `${target} ready replicas`);
    this.log(`${removed} left ${from}; ${this.podName(to, target - 1)} serves ${to} in its place`);
    return this.podName(to, target - 1);
  }

  private describe(pool: Pool): string {
    const w = this.workloads[pool];
    return `${w.kind} ${this.namespace}/${w.name}`;
  }

  /** A StatefulSet's pods are `<name>-<ordinal>`; a Deployment's have random names. */
  private podName(pool: Pool, ordinal: number): string {
    const w = this.workloads[pool];
    return w.kind === 'StatefulSet' ? `${w.name}-${ordinal}` : `${w.name} (replica ${ordinal + 1})`;
  }

  /** Patches the pool's replicas by `delta` against the resourceVersion it read; returns the new count. */
  private async scaleBy(pool: Pool, delta: 1 | -1): Promise<number> {
    for (let attempt = 0; ; attempt++) {
      const scale = await this.readScale(pool);
      const replicas = scale.spec?.replicas ?? 0;
      this.current[pool] = replicas;
      if (delta < 0 && replicas <= 1)
        throw new PlannerActionError(`cannot remove a replica of ${pool}: ${this.describe(pool)} has ${replicas}`);
      const target = replicas + delta;
      const body = { metadata: { resourceVersion: scale.metadata?.resourceVersion }, spec: { replicas: target } };
      try {
        await this.call(
          pool,
          'patch the scale of',
          (options) => {
            const w = this.workloads[pool];
            const param = { name: w.name, namespace: this.namespace, body };
            return w.kind === 'StatefulSet'
              ? this.api.patchNamespacedStatefulSetScale(param, options)
              : this.api.patchNamespacedDeploymentScale(param, options);
          },
          PatchStrategy.MergePatch,
        );
      } catch (error) {
        if (error instanceof KubernetesConflictError && attempt < this.conflictRetries) {
          this.log(`${this.describe(pool)} changed while it was scaled (409): reading it again`);
          continue;
        }
        throw error;
      }
      this.current[pool] = target;
      this.log(`${this.describe(pool)}: replicas ${replicas} -> ${target}`);
      return target;
    }
  }

  private readScale(pool: Pool): Promise<V1Scale> {
    return this.call(pool, 'read the scale of', (options) => {
      const w = this.workloads[pool];
      const param = { name: w.name, namespace: this.namespace };
      return w.kind === 'StatefulSet'
        ? this.api.readNamespacedStatefulSetScale(param, options)
        : this.api.readNamespacedDeploymentScale(param, options);
    });
  }

  private async readStatus(pool: Pool): Promise<WorkloadStatus> {
    const w = this.workloads[pool];
    const param = { name: w.name, namespace: this.namespace };
    const object = await this.call<V1StatefulSet | V1Deployment>(pool, 'read', (options) =>
      w.kind === 'StatefulSet'
        ? this.api.readNamespacedStatefulSet(param, options)
        : this.api.readNamespacedDeployment(param, options),
    );
    const status = object.status;
    return {
      spec: object.spec?.replicas ?? 0,
      pods: status?.replicas ?? 0,
      ready: status?.readyReplicas ?? 0,
      observed: (status?.observedGeneration ?? 0) >= (object.metadata?.generation ?? 0),
    };
  }

  /** Polls the workload until `done`; a KubernetesTimeoutError after readyTimeoutMs. */
  private async waitFor(pool: Pool, target: number, done: (s: WorkloadStatus) => boolean, what: string): Promise<void> {
    const deadline = performance.now() + this.readyTimeoutMs;
    for (;;) {
      const s = await this.readStatus(pool);
      if (done(s)) return;
      if (performance.now() + this.pollMs > deadline)
        throw new KubernetesTimeoutError(
          `${this.describe(pool)} did not reach ${what} within ${this.readyTimeoutMs} ms ` +
            `(asks for ${s.spec}, has ${s.pods} pods, ${s.ready} ready); its replicas stay at ${target}`,
        );
      await new Promise((r) => setTimeout(r, this.pollMs));
    }
  }

  /** One API call, its failures typed. */
  private async call<T>(
    pool: Pool,
    what: string,
    request: (options: ConfigurationOptions) => Promise<T>,
    contentType?: string,
  ): Promise<T> {
    const target = this.describe(pool);
    try {
      return await request(callOptions(this.requestTimeoutMs, contentType));
    } catch (error) {
      if (error instanceof ApiException) {
        const code = (error as ApiException<unknown>).code;
        const detail = apiMessage((error as ApiException<unknown>).body);
        const message = `could not ${what} ${target}: HTTP ${code}${detail ? ` (${detail})` : ''}`;
        if (code === 404)
          throw new KubernetesNotFoundError(
            `${message}; is it deployed (tandem k8s render), and do the graph's planner.kubernetes name and namespace match it?`,
            { cause: error },
          );
        if (code === 409) throw new KubernetesConflictError(message, { cause: error });
        throw new KubernetesApiError(message, code, undefined, { cause: error });
      }
      const e = error as Error & { type?: string };
      if (e?.name === 'AbortError' || e?.type === 'aborted' || e?.name === 'TimeoutError')
        throw new KubernetesTimeoutError(`could not ${what} ${target}: no answer within ${this.requestTimeoutMs} ms`, {
          cause: error,
        });
      throw new KubernetesApiError(
        `could not ${what} ${target}: ${e?.message ?? String(error)}`,
        undefined,
        undefined,
        {
          cause: error,
        },
      );
    }
  }
}

/** The `message` of a Kubernetes Status body, when the body is one. */
function apiMessage(body: unknown): string | undefined {
  if (typeof body === 'string') {
    try {
      return apiMessage(JSON.parse(body));
    } catch {
      return body.slice(0, 200) || undefined;
    }
  }
  const m = (body as { message?: unknown } | undefined)?.message;
  return typeof m === 'string' ? m : undefined;
}
