/** Deployment: turning a deployment graph into what runs it elsewhere (Kubernetes manifests). */
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
