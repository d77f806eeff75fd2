/**
 * Kubernetes manifests for a deployment graph (`tandem k8s render -f graph.yaml`). What a graph becomes:
 *
 *   ConfigMap <name>-graph          the graph as the pods read it (/etc/tandem/graph.yaml)
 *   ServiceAccount, Role, RoleBinding <name>-planner
 *                                   only when the graph's planner uses the kubernetes connector: it may read the
 *                                   two pools' StatefulSets and read and patch their `scale`, nothing else; the
 *                                   frontend (where the planner runs) runs under it. Otherwise, and for workers,
 *                                   no pod mounts an account token at all
 *   StatefulSet + Service <name>-etcd  the control plane's etcd (one member), unless --etcd names one
 *   Deployment + Service <name>-frontend  the OpenAI API (port from the graph), probes on /live and /health
 *   StatefulSet + headless Service <name>-<pool>  per pool: replicas and GPUs (nvidia.com/gpu) from the graph;
 *                                   stable names <name>-<pool>-<i>.<name>-<pool> for the planes between workers
 *
 * Every pod gets the shared token from the Secret `--token-secret` (key `token`) as TANDEM_TOKEN: the request
 * and control planes bind beyond loopback in a pod, and then they require it. The Secret itself is not
 * rendered; a token does not belong in files that get committed (see README). A pool is one StatefulSet
 * however many GPUs a replica has: a replica spanning nodes (LeaderWorkerSet) is not rendered.
 */
import type { IConfigMap } from 'kubernetes-models/v1/ConfigMap';
import type { IService } from 'kubernetes-models/v1/Service';
import type { IServiceAccount } from 'kubernetes-models/v1/ServiceAccount';
import type { IContainer } from 'kubernetes-models/v1/Container';
import type { IEnvVar } from 'kubernetes-models/v1/EnvVar';
import type { IPodSpec } from 'kubernetes-models/v1/PodSpec';
import type { IDeployment } from 'kubernetes-models/apps/v1/Deployment';
import type { IStatefulSet } from 'kubernetes-models/apps/v1/StatefulSet';
import type { IRole } from 'kubernetes-models/rbac.authorization.k8s.io/v1/Role';
import type { IRoleBinding } from 'kubernetes-models/rbac.authorization.k8s.io/v1/RoleBinding';
import { stringify } from 'yaml';
import { TandemError } from '../../errors.js';
import { DUMMY_PREFIX } from '../../engine/model/dummy.js';
import type { DeploymentGraph, PoolSpec } from '../graph.js';
import { DEFAULT_DRAIN_TIMEOUT_MS } from '../../worker/protocol.js';
import { DEFAULT_K8S_WORKLOAD_PREFIX } from '../../planner/spec.js';

export const DEFAULT_DEPLOYMENT_NAME = 'tandem';
export const DEFAULT_K8S_NAMESPACE = 'default';
export const DEFAULT_IMAGE = 'tandem:latest';
export const DEFAULT_ETCD_IMAGE = 'quay.io/coreos/etcd:v3.5.17';
export const DEFAULT_TOKEN_SECRET = 'tandem-token';
/** Where the pods find the graph (the ConfigMap's mount). */
export const GRAPH_MOUNT_DIR = '/etc/tandem';
export const GRAPH_FILE = 'graph.yaml';
export const ETCD_CLIENT_PORT = 2379;
export const ETCD_PEER_PORT = 2380;
/**
 * A worker pod's ports: `status` answers /live and /health, `requests` is the request plane (frontend to
 * worker) and `kv` the KV transfer agent's listener (tcp backend). Fixed in the pod, so they need no discovery.
 */
export const WORKER_PORTS = { status: 9100, requests: 9200, kv: 9300 } as const;

/** A worker pod's drain on SIGTERM (`tandem worker --drain-timeout`): its requests in flight finish meanwhile. */
export const WORKER_DRAIN_TIMEOUT_S = DEFAULT_DRAIN_TIMEOUT_MS / 1000;
/**
 * A worker pod's terminationGracePeriodSeconds: its drain, then leaving etcd and freeing the engine (bounded at 5 s
 * in the worker), with room to spare; were it shorter, the kubelet's SIGKILL would cut the drain short.
 */
export const WORKER_TERMINATION_GRACE_S = WORKER_DRAIN_TIMEOUT_S + 15;

