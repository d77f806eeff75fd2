/**
 * Tandem: disaggregated LLM serving for Node.js. Public API.
 */
export { capabilities, nvlinkPerLinkGBps } from './capabilities/index.js';
export type { Capabilities, CudaDeviceInfo } from './capabilities/index.js';
export { CudaDevice, DeviceBuffer, probeCuda } from './cuda/index.js';
export type { KernelArg, LaunchConfig } from './cuda/index.js';
export * from './errors.js';
export { LIBRARY_ENV, libraryCandidates } from './native/libraries.js';
export { kernelImage } from './native/kernels.js';
export type { KernelImage, KernelManifest } from './native/kernels.js';
export { loadBinding } from './native/binding.js';
export { packageVersion } from './version.js';
export { TransferAgent, TransferPlan } from './transfer/index.js';
export type {
  AgentOptions,
  BackendName,
  CopyStrategy,
  MemoryKind,
  Notification,
  PieceList,
  PostOptions,
  PrepareOptions,
  Region,
  RemotePeer,
  RemoteRegion,
  StridedPieces,
} from './transfer/index.js';
export * from './kv/index.js';
export {
  CollectiveBuffer,
  Communicator,
  DEFAULT_COLLECTIVE_TIMEOUT_MS,
  DTYPES,
  REDUCE_OPS,
  UNIQUE_ID_BYTES,
  busBandwidthFactor,
  createUniqueId,
  ncclInfo,
} from './collectives/index.js';
export type {
  AllToAllArgs,
  BroadcastArgs,
  CommunicatorOptions,
  DeviceMemory,
  Dtype,
  GatherArgs,
  NcclInfo,
  PointToPointArgs,
  ReduceArgs,
  ReduceOp,
  ReduceScatterArgs,
  RootedReduceArgs,
} from './collectives/index.js';
export * from './engine/index.js';
