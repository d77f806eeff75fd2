/** The control plane moved to lib/control; this re-export keeps lib/serve's imports working until they move. */
export {
  DEFAULT_WORKER_TIMEOUT_MS,
  EmbeddedControlPlane,
  type ControlPlane,
  type ControlPlaneEvents,
  type LiveWorker,
} from '../control/control-plane.js';
