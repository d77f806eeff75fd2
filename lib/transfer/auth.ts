/**
 * Who may talk to a transfer agent, and the shared-secret proof that Tandem processes give each other.
 *
 * Local peers (the agent's abstract unix socket, which has no file permissions) are accepted when their
 * credentials show the agent's own uid or one of `allowedUids` / TANDEM_TRANSFER_ALLOWED_UIDS.
 *
 * A shared secret (the `secret` option, TANDEM_TRANSFER_SECRET, or the file named by
 * TANDEM_TRANSFER_SECRET_FILE) makes every connection start with a mutual proof: each side shows it holds
 * the secret, over two fresh nonces, before anything else is trusted:
 *
 *   proof(role) = HMAC-SHA256(secret, "tandem-auth/1 " + role + " " + nonceInitiator + nonceTarget)
 *
 * with role "target" (sent first, with the target's nonce) and then "initiator". The native agent computes
 * it (native/src/transfer/auth.h); `handshakeProof` is the same construction for the request and control
 * planes. It authenticates; it does not encrypt.
 *
 * A tcp listener beyond loopback needs a secret, unless the network is declared trusted (`trustNetwork`,
 * TANDEM_TRANSFER_TRUST_NETWORK=1).
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { BadArgumentError, InsecureListenError } from '../errors.js';

export const AUTH_ENV = {
  secret: 'TANDEM_TRANSFER_SECRET',
  secretFile: 'TANDEM_TRANSFER_SECRET_FILE',
  trustNetwork: 'TANDEM_TRANSFER_TRUST_NETWORK',
  allowedUids: 'TANDEM_TRANSFER_ALLOWED_UIDS',
} as const;

export interface AuthOptions {
  /** The shared secret (bytes, or a string taken as UTF-8). Overrides the environment. */
  secret?: string | Uint8Array;
  /** Uids besides this process's own whose local processes may connect. */
  allowedUids?: readonly number[];
  /** Allow a tcp listener beyond loopback without a secret. */
  trustNetwork?: boolean;
}

const encoder = new TextEncoder();

/** The secret from the options, else TANDEM_TRANSFER_SECRET, else the file TANDEM_TRANSFER_SECRET_FILE names (one trailing newline dropped). */
export function resolveSecret(options: AuthOptions, env: NodeJS.ProcessEnv = process.env): Uint8Array | undefined {
  let secret: Uint8Array | undefined;
  if (options.secret !== undefined) {
    secret = typeof options.secret === 'string' ? encoder.encode(options.secret) : options.secret;
  } else if (env[AUTH_ENV.secret]) {
    secret = encoder.encode(env[AUTH_ENV.secret]!);
  } else if (env[AUTH_ENV.secretFile]) {
    const path = env[AUTH_ENV.secretFile]!;
    let bytes: Buffer;
    try {
      bytes = readFileSync(path);
    } catch (error) {
      throw new BadArgumentError(`${AUTH_ENV.secretFile}=${path} cannot be read: ${(error as Error).message}`);
    }
    const end = bytes.at(-1) === 0x0a ? (bytes.at(-2) === 0x0d ? bytes.length - 2 : bytes.length - 1) : bytes.length;
    secret = new Uint8Array(bytes.subarray(0, end));
  }
  if (secret !== undefined && secret.length === 0) throw new BadArgumentError('the shared secret is empty');
  return secret;
}

/** allowedUids from the options, else TANDEM_TRANSFER_ALLOWED_UIDS (comma-separated). */
export function resolveAllowedUids(options: AuthOptions, env: NodeJS.ProcessEnv = process.env): number[] {
  const uids = options.allowedUids ?? (env[AUTH_ENV.allowedUids] ?? '').split(',').filter((s) => s.trim() !== '');
  return uids.map((u) => {
    const n = typeof u === 'number' ? u : Number(u.trim());
    if (!Number.isInteger(n) || n < 0 || n > 0xffffffff)
      throw new BadArgumentError(`allowedUids: ${String(u)} is not a uid`);
    return n;
  });
}

/** Whether a listen address reaches only this host: 127.0.0.0/8, ::1, localhost. */
export function isLoopbackHost(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  if (isIP(host) === 6) return host === '::1' || /^::ffff:127\./i.test(host);
  return false;
}

/** Throws InsecureListenError for a tcp listener beyond loopback with no secret, unless the network is trusted. */
export function checkListen(
  tcpHost: string,
  secret: Uint8Array | undefined,
  options: AuthOptions,
  env: NodeJS.ProcessEnv = process.env,
): void {
  if (secret || isLoopbackHost(tcpHost)) return;
  if (options.trustNetwork ?? env[AUTH_ENV.trustNetwork] === '1') return;
  throw new InsecureListenError(
    `refusing to listen on ${tcpHost} without a shared secret: anyone who reaches it could read and write every ` +
      `registered region. Set ${AUTH_ENV.secret} (or ${AUTH_ENV.secretFile}, or the secret option) on every ` +
      `agent, or declare the network trusted (trustNetwork: true / ${AUTH_ENV.trustNetwork}=1)`,
  );
}

/** proof(role) of the handshake described above (32 bytes). */
export function handshakeProof(
  secret: Uint8Array,
  role: 'initiator' | 'target',
  initiatorNonce: Uint8Array,
  targetNonce: Uint8Array,
): Buffer {
  return createHmac('sha256', secret)
    .update(`tandem-auth/1 ${role} `)
    .update(initiatorNonce)
    .update(targetNonce)
    .digest();
}

/** Compares two proofs in constant time. */
export function sameProof(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
