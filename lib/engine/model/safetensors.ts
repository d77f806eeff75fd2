/**
 * safetensors checkpoints: a single `model.safetensors`, or shards listed by `model.safetensors.index.json`.
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON header
 * (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the data, offsets
 * relative to the end of the header. Opening reads only the header and checks every tensor against the file
 * size; tensor data is read on request with positioned reads, never the whole file.
 */
import { closeSync, fstatSync, openSync, readFileSync, readSync, statSync, writeSync } from 'node:fs';
import { endianness } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { CheckpointError } from '../../errors.js';

/** Bytes per element of every safetensors dtype (all are validated; BF16, F16 and F32 convert to f32). */
export const SAFETENSORS_DTYPE_BYTES = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
} as const;
export type SafetensorsDtype = keyof typeof SAFETENSORS_DTYPE_BYTES;
/** Dtypes `tensorF32` converts and `writeSafetensors` writes. */
export type FloatDtype = 'BF16' | 'F16' | 'F32';

export interface TensorInfo {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** The file holding it. */
  file: string;
  /** Absolute byte offset of its data in that file. */
  offset: number;
  byteLength: number;
}

/** safetensors' own limit on the JSON header. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;
/** readSync moves at most 2 GiB - 1 per call; read in smaller pieces. */
const READ_CHUNK = 1 << 30;
const LITTLE_ENDIAN = endianness() === 'LE';

function readFully(fd: number, target: Uint8Array, position: number, file: string, what: string): void {
  let done = 0;
  while (done < target.byteLength) {
    const want = Math.min(READ_CHUNK, target.byteLength - done);
    const n = readSync(fd, target, done, want, position + done);
    if (n === 0) throw new CheckpointError(`${file}: ${what}: unexpected end of file at byte ${position + done}`);
    done += n;
  }
}

/** Elements of a tensor of `shape`. */
export const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

/** One .safetensors file. Keeps a file descriptor open until `close()`. */
export class SafetensorsFile {
  readonly path: string;
  /** The header's `__metadata__` (string to string), empty when absent. */
  readonly metadata: Record<string, string>;
  private fd: number | null;
  private readonly tensors: Map<string, TensorInfo>;

  private constructor(path: string, fd: number, metadata: Record<string, string>, tensors: Map<string, TensorInfo>) {
    this.path = path;
    this.fd = fd;
    this.metadata = metadata;
    this.tensors = tensors;
  }

