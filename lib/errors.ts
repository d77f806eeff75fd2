/**
 * Typed errors. Native code rejects with an Error whose `code` names the failure; `fromNative` maps it
 * to one of these classes so that callers can `instanceof` instead of parsing messages.
 */
export class TandemError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** The native addon could not be loaded; the message says why and what to do. */
export class NativeLoadError extends TandemError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('TANDEM_NATIVE_LOAD', message, options);
  }
}

/** A backend (CUDA, NCCL, UCX, cuBLAS, kernels) is not available on this machine. `reason` says why. */
export class BackendUnavailableError extends TandemError {
  constructor(
    readonly backend: string,
    readonly reason: string,
    code = 'TANDEM_BACKEND_UNAVAILABLE',
  ) {
    super(code, `${backend} unavailable: ${reason}`);
  }
}

export class CudaUnavailableError extends BackendUnavailableError {
  constructor(reason: string) {
    super('CUDA', reason, 'TANDEM_CUDA_UNAVAILABLE');
  }
}

export class KernelsUnavailableError extends BackendUnavailableError {
  constructor(reason: string) {
    super('GPU kernels', reason, 'TANDEM_KERNELS_UNAVAILABLE');
  }
}

/** An argument is malformed (wrong type, out of range, inconsistent with another). */
export class BadArgumentError extends TandemError {
  constructor(message: string) {
    super('TANDEM_BAD_ARGUMENT', message);
  }
}

/** A copy or descriptor runs past the end of the memory it addresses. Nothing was moved. */
export class OutOfBoundsError extends TandemError {
  constructor(message: string) {
    super('TANDEM_OUT_OF_BOUNDS', message);
  }
}

/** The object was disposed before (or while) the operation ran. */
export class DisposedError extends TandemError {
  constructor(message: string) {
    super('TANDEM_DISPOSED', message);
  }
}

/** A CUDA driver call failed; the message carries the CUresult name and text. */
export class CudaError extends TandemError {
  constructor(message: string) {
    super('TANDEM_CUDA_ERROR', message);
  }
}

export class OutOfMemoryError extends TandemError {
  constructor(message: string) {
    super('TANDEM_OUT_OF_MEMORY', message);
  }
}

/** The peer went away (process died, connection closed, removed, or replaced by a restart). */
export class RemoteDisconnectError extends TandemError {
  constructor(message: string) {
    super('TANDEM_REMOTE_DISCONNECTED', message);
  }
}

/** A transfer descriptor is malformed (no pieces, mismatched arrays, fractional offsets, ...). */
export class BadDescriptorError extends TandemError {
  constructor(message: string) {
    super('TANDEM_BAD_DESCRIPTOR', message);
  }
}

/** A region (local or remote) is not registered, or was deregistered. */
export class NotRegisteredError extends TandemError {
  constructor(message: string) {
    super('TANDEM_NOT_REGISTERED', message);
  }
}

/**
 * A remote region named by a transfer is gone: the peer deregistered it (its reloaded metadata lacks it,
 * it said so, or its memory now belongs to another region). Nothing was moved. Load the peer's metadata
 * again and prepare the transfer against the regions it has now. The same error whatever the backend.
 */
export class RemoteRegionGoneError extends TandemError {
  constructor(message: string) {
    super('TANDEM_REMOTE_REGION_GONE', message);
  }
}

/**
 * A peer refused this agent, or this agent refused the peer, at the handshake: its uid is not allowed
 * (local peers), or the shared secrets differ or only one side has one. The message says which.
 */
export class PeerRejectedError extends TandemError {
  constructor(message: string) {
    super('TANDEM_PEER_REJECTED', message);
  }
}

/** A listener would accept connections beyond this host without a shared secret (see lib/transfer/auth.ts). */
export class InsecureListenError extends TandemError {
  constructor(message: string) {
    super('TANDEM_INSECURE_LISTEN', message);
  }
}

/** The operation was canceled through its AbortSignal. */
export class CanceledError extends TandemError {
  constructor(message: string) {
    super('TANDEM_CANCELED', message);
  }
}

/** A peer did not answer within the agent's timeout. */
export class TimeoutError extends TandemError {
  constructor(message: string) {
    super('TANDEM_TIMEOUT', message);
  }
}

