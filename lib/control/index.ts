/**
 * Discovery: which workers exist, what they offer and whether they are alive. `EmbeddedControlPlane` keeps it
 * in one process (one host, the default); `EtcdControlPlane` keeps it in etcd, for workers on several hosts.
 */
export {
  DEFAULT_WORKER_TIMEOUT_MS,
  EmbeddedControlPlane,
  type ControlPlane,
  type ControlPlaneEvents,
  type LiveWorker,
} from './control-plane.js';
export {
  ControlPlaneUnavailableError,
  DEFAULT_CONNECT_TIMEOUT_MS,
  DEFAULT_LEASE_TTL_S,
  DEFAULT_LOAD_INTERVAL_MS,
  DEFAULT_NAMESPACE,
  ETCD_KEY_ROOT,
  EtcdControlPlane,
  parseEtcdEndpoints,
  type EtcdControlPlaneOptions,
} from './etcd.js';
export { BadRegistrationError } from './wire.js';