/** The graph cannot be rendered for Kubernetes (a name Kubernetes refuses, a port it cannot expose, ...). */
export class K8sRenderError extends TandemError {
  constructor(message: string) {
    super('TANDEM_K8S_RENDER', message);
  }
}

export interface K8sRenderOptions {
  /** Prefix of every object's name and the control plane's etcd namespace. Default `tandem`. */
  name?: string;
  /** Kubernetes namespace of every object. Default `default`. */
  namespace?: string;
  /** Image of the frontend and worker containers (Tandem and the model). Default `tandem:latest`. */
  image?: string;
  /** An etcd already running (`etcd://HOST:PORT`): no etcd is rendered. */
  etcd?: string;
  /** Image of the rendered etcd. */
  etcdImage?: string;
  /** Secret holding the shared token under key `token` (and the API key under `api-key` when the graph names one). */
  tokenSecret?: string;
}

export type K8sObject = IConfigMap | IService | IServiceAccount | IDeployment | IStatefulSet | IRole | IRoleBinding;

/** One output file: its objects, in the order `kubectl apply` should see them. */
export interface K8sManifestFile {
  file: string;
  objects: K8sObject[];
}

export interface K8sRendering {
  files: K8sManifestFile[];
  /** Things the reader must do or know (the model must be in the image, gpuIds are not used, ...). */
  notes: string[];
}

/** A DNS-1123 label, as Kubernetes wants names of Services and the pods' hostnames. */
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
/** A StatefulSet's name goes into its pods' controller-revision-hash label with an 11-character suffix. */
const MAX_WORKLOAD_NAME = 52;

function checkName(what: string, name: string, max = 63): void {
  if (!DNS_LABEL.test(name) || name.length > max)
    throw new K8sRenderError(
      `${what} '${name}' is not a Kubernetes name: at most ${max} lower-case letters, digits and '-', starting and ending with a letter or digit`,
    );
}

export function renderKubernetes(graph: DeploymentGraph, options: K8sRenderOptions = {}): K8sRendering {
  const name = options.name ?? DEFAULT_DEPLOYMENT_NAME;
  const namespace = options.namespace ?? DEFAULT_K8S_NAMESPACE;
  const image = options.image ?? DEFAULT_IMAGE;
  const tokenSecret = options.tokenSecret ?? DEFAULT_TOKEN_SECRET;
  checkName('--name', name, MAX_WORKLOAD_NAME - 'frontend'.length - 1);
  checkName('--namespace', namespace);
  checkName('--token-secret', tokenSecret, 253);
  if (image.trim() === '' || /\s/.test(image)) throw new K8sRenderError(`--image '${image}' is not an image reference`);
  graph.pools.forEach((pool, i) => {
    const full = `${name}-${pool.name}`;
    if (!DNS_LABEL.test(pool.name) || full.length > MAX_WORKLOAD_NAME)
      throw new K8sRenderError(
        `pools[${i}].name '${pool.name}': a pool becomes the StatefulSet '${full}', so its name must be lower-case letters, digits and '-' (starting and ending with a letter or digit) and '${name}-<pool>' at most ${MAX_WORKLOAD_NAME} characters`,
      );
  });
  const port = graph.frontend.port;
  if (port === 0)
    throw new K8sRenderError('frontend.port is 0 (any free port); a Service needs a fixed port: set frontend.port');

  const notes: string[] = [];
  if (!graph.model.startsWith(DUMMY_PREFIX))
    notes.push(`the pods load the model from ${graph.model}: put it there in the image, or mount a volume there`);
  if (graph.pools.some((p) => p.gpuIds !== undefined))
    notes.push('gpuIds are not used on Kubernetes: the device plugin gives each pod its GPUs');

  const planner = graph.planner;
  const plannerScales = planner.mode !== 'off' && planner.connector === 'kubernetes';
  if (plannerScales) {
    const k = planner.kubernetes!;
    // The connector finds its workloads by these: they must be what is rendered.
    if (k.name !== DEFAULT_K8S_WORKLOAD_PREFIX && k.name !== name)
      throw new K8sRenderError(
        `planner.kubernetes.name '${k.name}' names workloads other than those rendered (--name '${name}'): leave it out or make them equal`,
      );
    if (k.namespace !== undefined && k.namespace !== namespace)
      throw new K8sRenderError(
        `planner.kubernetes.namespace '${k.namespace}' is not the namespace rendered into (--namespace '${namespace}')`,
      );
    if (k.workloadKind !== 'StatefulSet')
      throw new K8sRenderError(
        `planner.kubernetes.workloadKind ${k.workloadKind}: tandem k8s render writes each pool as a StatefulSet`,
      );
    if (k.kubeconfig !== undefined)
      notes.push('planner.kubernetes.kubeconfig is not used in the pods: the planner uses its service account');
  }

  const etcdEndpoint = options.etcd ?? `etcd://${name}-etcd.${namespace}.svc:${ETCD_CLIENT_PORT}`;
  const common = { name, namespace, image, tokenSecret, etcdEndpoint, graph, plannerScales };
  const files: K8sManifestFile[] = [{ file: '00-graph.yaml', objects: [graphConfigMap(common)] }];
  if (plannerScales) files.push({ file: '01-planner-rbac.yaml', objects: plannerRbac(common) });
  if (options.etcd === undefined)
    files.push({ file: '02-etcd.yaml', objects: etcd(common, options.etcdImage ?? DEFAULT_ETCD_IMAGE) });
  files.push({ file: '10-frontend.yaml', objects: frontend(common) });
  for (const pool of graph.pools)
    files.push({ file: `20-pool-${pool.name}.yaml`, objects: poolWorkload(common, pool) });
  return { files, notes };
}