  /** Opens `path` and validates its header against the file size. Throws CheckpointError naming the file and tensor. */
  static open(path: string): SafetensorsFile {
    let fd: number;
    try {
      fd = openSync(path, 'r');
    } catch (e) {
      throw new CheckpointError(`${path}: cannot open (${(e as Error).message})`);
    }
    try {
      const { metadata, tensors } = SafetensorsFile.parseHeader(path, fd);
      return new SafetensorsFile(path, fd, metadata, tensors);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  private static parseHeader(path: string, fd: number) {
    const size = fstatSync(fd).size;
    if (size < 8)
      throw new CheckpointError(`${path}: truncated: ${size} bytes, too short for the 8-byte header length`);
    const lenBuf = Buffer.alloc(8);
    readFully(fd, lenBuf, 0, path, 'header length');
    const headerLen = lenBuf.readBigUInt64LE(0);
    if (headerLen < 2n || headerLen > BigInt(MAX_HEADER_BYTES))
      throw new CheckpointError(
        `${path}: corrupt header: header length ${headerLen} is outside 2..${MAX_HEADER_BYTES} bytes`,
      );
    const n = Number(headerLen);
    if (8 + n > size)
      throw new CheckpointError(
        `${path}: truncated: header says ${n} bytes of JSON but the file has ${size - 8} after the length`,
      );
    const headerBuf = Buffer.alloc(n);
    readFully(fd, headerBuf, 8, path, 'header');
    let header: unknown;
    try {
      header = JSON.parse(headerBuf.toString('utf8'));
    } catch (e) {
      throw new CheckpointError(`${path}: corrupt header: not valid JSON (${(e as Error).message})`);
    }
    if (typeof header !== 'object' || header === null || Array.isArray(header))
      throw new CheckpointError(`${path}: corrupt header: not a JSON object`);

    const dataStart = 8 + n;
    const dataSize = size - dataStart;
    const metadata: Record<string, string> = {};
    const tensors = new Map<string, TensorInfo>();
    const spans: { name: string; begin: number; end: number }[] = [];
    for (const [name, entry] of Object.entries(header as Record<string, unknown>)) {
      if (name === '__metadata__') {
        if (typeof entry !== 'object' || entry === null || Array.isArray(entry))
          throw new CheckpointError(`${path}: corrupt header: __metadata__ is not an object`);
        for (const [k, v] of Object.entries(entry)) {
          if (typeof v !== 'string')
            throw new CheckpointError(`${path}: corrupt header: __metadata__.${k} is not a string`);
          metadata[k] = v;
        }
        continue;
      }
      const bad = (what: string): never => {
        throw new CheckpointError(`${path}: tensor "${name}": ${what}`);
      };
      if (typeof entry !== 'object' || entry === null) bad('header entry is not an object');
      const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
      if (typeof dtype !== 'string' || !(dtype in SAFETENSORS_DTYPE_BYTES))
        bad(`unknown dtype ${JSON.stringify(dtype)}`);
      if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0))
        bad(`shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
      if (
        !Array.isArray(offsets) ||
        offsets.length !== 2 ||
        !offsets.every((o) => Number.isSafeInteger(o) && o >= 0) ||
        offsets[0] > offsets[1]
      )
        bad(`data_offsets ${JSON.stringify(offsets)} is not [begin, end] with 0 <= begin <= end`);
      const [begin, end] = offsets as [number, number];
      const dt = dtype as SafetensorsDtype;
      const expected = numel(shape as number[]) * SAFETENSORS_DTYPE_BYTES[dt];
      if (end - begin !== expected)
        bad(`data_offsets span ${end - begin} bytes but ${dt}${JSON.stringify(shape)} needs ${expected}`);
      if (end > dataSize) bad(`truncated: data ends at byte ${dataStart + end} but the file has ${size} bytes`);
      tensors.set(name, {
        name,
        dtype: dt,
        shape: [...(shape as number[])],
        file: path,
        offset: dataStart + begin,
        byteLength: expected,
      });
      spans.push({ name, begin, end });
    }
    spans.sort((a, b) => a.begin - b.begin || a.end - b.end);
    let last: { name: string; end: number } | null = null;
    for (const cur of spans) {
      if (cur.end === cur.begin) continue; // empty tensors take no bytes
      if (last && cur.begin < last.end)
        throw new CheckpointError(`${path}: corrupt header: tensors "${last.name}" and "${cur.name}" overlap`);
      if (!last || cur.end > last.end) last = { name: cur.name, end: cur.end };
    }
    return { metadata, tensors };
  }

  /** Tensor names in header order. */
  listTensors(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new CheckpointError(`${this.path}: no tensor "${name}"`);
    return t;
  }

  private handle(): number {
    if (this.fd === null) throw new CheckpointError(`${this.path}: file was closed`);
    return this.fd;
  }

  /**
   * The tensor's raw bytes (little-endian, as stored). Reads into `target` (at least byteLength bytes) when given,
   * else into a new Buffer.
   */
  readRaw(name: string, target?: Uint8Array): Buffer {
    const t = this.info(name);
    let out: Buffer;
    if (target) {
      if (target.byteLength < t.byteLength)
        throw new CheckpointError(
          `${this.path}: tensor "${name}": target has ${target.byteLength} bytes, needs ${t.byteLength}`,
        );
      out = Buffer.from(target.buffer, target.byteOffset, t.byteLength);
    } else out = Buffer.from(new ArrayBuffer(t.byteLength)); // own, aligned ArrayBuffer (not the pool)
    readFully(this.handle(), out, t.offset, this.path, `tensor "${name}"`);
    return out;
  }

  /** The tensor converted to float32 (BF16, F16, F32 only). */
  tensorF32(name: string): Float32Array {
    const t = this.info(name);
    const n = t.byteLength / SAFETENSORS_DTYPE_BYTES[t.dtype];
    if (!LITTLE_ENDIAN) throw new CheckpointError(`${this.path}: tensor "${name}": big-endian hosts are not supported`);
    switch (t.dtype) {
      case 'F32': {
        const out = new Float32Array(n);
        this.readRaw(name, new Uint8Array(out.buffer));
        return out;
      }
      case 'BF16': {
        // Read the 16-bit values into the upper halves' positions of the output: out32[i] = bf16[i] << 16.
        const out = new Float32Array(n);
        const raw = new Uint16Array(n);
        this.readRaw(name, new Uint8Array(raw.buffer));
        bf16ToF32(raw, out);
        return out;
      }
      case 'F16': {
        const out = new Float32Array(n);
        const raw = new Uint16Array(n);
        this.readRaw(name, new Uint8Array(raw.buffer));
        f16ToF32(raw, out);
        return out;
      }
      default:
        throw new CheckpointError(
          `${this.path}: tensor "${name}": dtype ${t.dtype} cannot be converted to float32 (supported: BF16, F16, F32)`,
        );
    }
  }

  close(): void {
    if (this.fd !== null) {
      closeSync(this.fd);
      this.fd = null;
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

export const SINGLE_FILE = 'model.safetensors';
export const INDEX_FILE = 'model.safetensors.index.json';

/** A checkpoint directory: one file or several shards, addressed by tensor name. */
export class SafetensorsCheckpoint {
  readonly dir: string;
  readonly files: readonly SafetensorsFile[];
  private readonly byName: Map<string, SafetensorsFile>;

  private constructor(dir: string, files: SafetensorsFile[], byName: Map<string, SafetensorsFile>) {
    this.dir = dir;
    this.files = files;
    this.byName = byName;
  }

  /**
   * Opens a checkpoint: `path` is a directory holding model.safetensors.index.json (sharded) or model.safetensors,
   * or a .safetensors file, or an index file.
   */
  static open(path: string): SafetensorsCheckpoint {
    let st;
    try {
      st = statSync(path);
    } catch {
      throw new CheckpointError(`${path}: no such checkpoint directory or file`);
    }
    if (st.isDirectory()) {
      const index = join(path, INDEX_FILE);
      const single = join(path, SINGLE_FILE);
      if (isFile(index)) return SafetensorsCheckpoint.openIndex(index);
      if (isFile(single)) return SafetensorsCheckpoint.fromFiles(path, [SafetensorsFile.open(single)]);
      throw new CheckpointError(`${path}: no ${INDEX_FILE} or ${SINGLE_FILE} in the directory`);
    }
    if (path.endsWith('.index.json')) return SafetensorsCheckpoint.openIndex(path);
    return SafetensorsCheckpoint.fromFiles(dirname(path), [SafetensorsFile.open(path)]);
  }

  private static fromFiles(dir: string, files: SafetensorsFile[]): SafetensorsCheckpoint {
    const byName = new Map<string, SafetensorsFile>();
    for (const f of files)
      for (const name of f.listTensors()) {
        const other = byName.get(name);
        if (other) {
          for (const g of files) g.close();
          throw new CheckpointError(`${f.path}: tensor "${name}" also appears in ${other.path}`);
        }
        byName.set(name, f);
      }
    return new SafetensorsCheckpoint(dir, files, byName);
  }

  private static openIndex(indexPath: string): SafetensorsCheckpoint {
    const dir = dirname(indexPath);
    let index: unknown;
    try {
      index = JSON.parse(readFileSync(indexPath, 'utf8'));
    } catch (e) {
      throw new CheckpointError(`${indexPath}: cannot read the index (${(e as Error).message})`);
    }
    const weightMap = (index as { weight_map?: unknown } | null)?.weight_map;
    if (typeof weightMap !== 'object' || weightMap === null || Array.isArray(weightMap))
      throw new CheckpointError(`${indexPath}: field "weight_map" is missing or not an object`);
    const shardNames = new Set<string>();
    for (const [name, file] of Object.entries(weightMap)) {
      if (typeof file !== 'string' || file === '' || basename(file) !== file || file === '..' || file === '.')
        throw new CheckpointError(
          `${indexPath}: weight_map["${name}"] is not a file name in the directory: ${JSON.stringify(file)}`,
        );
      shardNames.add(file);
    }
    if (shardNames.size === 0) throw new CheckpointError(`${indexPath}: field "weight_map" lists no tensors`);
    const files: SafetensorsFile[] = [];
    const byFile = new Map<string, SafetensorsFile>();
    try {
      for (const shard of [...shardNames].sort()) {
        const f = SafetensorsFile.open(join(dir, shard));
        files.push(f);
        byFile.set(shard, f);
      }
      for (const [name, shard] of Object.entries(weightMap as Record<string, string>)) {
        const f = byFile.get(shard)!;
        if (!f.has(name))
          throw new CheckpointError(
            `${f.path}: tensor "${name}" is listed in ${basename(indexPath)} but not in the file`,
          );
      }
    } catch (e) {
      for (const f of files) f.close();
      throw e;
    }
    return SafetensorsCheckpoint.fromFiles(dir, files);
  }

  listTensors(): string[] {
    return [...this.byName.keys()];
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  private file(name: string): SafetensorsFile {
    const f = this.byName.get(name);
    if (!f) throw new CheckpointError(`${this.dir}: checkpoint has no tensor "${name}"`);
    return f;
  }

  info(name: string): TensorInfo {
    return this.file(name).info(name);
  }

  readRaw(name: string, target?: Uint8Array): Buffer {
    return this.file(name).readRaw(name, target);
  }

  tensorF32(name: string): Float32Array {
    return this.file(name).tensorF32(name);
  }

  close(): void {
    for (const f of this.files) f.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function isFile(path: string): boolean {
  try {
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

/** Opens a checkpoint directory or file (see SafetensorsCheckpoint.open). */
export function openSafetensors(path: string): SafetensorsCheckpoint {
  return SafetensorsCheckpoint.open(path);
}

// ---------------------------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------------------------

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** bf16 bit patterns to float32 (exact). */
export function bf16ToF32(src: Uint16Array, out = new Float32Array(src.length)): Float32Array {
  const o = new Uint32Array(out.buffer, out.byteOffset, out.length);
  for (let i = 0; i < src.length; i++) o[i] = src[i]! << 16;
  return out;
}

/** float32 to bf16 bit patterns, round to nearest even; NaN stays NaN. */
export function f32ToBf16(src: Float32Array, out = new Uint16Array(src.length)): Uint16Array {
  const s = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < src.length; i++) {
    const x = s[i]!;
    if ((x & 0x7fffffff) > 0x7f800000) out[i] = (x >>> 16) | 0x40;
    else out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}

let f16Table: Float32Array | null = null;

function f16BitsToNumber(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** fp16 bit patterns to float32 (exact, through a 64K-entry table). */
export function f16ToF32(src: Uint16Array, out = new Float32Array(src.length)): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16BitsToNumber(h);
  }
  const t = f16Table;
  for (let i = 0; i < src.length; i++) out[i] = t[src[i]!]!;
  return out;
}

/** One float32 value to fp16 bits, round to nearest even, with subnormals, overflow to infinity, and NaN. */
export function f32ToF16Bits(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign; // below half the smallest subnormal: zero
    mant |= 0x800000;
    const shift = 14 - e; // 24-bit mantissa down to a 10-bit subnormal
    const half = 1 << (shift - 1);
    const rest = mant & ((1 << shift) - 1);
    let h = mant >>> shift;
    if (rest > half || (rest === half && h & 1)) h++;
    return sign | h; // a carry into bit 10 gives the smallest normal, which is right
  }
  let h = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && h & 1)) h++; // a carry may reach infinity, which is right
  return sign | h;
}

export function f32ToF16(src: Float32Array, out = new Uint16Array(src.length)): Uint16Array {
  for (let i = 0; i < src.length; i++) out[i] = f32ToF16Bits(src[i]!);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------------------------

export interface TensorToWrite {
  dtype: FloatDtype;
  shape: number[];
  /**
   * Float32 values (converted to `dtype`), or, for BF16/F16, the 16-bit patterns as stored. A function is called
   * when the tensor is written, so large checkpoints need not be held in memory at once.
   */
  data: Float32Array | Uint16Array | (() => Float32Array | Uint16Array);
}

/**
 * The start of a .safetensors file whose tensors follow in the order given: the 8-byte length and the JSON header
 * (padded with spaces to 8 bytes), data offsets laid end to end. For writers that stream the data themselves.
 */
export function safetensorsHeader(
  path: string,
  tensors: Iterable<readonly [string, { dtype: FloatDtype; shape: number[] }]>,
  metadata?: Record<string, string>,
): Buffer {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, t] of tensors) {
    if (name === '__metadata__') throw new CheckpointError(`${path}: "__metadata__" is not a valid tensor name`);
    if (!(t.dtype in { BF16: 1, F16: 1, F32: 1 }))
      throw new CheckpointError(`${path}: tensor "${name}": cannot write dtype ${t.dtype}`);
    const bytes = numel(t.shape) * SAFETENSORS_DTYPE_BYTES[t.dtype];
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const headerBuf = Buffer.from(json, 'utf8');
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64LE(BigInt(headerBuf.length));
  return Buffer.concat([lenBuf, headerBuf]);
}

/**
 * Writes a .safetensors file (header padded to 8 bytes, tensors in the order given). `tensors` is a record or a
 * list of [name, tensor] pairs.
 */
export function writeSafetensors(
  path: string,
  tensors: Record<string, TensorToWrite> | Iterable<readonly [string, TensorToWrite]>,
  metadata?: Record<string, string>,
): void {
  const entries: (readonly [string, TensorToWrite])[] =
    Symbol.iterator in tensors
      ? [...(tensors as Iterable<readonly [string, TensorToWrite]>)]
      : Object.entries(tensors as Record<string, TensorToWrite>);
  const header = safetensorsHeader(path, entries, metadata);
  const fd = openSync(path, 'w');
  try {
    writeSync(fd, header);
    for (const [name, t] of entries) {
      const data = typeof t.data === 'function' ? t.data() : t.data;
      const n = numel(t.shape);
      if (data.length !== n)
        throw new CheckpointError(
          `${path}: tensor "${name}": ${data.length} values for shape ${JSON.stringify(t.shape)} (${n})`,
        );
      let out: Uint8Array;
      if (data instanceof Float32Array) {
        if (t.dtype === 'F32') out = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
        else {
          const bits = t.dtype === 'BF16' ? f32ToBf16(data) : f32ToF16(data);
          out = new Uint8Array(bits.buffer);
        }
      } else {
        if (t.dtype === 'F32')
          throw new CheckpointError(`${path}: tensor "${name}": F32 needs Float32Array data, got 16-bit patterns`);
        out = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
      }
      for (let done = 0; done < out.byteLength;)
        done += writeSync(fd, out, done, Math.min(READ_CHUNK, out.byteLength - done));
    }
  } finally {
    closeSync(fd);
  }
}