/** Peer metadata is malformed, truncated or corrupted. Nothing was loaded. */
export class MetadataError extends TandemError {
  constructor(message: string, code = 'TANDEM_BAD_METADATA') {
    super(code, message);
  }
}

/** Peer metadata comes from an incompatible Tandem build or format. Nothing was loaded. */
export class IncompatibleMetadataError extends MetadataError {
  constructor(message: string) {
    super(message, 'TANDEM_INCOMPATIBLE_METADATA');
  }
}

/** No peer of that name has been loaded. */
export class UnknownPeerError extends TandemError {
  constructor(message: string) {
    super('TANDEM_UNKNOWN_PEER', message);
  }
}

/** The peer refused a request (its own validation failed). */
export class RemoteError extends TandemError {
  constructor(message: string) {
    super('TANDEM_REMOTE_ERROR', message);
  }
}

/** NCCL (or the GPU it needs) is not available here. `reason` says why; every collectives call rejects with it. */
export class NcclUnavailableError extends BackendUnavailableError {
  constructor(reason: string) {
    super('NCCL', reason, 'TANDEM_NCCL_UNAVAILABLE');
  }
}

/** What a collectives failure names: the communicator, the operation, and NCCL's result when it gave one. */
export interface CollectiveErrorDetails {
  communicator?: string;
  operation?: string;
  ncclResult?: string;
}

/**
 * A collective operation (or a communicator's init or split) failed. The message names the communicator
 * and the operation; after anything but an argument error the communicator has been aborted, and every
 * operation that was pending on it rejected too.
 */
export class CollectiveError extends TandemError {
  readonly communicator?: string;
  readonly operation?: string;
  /** NCCL's result name (`ncclRemoteError`, ...) when NCCL reported the failure. */
  readonly ncclResult?: string;
  constructor(message: string, details: CollectiveErrorDetails = {}, code = 'TANDEM_NCCL_ERROR') {
    super(code, message);
    if (details.communicator !== undefined) this.communicator = details.communicator;
    if (details.operation !== undefined) this.operation = details.operation;
    if (details.ncclResult !== undefined) this.ncclResult = details.ncclResult;
  }
}

/** An operation, init or split did not complete within its timeout; the communicator was aborted. */
export class CollectiveTimeoutError extends CollectiveError {
  constructor(message: string, details: CollectiveErrorDetails = {}) {
    super(message, details, 'TANDEM_NCCL_TIMEOUT');
  }
}

/** The operation was not run because the communicator had been aborted (the message says why). */
export class CommunicatorAbortedError extends CollectiveError {
  constructor(message: string, details: CollectiveErrorDetails = {}) {
    super(message, details, 'TANDEM_NCCL_ABORTED');
  }
}

const stripPrefix = (message: string, prefix: string) =>
  message.startsWith(prefix) ? message.slice(prefix.length) : message;

function collectiveDetails(error: Error): CollectiveErrorDetails {
  const e = error as { communicator?: unknown; operation?: unknown; ncclResult?: unknown };
  const details: CollectiveErrorDetails = {};
  if (typeof e.communicator === 'string') details.communicator = e.communicator;
  if (typeof e.operation === 'string') details.operation = e.operation;
  if (typeof e.ncclResult === 'string') details.ncclResult = e.ncclResult;
  return details;
}

