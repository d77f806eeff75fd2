/**
 * Discovery: which workers exist, what they offer and whether they are alive, behind one `ControlPlane` interface.
 * `EmbeddedControlPlane` keeps it in one process (the launcher: one host, the default), which its worker processes
 * reach as an `IpcControlPlane` (the launcher's `ControlPlaneRelay` serves it over their IPC channel);
 * `EtcdControlPlane` keeps it in etcd, for workers on several hosts.
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
export { ControlPlaneRelay, IpcControlPlane, type ControlPlaneEvent, type ControlPlaneRequest } from './ipc.js';
export { BadRegistrationError } from './wire.js';
