/**
 * The frontend's errors: every refusal is an `HttpError`, answered as OpenAI's error body
 * `{ error: { message, type, param, code } }` with its HTTP status; `toHttpError` maps what a backend throws.
 */
import { TandemError } from '../errors.js';
import { NoWorkerAvailableError } from './backend.js';

export type ErrorType =
  'invalid_request_error' | 'authentication_error' | 'not_found_error' | 'server_error' | 'service_unavailable_error';

/** An error answered as an OpenAI error body with its HTTP status. */
export class HttpError extends TandemError {
  constructor(
    readonly status: number,
    message: string,
    readonly type: ErrorType = 'invalid_request_error',
    readonly param: string | null = null,
    readonly errorCode: string | null = null,
  ) {
    super('TANDEM_HTTP_ERROR', message);
  }
  body() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.errorCode } };
  }
}

export const badRequest = (message: string, param: string | null = null, code: string | null = 'invalid_value') =>
  new HttpError(400, message, 'invalid_request_error', param, code);

/** A parameter that OpenAI or vLLM define and Tandem does not implement, set to something other than its no-op. */
export const unsupported = (message: string, param: string) => badRequest(message, param, 'unsupported_value');

export const noWorker = (message = 'no worker is available to serve the request') =>
  new HttpError(503, message, 'service_unavailable_error', null, 'no_worker_available');

export const bodyTooLarge = (maxBytes: number) =>
  new HttpError(413, `request body larger than ${maxBytes} bytes`, 'invalid_request_error', null, 'request_too_large');

/** New requests while the frontend drains, and requests still running when the drain period ends. */
export const shuttingDown = () =>
  new HttpError(503, 'the server is shutting down', 'service_unavailable_error', null, 'server_shutting_down');

/**
 * The client went away (closed the connection mid-body or mid-response). Not an error of the server: counted
 * as canceled, never logged, never answered.
 */
export class ClientDisconnectedError extends TandemError {
  constructor() {
    super('TANDEM_CLIENT_DISCONNECTED', 'the client disconnected');
  }
}

/** Errors thrown by a backend, as HTTP: nothing to serve it (503), a request it can never serve (400), else 500. */
export function toHttpError(error: unknown): HttpError {
  if (error instanceof HttpError) return error;
  if (error instanceof NoWorkerAvailableError) return noWorker(error.message);
  const code = error instanceof TandemError ? error.code : undefined;
  if (code === 'TANDEM_PROMPT_TOO_LONG') return badRequest((error as Error).message, null, 'context_length_exceeded');
  if (code === 'TANDEM_BAD_ARGUMENT') return badRequest((error as Error).message);
  return new HttpError(500, `internal error: ${(error as Error)?.message ?? String(error)}`, 'server_error');
}