/** The files' objects as one multi-document YAML stream (what `kubectl apply -f -` reads). */
export function manifestsToYaml(objects: readonly K8sObject[]): string {
  return objects.map((o) => stringify(o, { lineWidth: 0, aliasDuplicateObjects: false })).join('---\n');
}

// ---- the objects -------------------------------------------------------------------------------------------

interface Common {
  name: string;
  namespace: string;
  image: string;
  tokenSecret: string;
  etcdEndpoint: string;
  graph: DeploymentGraph;
  /** The graph's planner scales the pools through the Kubernetes API (connector kubernetes). */
  plannerScales: boolean;
}

function labels(c: Common, component: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    'app.kubernetes.io/name': 'tandem',
    'app.kubernetes.io/instance': c.name,
    'app.kubernetes.io/component': component,
    ...extra,
  };
}

function meta(c: Common, objectName: string, objectLabels: Record<string, string>) {
  return { name: objectName, namespace: c.namespace, labels: objectLabels };
}

/**
 * The graph the pods read: as loaded (defaults filled), frontend on all interfaces, no host GPU indices; a
 * kubernetes planner's section names the rendered workloads and namespace, and no kubeconfig (it uses its
 * service account).
 */
function graphConfigMap(c: Common): IConfigMap {
  const planner = c.graph.planner;
  const podGraph = {
    ...c.graph,
    frontend: { ...c.graph.frontend, host: '0.0.0.0' },
    pools: c.graph.pools.map(({ gpuIds: _gpuIds, ...pool }) => pool),
    ...(planner.kubernetes
      ? {
          planner: {
            ...planner,
            kubernetes: { ...omitKey(planner.kubernetes, 'kubeconfig'), name: c.name, namespace: c.namespace },
          },
        }
      : {}),
  };
  return {
    apiVersion: 'v1',
    kind: 'ConfigMap',
    metadata: meta(c, `${c.name}-graph`, labels(c, 'config')),
    data: { [GRAPH_FILE]: stringify(podGraph, { lineWidth: 0, aliasDuplicateObjects: false }) },
  };
}

function omitKey<T extends object, K extends keyof T>(o: T, key: K): Omit<T, K> {
  const { [key]: _omitted, ...rest } = o;
  return rest;
}

/**
 * What the kubernetes connector (lib/planner/connectors/kubernetes.ts) calls, and nothing more: GET of the two
 * pools' StatefulSets (their status: ready replicas), GET and PATCH of their `scale` subresource.
 */
function plannerRbac(c: Common): K8sObject[] {
  const account = `${c.name}-planner`;
  const l = labels(c, 'planner');
  const workloads = (['prefill', 'decode'] as const).map(
    (role) => `${c.name}-${c.graph.pools.find((p) => p.role === role)!.name}`,
  );
  return [
    { apiVersion: 'v1', kind: 'ServiceAccount', metadata: meta(c, account, l) },
    {
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'Role',
      metadata: meta(c, account, l),
      rules: [
        { apiGroups: ['apps'], resources: ['statefulsets'], resourceNames: workloads, verbs: ['get'] },
        { apiGroups: ['apps'], resources: ['statefulsets/scale'], resourceNames: workloads, verbs: ['get', 'patch'] },
      ],
    },
    {
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'RoleBinding',
      metadata: meta(c, account, l),
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: account },
      subjects: [{ kind: 'ServiceAccount', name: account, namespace: c.namespace }],
    },
  ];
}

