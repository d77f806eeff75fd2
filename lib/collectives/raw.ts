/**
 * The collectives' slice of the raw native binding (native/src/nccl/comm_wrap.cpp), typed by hand.
 * Mechanical: validation, defaults and policy live in ./index.ts and ./ops.ts.
 */
import { loadBinding, type RawBinding } from '../native/binding.js';

export interface RawNcclStatus {
  available: boolean;
  reason?: string;
  libraryPath?: string;
  /** major*10000 + minor*100 + patch; 0 when no library loaded. */
  versionCode: number;
  version?: string;
  /** The library has ncclFloat8e4m3 / ncclFloat8e5m2 (NCCL 2.24 and newer). */
  fp8: boolean;
}

export interface RawNcclComm {
  readonly name: string;
  readonly device: number;
  /** -1 until init has completed (a split learns its rank at the end of init). */
  readonly rank: number;
  readonly size: number;
  /** False when a split gave this rank no communicator (color NCCL_SPLIT_NOCOLOR). */
  readonly member: boolean;
  readonly disposed: boolean;
  readonly aborted: boolean;
  readonly abortReason?: string;
  /** Settles when init has finished: true, or false for a split that gave this rank no communicator. */
  ready(): Promise<boolean>;
  split(color: number, key: number, name: string, timeoutMs: number): RawNcclComm;
  /** 7 words per operation: kind, send, recv, count, dtype, redop, peer (see OP_KIND in ops.ts). */
  submit(descriptor: BigUint64Array, timeoutMs: number, label?: string): Promise<void>;
  alloc(bytes: number): Promise<bigint>;
  free(address: bigint): Promise<void>;
  copyToDevice(address: bigint, source: ArrayBufferView, timeoutMs: number): Promise<void>;
  copyToHost(address: bigint, target: ArrayBufferView, timeoutMs: number): Promise<void>;
  memset(address: bigint, byte: number, bytes: number, timeoutMs: number): Promise<void>;
  abort(reason?: string): Promise<void>;
  dispose(): Promise<void>;
}

export interface RawCollectivesBinding {
  ncclLoad(candidates: string[]): Promise<RawNcclStatus>;
  ncclUniqueId(): Promise<Uint8Array>;
  ncclInit(options: {
    name: string;
    device: number;
    rank: number;
    size: number;
    id: Uint8Array;
    timeoutMs: number;
  }): RawNcclComm;
  ncclInitAll(options: { names: string[]; devices: number[]; timeoutMs: number }): RawNcclComm[];
}

export function collectivesBinding(): RawCollectivesBinding & RawBinding {
  return loadBinding().binding as RawBinding & RawCollectivesBinding;
}
