import { createHash } from 'node:crypto';

/** Deterministic bytes: every offset gets a value that depends on its position and the seed. */
export function fillPattern(view: Uint8Array, seed: number, baseOffset = 0): void {
  for (let i = 0; i < view.length; i++) {
    const x = baseOffset + i;
    view[i] = ((x * 131) ^ (x >>> 8) ^ (x >>> 16) ^ seed) & 0xff;
  }
}

export function patternBytes(length: number, seed: number, baseOffset = 0): Uint8Array {
  const out = new Uint8Array(length);
  fillPattern(out, seed, baseOffset);
  return out;
}

export function sha256(view: Uint8Array): string {
  return createHash('sha256').update(view).digest('hex');
}