function etcd(c: Common, etcdImage: string): K8sObject[] {
  const svc = `${c.name}-etcd`;
  const l = labels(c, 'etcd');
  const peer = `http://$(POD_NAME).${svc}:${ETCD_PEER_PORT}`;
  return [
    {
      apiVersion: 'v1',
      kind: 'Service',
      metadata: meta(c, svc, l),
      spec: {
        clusterIP: 'None',
        // etcd must be reachable while it starts, before it reports ready
        publishNotReadyAddresses: true,
        selector: l,
        ports: [
          { name: 'client', port: ETCD_CLIENT_PORT, targetPort: 'client' },
          { name: 'peer', port: ETCD_PEER_PORT, targetPort: 'peer' },
        ],
      },
    },
    {
      apiVersion: 'apps/v1',
      kind: 'StatefulSet',
      metadata: meta(c, svc, l),
      spec: {
        serviceName: svc,
        replicas: 1,
        selector: { matchLabels: l },
        template: {
          metadata: { labels: l },
          spec: {
            automountServiceAccountToken: false,
            containers: [
              {
                name: 'etcd',
                image: etcdImage,
                command: ['etcd'],
                args: [
                  '--name=$(POD_NAME)',
                  '--data-dir=/var/lib/etcd',
                  `--listen-client-urls=http://0.0.0.0:${ETCD_CLIENT_PORT}`,
                  `--advertise-client-urls=http://$(POD_NAME).${svc}:${ETCD_CLIENT_PORT}`,
                  `--listen-peer-urls=http://0.0.0.0:${ETCD_PEER_PORT}`,
                  `--initial-advertise-peer-urls=${peer}`,
                  `--initial-cluster=$(POD_NAME)=${peer}`,
                  '--initial-cluster-state=new',
                ],
                env: [{ name: 'POD_NAME', valueFrom: { fieldRef: { fieldPath: 'metadata.name' } } }],
                ports: [
                  { name: 'client', containerPort: ETCD_CLIENT_PORT },
                  { name: 'peer', containerPort: ETCD_PEER_PORT },
                ],
                readinessProbe: { httpGet: { path: '/health', port: 'client' }, periodSeconds: 5 },
                livenessProbe: { httpGet: { path: '/health', port: 'client' }, periodSeconds: 10, failureThreshold: 6 },
                // Discovery only: the workers register again when an etcd comes back empty.
                volumeMounts: [{ name: 'data', mountPath: '/var/lib/etcd' }],
              },
            ],
            volumes: [{ name: 'data', emptyDir: {} }],
          },
        },
      },
    },
  ];
}

/** Environment every Tandem pod gets: who it is, where the control plane is, and the shared token. */
function tandemEnv(c: Common): IEnvVar[] {
  const env: IEnvVar[] = [
    { name: 'TANDEM_POD_NAME', valueFrom: { fieldRef: { fieldPath: 'metadata.name' } } },
    { name: 'TANDEM_POD_IP', valueFrom: { fieldRef: { fieldPath: 'status.podIP' } } },
    { name: 'TANDEM_CONTROL_NAMESPACE', value: c.name },
    { name: 'TANDEM_TOKEN', valueFrom: { secretKeyRef: { name: c.tokenSecret, key: 'token' } } },
  ];
  return env;
}

function probes(port: string): Pick<IContainer, 'livenessProbe' | 'readinessProbe' | 'startupProbe'> {
  return {
    // Loading a model takes long; the startup probe holds the others off until /live answers.
    startupProbe: { httpGet: { path: '/live', port }, periodSeconds: 5, failureThreshold: 120 },
    livenessProbe: { httpGet: { path: '/live', port }, periodSeconds: 10, failureThreshold: 3 },
    readinessProbe: { httpGet: { path: '/health', port }, periodSeconds: 5, failureThreshold: 2 },
  };
}

const graphVolume = (c: Common): IPodSpec['volumes'] => [{ name: 'graph', configMap: { name: `${c.name}-graph` } }];
const graphMount = { name: 'graph', mountPath: GRAPH_MOUNT_DIR, readOnly: true };
const graphPath = `${GRAPH_MOUNT_DIR}/${GRAPH_FILE}`;

