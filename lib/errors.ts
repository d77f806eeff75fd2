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

const stripPrefix = (message: string, prefix: string) =>
  message.startsWith(prefix) ? message.slice(prefix.length) : message;

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
