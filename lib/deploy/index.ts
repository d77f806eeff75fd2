/**
 * Deployment: the deployment graph (graph.ts: pools, replicas, parallelism, the frontend, the planner), the
 * launcher that runs it on this machine (launcher.ts: one process per worker, supervised, the embedded control
 * plane, the frontends), and what runs it elsewhere (k8s/: Kubernetes manifests).
 */
export {
  DEFAULT_DEPLOYMENT_NAME,
  DEFAULT_ETCD_IMAGE,
  DEFAULT_IMAGE,
  DEFAULT_K8S_NAMESPACE,
  DEFAULT_TOKEN_SECRET,
  GRAPH_FILE,
  GRAPH_MOUNT_DIR,
  K8sRenderError,
  manifestsToYaml,
  renderKubernetes,
  WORKER_DRAIN_TIMEOUT_S,
  WORKER_PORTS,
  WORKER_TERMINATION_GRACE_S,
  type K8sManifestFile,
  type K8sObject,
  type K8sRenderOptions,
  type K8sRendering,
} from './k8s/render.js';
export { K8sManifestError, manifestProblems, validateManifests } from './k8s/validate.js';
export {
  DEFAULT_BLOCK_SIZE,
  DEFAULT_FRONTEND_HOST,
  DEFAULT_FRONTEND_PORT,
  DEFAULT_MODEL,
  DEVICES,
  defaultGraph,
  frontendPorts,
  GraphError,
  loadGraph,
  parseGraph,
  POOL_ROLES,
  SERVING_MODES,
  SHARED_GPU_KV_CACHE_FRACTION,
  type DefaultGraphOptions,
  type DeploymentGraph,
  type DeviceKind,
  type EngineOptions,
  type GraphIssue,
  type ParseGraphOptions,
  type PoolRole,
  type PoolSpec,
  type ServingMode,
} from './graph.js';
export {
  banner,
  DEFAULT_WORKER_START_TIMEOUT_MS,
  ListenError,
  startDeployment,
  WorkerStartError,
  type Deployment,
  type DeploymentOptions,
} from './launcher.js';