function frontend(c: Common): K8sObject[] {
  const objectName = `${c.name}-frontend`;
  const l = labels(c, 'frontend');
  const env = tandemEnv(c);
  if (c.graph.frontend.apiKeyEnv)
    env.push({
      name: c.graph.frontend.apiKeyEnv,
      valueFrom: { secretKeyRef: { name: c.tokenSecret, key: 'api-key' } },
    });
  return [
    {
      apiVersion: 'v1',
      kind: 'Service',
      metadata: meta(c, objectName, l),
      spec: { selector: l, ports: [{ name: 'http', port: c.graph.frontend.port, targetPort: 'http' }] },
    },
    {
      apiVersion: 'apps/v1',
      kind: 'Deployment',
      metadata: meta(c, objectName, l),
      spec: {
        replicas: 1,
        selector: { matchLabels: l },
        template: {
          metadata: { labels: l },
          spec: {
            ...(c.plannerScales
              ? { serviceAccountName: `${c.name}-planner` }
              : { automountServiceAccountToken: false }),
            containers: [
              {
                name: 'frontend',
                image: c.image,
                args: [
                  'frontend',
                  '--join',
                  c.etcdEndpoint,
                  '--graph',
                  graphPath,
                  '--host',
                  '0.0.0.0',
                  '--port',
                  String(c.graph.frontend.port),
                ],
                env,
                ports: [{ name: 'http', containerPort: c.graph.frontend.port }],
                ...probes('http'),
                volumeMounts: [graphMount],
              },
            ],
            volumes: graphVolume(c),
          },
        },
      },
    },
  ];
}

function poolWorkload(c: Common, pool: PoolSpec): K8sObject[] {
  const objectName = `${c.name}-${pool.name}`;
  const l = labels(c, 'worker', { 'tandem.dev/pool': pool.name, 'tandem.dev/role': pool.role });
  const gpus = pool.gpusPerReplica;
  const resources: IContainer['resources'] = {};
  if (gpus > 0) resources.limits = { 'nvidia.com/gpu': gpus };
  if (pool.engine.threads !== undefined) resources.requests = { cpu: pool.engine.threads };
  const volumes: NonNullable<IPodSpec['volumes']> = [...graphVolume(c)!];
  const volumeMounts: NonNullable<IContainer['volumeMounts']> = [graphMount];
  if (gpus > 0) {
    // NCCL and CUDA IPC use /dev/shm; a container's default is 64 MiB.
    volumes.push({ name: 'dshm', emptyDir: { medium: 'Memory' } });
    volumeMounts.push({ name: 'dshm', mountPath: '/dev/shm' });
  }
  return [
    {
      apiVersion: 'v1',
      kind: 'Service',
      metadata: meta(c, objectName, l),
      spec: {
        // headless: each worker pod is <name>-<pool>-<i>.<name>-<pool>, a name that survives its restarts
        clusterIP: 'None',
        publishNotReadyAddresses: true,
        selector: l,
        ports: Object.entries(WORKER_PORTS).map(([portName, p]) => ({ name: portName, port: p, targetPort: portName })),
      },
    },
    {
      apiVersion: 'apps/v1',
      kind: 'StatefulSet',
      metadata: meta(c, objectName, l),
      spec: {
        serviceName: objectName,
        replicas: pool.replicas,
        // replicas are independent engines: start and replace them all at once, not one by one
        podManagementPolicy: 'Parallel',
        selector: { matchLabels: l },
        template: {
          metadata: { labels: l },
          spec: {
            automountServiceAccountToken: false,
            terminationGracePeriodSeconds: WORKER_TERMINATION_GRACE_S,
            containers: [
              {
                name: 'worker',
                image: c.image,
                args: [
                  'worker',
                  '--join',
                  c.etcdEndpoint,
                  '--pool',
                  pool.name,
                  '--graph',
                  graphPath,
                  '--host',
                  '0.0.0.0',
                  // The pod's fixed ports; it registers its pod IP (TANDEM_POD_IP) with them in etcd.
                  '--port',
                  String(WORKER_PORTS.requests),
                  '--kv-port',
                  String(WORKER_PORTS.kv),
                  '--status-port',
                  String(WORKER_PORTS.status),
                  '--drain-timeout',
                  String(WORKER_DRAIN_TIMEOUT_S),
                ],
                env: tandemEnv(c),
                ports: Object.entries(WORKER_PORTS).map(([portName, p]) => ({ name: portName, containerPort: p })),
                resources,
                ...probes('status'),
                volumeMounts,
              },
            ],
            volumes,
          },
        },
      },
    },
  ];
}
