/**
 * What the distributed control plane stores: a worker's registration and its load as JSON text. The transfer
 * agent's metadata (bytes) travels as base64. Values read back are checked, so a key written by another
 * Tandem version or by hand is refused with a message instead of reaching the router half-formed.
 */
import { z } from 'zod';
import { TandemError } from '../errors.js';
import { POOL_ROLES } from '../deploy/graph.js';
import type { WorkerLoad, WorkerRegistration } from '../worker/protocol.js';

/** A stored registration or load does not parse; `key` names where it was read from. */
export class BadRegistrationError extends TandemError {
  constructor(
    readonly key: string,
    reason: string,
  ) {
    super('TANDEM_BAD_REGISTRATION', `${key}: ${reason}`);
  }
}

const count = z.number().int().min(0);

const KvPoolSpecSchema = z.looseObject({
  layers: count,
  kvHeads: count,
  headDim: count,
  numBlocks: count,
  dtype: z.string(),
  layout: z.string(),
});

const StoredRegistrationSchema = z.strictObject({
  name: z.string().min(1),
  role: z.enum(POOL_ROLES),
  pid: count,
  agentName: z.string(),
  agentMetadata: z.base64(),
  kvRegion: count,
  kvPool: KvPoolSpecSchema,
  kvRanks: z
    .array(z.strictObject({ region: count, pool: KvPoolSpecSchema }))
    .min(1)
    .optional(),
  device: z.enum(['cpu', 'cuda']),
  numBlocks: count,
  pool: z.string().min(1).optional(),
  requestPlane: z.strictObject({ host: z.string().min(1), port: z.number().int().min(1).max(65535) }).optional(),
});

const WorkerLoadSchema = z.strictObject({
  running: count,
  waiting: count,
  freeBlocks: count,
  prefilling: count,
  draining: z.boolean().optional(),
});

export function encodeRegistration(registration: WorkerRegistration): string {
  return JSON.stringify({
    ...registration,
    agentMetadata: Buffer.from(
      registration.agentMetadata.buffer,
      registration.agentMetadata.byteOffset,
      registration.agentMetadata.byteLength,
    ).toString('base64'),
  });
}

function parseJson<S extends z.ZodType>(key: string, text: string, schema: S): z.output<S> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new BadRegistrationError(key, `not JSON (${(error as Error).message})`);
  }
  const result = schema.safeParse(value);
  if (!result.success) {
    const first = result.error.issues[0]!;
    throw new BadRegistrationError(key, `${first.path.join('.') || 'value'}: ${first.message}`);
  }
  return result.data;
}

/** Throws BadRegistrationError. */
export function decodeRegistration(key: string, text: string): WorkerRegistration {
  const stored = parseJson(key, text, StoredRegistrationSchema);
  const { kvRanks, ...rest } = stored;
  return {
    ...rest,
    kvPool: stored.kvPool as unknown as WorkerRegistration['kvPool'],
    ...(kvRanks ? { kvRanks: kvRanks as unknown as WorkerRegistration['kvRanks'] } : {}),
    agentMetadata: new Uint8Array(Buffer.from(stored.agentMetadata, 'base64')),
  };
}

export function encodeLoad(load: WorkerLoad): string {
  return JSON.stringify(load);
}

/** Throws BadRegistrationError. */
export function decodeLoad(key: string, text: string): WorkerLoad {
  return parseJson(key, text, WorkerLoadSchema);
}