/** Converts an error thrown or rejected by the addon into the matching typed error. */
export function fromNative(error: unknown): unknown {
  if (error instanceof TandemError || !(error instanceof Error)) return error;
  const code = (error as { code?: unknown }).code;
  const message = error.message;
  switch (code) {
    case 'TANDEM_CUDA_UNAVAILABLE':
      return new CudaUnavailableError(stripPrefix(message, 'CUDA unavailable: '));
    case 'TANDEM_KERNELS_UNAVAILABLE':
      return new KernelsUnavailableError(message);
    case 'TANDEM_BAD_ARGUMENT':
      return new BadArgumentError(message);
    case 'TANDEM_OUT_OF_BOUNDS':
      return new OutOfBoundsError(message);
    case 'TANDEM_DISPOSED':
      return new DisposedError(message);
    case 'TANDEM_CUDA_ERROR':
      return new CudaError(message);
    case 'TANDEM_OUT_OF_MEMORY':
      return new OutOfMemoryError(message);
    case 'TANDEM_REMOTE_DISCONNECTED':
      return new RemoteDisconnectError(message);
    case 'TANDEM_BAD_DESCRIPTOR':
      return new BadDescriptorError(message);
    case 'TANDEM_NOT_REGISTERED':
      return new NotRegisteredError(message);
    case 'TANDEM_REMOTE_REGION_GONE':
      return new RemoteRegionGoneError(message);
    case 'TANDEM_PEER_REJECTED':
      return new PeerRejectedError(message);
    case 'TANDEM_CANCELED':
      return new CanceledError(message);
    case 'TANDEM_TIMEOUT':
      return new TimeoutError(message);
    case 'TANDEM_BAD_METADATA':
      return new MetadataError(message);
    case 'TANDEM_INCOMPATIBLE_METADATA':
      return new IncompatibleMetadataError(message);
    case 'TANDEM_UNKNOWN_PEER':
      return new UnknownPeerError(message);
    case 'TANDEM_REMOTE_ERROR':
      return new RemoteError(message);
    case 'TANDEM_NCCL_UNAVAILABLE':
      return new NcclUnavailableError(stripPrefix(message, 'NCCL unavailable: '));
    case 'TANDEM_NCCL_ERROR':
      return new CollectiveError(message, collectiveDetails(error));
    case 'TANDEM_NCCL_TIMEOUT':
      return new CollectiveTimeoutError(message, collectiveDetails(error));
    case 'TANDEM_NCCL_ABORTED':
      return new CommunicatorAbortedError(message, collectiveDetails(error));
    case 'TANDEM_BACKEND_UNAVAILABLE': {
      const m = /^backend (\S+) unavailable: (.*)$/s.exec(message);
      return new BackendUnavailableError(m ? m[1]! : 'backend', m ? m[2]! : message);
    }
    default:
      if (error instanceof TypeError || error instanceof RangeError) return new BadArgumentError(message);
      return error;
  }
}

/** Runs a native call, converting what it throws or rejects with. */
export async function native<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (error) {
    throw fromNative(error);
  }
}

/** Synchronous form of `native`. */
export function nativeSync<T>(call: () => T): T {
  try {
    return call();
  } catch (error) {
    throw fromNative(error);
  }
}

/**
 * A model (its config.json, checkpoint directory or `dummy:` name) is missing, malformed or unsupported.
 * The message names the file and the field. Nothing was loaded.
 */
export class ModelConfigError extends TandemError {
  constructor(message: string, code = 'TANDEM_BAD_MODEL') {
    super(code, message);
  }
}

/** A safetensors checkpoint is truncated, corrupt or inconsistent; the message names the file and the tensor. */
export class CheckpointError extends ModelConfigError {
  constructor(message: string) {
    super(message, 'TANDEM_BAD_CHECKPOINT');
  }
}

/**
 * A tensor / pipeline parallel layout does not fit the model (tp does not divide the heads, the kv heads or
 * the intermediate size; more stages than layers; a size below 1) or cannot run on the chosen engine. Raised
 * before any memory is taken; the message names the size and the model dimension at fault.
 */
export class ParallelLayoutError extends TandemError {
  constructor(message: string) {
    super('TANDEM_BAD_PARALLEL_LAYOUT', message);
  }
}

/** A prompt can never be served: it is longer than the model's context or than the engine's whole KV pool. */
export class PromptTooLongError extends TandemError {
  constructor(
    message: string,
    readonly promptTokens: number,
    readonly limit: number,
  ) {
    super('TANDEM_PROMPT_TOO_LONG', message);
  }
}

/** Not enough free KV blocks for the operation right now (nothing was taken); retry after blocks are released. */
export class KvCacheFullError extends TandemError {
  constructor(message: string) {
    super('TANDEM_KV_CACHE_FULL', message);
  }
}

/**
 * An engine request failed because the step that carried it failed (the model runner threw); `cause` is the
 * runner's error. The engine keeps serving other requests.
 */
export class EngineRequestError extends TandemError {
  constructor(
    message: string,
    readonly requestId: string,
    options?: { cause?: unknown },
  ) {
    super('TANDEM_ENGINE_REQUEST_FAILED', message, options);
  }
}
