/**
 * The raw native binding, typed by hand, and its loader. Everything here is mechanical; validation,
 * defaults and policy live in the modules that wrap it (capabilities, cuda).
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { NativeLoadError } from '../errors.js';
import { packageRoot } from './paths.js';

export interface RawLibraryCandidates {
  cuda: string[];
  nccl: string[];
  ucp: string[];
  cublas: string[];
  cublasLt: string[];
  nvml: string[];
}

export interface RawDevice {
  ordinal: number;
  name: string;
  uuid: string;
  pciBusId: string;
  totalMemoryBytes: number;
  computeCapabilityMajor: number;
  computeCapabilityMinor: number;
  multiprocessors: number;
  l2CacheBytes: number;
  memoryBusWidthBits: number;
  memoryClockKHz: number;
  virtualMemoryManagement: boolean;
  posixFdHandles: boolean;
}

export interface RawProbe {
  cuda: {
    available: boolean;
    reason?: string;
    libraryPath?: string;
    driverVersion: number;
    devices: RawDevice[];
    peerAccess: boolean[][];
    peerPerformanceRank: number[][];
    nvlink: {
      available: boolean;
      reason?: string;
      links: number[][];
      activeLinks: number[];
      switchLinks: number[];
      unmatchedLinks: number[];
      nvmlLinkVersion: number[];
    };
  };
  nccl: { available: boolean; reason?: string; libraryPath?: string; versionCode: number };
  ucx: {
    available: boolean;
    reason?: string;
    libraryPath?: string;
    moduleDir?: string;
    versionParts: [number, number, number];
    transports: string[];
    resources: string[];
    modules: string[];
    transportReason?: string;
  };
  cublas: {
    available: boolean;
    reason?: string;
    libraryPath?: string;
    versionParts: [number, number, number];
    lt: { available: boolean; reason?: string; libraryPath?: string; versionCode: number };
  };
  kernels: { tried: boolean; loaded: boolean; reason?: string };
}

export interface RawDeviceBuffer {
  readonly size: number;
  readonly address: bigint;
  readonly disposed: boolean;
  copyFromHost(source: ArrayBufferView, offset?: number): Promise<void>;
  copyToHost(target: ArrayBufferView, offset?: number): Promise<void>;
  fill(byte: number): Promise<void>;
  dispose(): Promise<void>;
}

export interface RawCudaDevice {
  readonly ordinal: number;
  readonly disposed: boolean;
  ready(): Promise<{ name: string }>;
  alloc(bytes: number): Promise<RawDeviceBuffer>;
  loadKernels(fatbin: Uint8Array): Promise<void>;
  launch(
    name: string,
    grid: [number, number, number],
    block: [number, number, number],
    sharedBytes: number,
    signature: string,
    args: unknown[],
  ): Promise<void>;
  synchronize(): Promise<void>;
  timeCopy(dst: bigint, dstDevice: number, src: bigint, srcDevice: number, bytes: number, iterations: number): Promise<number[]>;
  memoryInfo(): Promise<{ freeBytes: number; totalBytes: number }>;
  dispose(): Promise<void>;
}

export interface RawRegion {
  id: number;
  kind: 'host' | 'shared' | 'pinned' | 'device';
  size: number;
  device: number;
  address: bigint;
  buffer?: ArrayBuffer;
}

export interface RawRemotePeer {
  name: string;
  sameHost: boolean;
  incarnation: bigint;
  backends: string[];
  regions: { id: number; kind: RawRegion['kind']; size: number; device: number }[];
}

export interface RawTransferPlan {
  readonly backend: string;
  readonly pieces: number;
  readonly requestedPieces: number;
  readonly bytes: number;
  readonly op: 'READ' | 'WRITE';
  readonly peer: string;
  readonly copyStrategy: CopyStrategy | undefined;
  /** Posts it on the agent that prepared it. undefined: the transfer was done during the call (a small shm post with nothing else in flight). */
  post(notification?: Uint8Array): { token: number; promise: Promise<void> } | undefined;
}

/** How a cuda-ipc plan's copies are issued (see TransferPlan.copyStrategy). */
export type CopyStrategy = 'undecided' | 'kernel' | 'copy-engine' | 'batch';

export interface RawTransferAgent {
  readonly name: string;
  readonly incarnation: bigint;
  readonly tcpPort: number;
  readonly backends: string[];
  readonly disposed: boolean;
  readonly ucxReason: string;
  readonly ncclReason: string;
  readonly directPosts: number;
  readonly streamCommits: number;
  registerHost(buffer: ArrayBufferView): RawRegion;
  allocShared(bytes: number, pinned: boolean): RawRegion;
  registerDevice(device: number, address: bigint, bytes: number): RawRegion;
  allocDevice(device: number, bytes: number): RawRegion;
  deregister(id: number): void;
  metadata(): Buffer;
  loadRemote(metadata: Uint8Array): RawRemotePeer;
  removeRemote(name: string): boolean;
  prepare(
    op: 'READ' | 'WRITE',
    peer: string,
    localIds: Uint32Array,
    remoteIds: Uint32Array,
    localOffsets: Float64Array,
    remoteOffsets: Float64Array,
    lengths: Float64Array | number,
    localRegionIndex: Uint32Array | undefined,
    remoteRegionIndex: Uint32Array | undefined,
    backend: string | undefined,
  ): RawTransferPlan;
  cancel(token: number): void;
  /** undefined: written into the peer's ring on the calling thread, done. */
  notify(peer: string, message: Uint8Array): Promise<void> | undefined;
  takeNotifications(max?: number): { from: string; message: Buffer }[];
  /** Resolves with how many of the peer's device regions are open, as a decimal string. */
  warmup(peer: string): Promise<string>;
  dispose(): Promise<void>;
}

/** Options of the native CPU model runner: a ModelConfig's fields plus the KV pool it reads and writes. */
export interface RawCpuLlamaOptions {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: {
    type: 'llama3';
    factor: number;
    lowFreqFactor: number;
    highFreqFactor: number;
    originalMaxPositionEmbeddings: number;
  } | null;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  attentionBias: boolean;
  attentionOutputBias: boolean;
  slidingWindow: number | null;
  /** Qwen3's per-head q/k RMSNorm before RoPE. */
  qkNorm?: boolean;
  /** Mixture-of-experts FFN (ModelConfig's MoeSpec), or null for a dense model. */
  moe?: {
    numExperts: number;
    topK: number;
    intermediateSize: number;
    normTopkProb: boolean;
    sharedExpertIntermediateSize?: number;
    denseLayers?: number[];
  } | null;
  /** The weight manifest (lib/engine/model/manifest.ts's nativeManifest): each tensor's name, role, layer and expert. */
  tensors: { name: string; role: string; layer: number; expert?: number }[];
  numBlocks: number;
  blockSize: number;
  layout: 'block-major' | 'layer-major';
  /** fp32 KV pool memory (NHD tiles), at least numBlocks * layers * 2 * blockSize * kvHeads * headDim * 4 bytes. */
  kvBuffer: Uint8Array;
  /** Compute threads, the forward thread included. Default min(hardware threads, 8). */
  threads?: number;
  /** Matrix kernel: 'auto' (default), 'avx512', 'avx2' or 'generic'. */
  kernel?: string;
  /** Tensor parallel ranks per pipeline stage (lib/engine/parallel.ts). Default 1. */
  tensorParallelSize?: number;
  /** Pipeline stages. Default 1. */
  pipelineParallelSize?: number;
  /** Expert parallel ranks per pipeline stage (MoE models; 1 or tensorParallelSize when that is > 1). Default 1. */
  expertParallelSize?: number;
  /** Expert slots per expert-parallel rank beyond numExperts / ep (EPLB replicas; needs ep > 1). Default 0. */
  redundantExpertSlots?: number;
}

export interface RawCudaLlamaOptions
  extends Omit<
    RawCpuLlamaOptions,
    | 'kvBuffer'
    | 'threads'
    | 'kernel'
    | 'tensorParallelSize'
    | 'pipelineParallelSize'
    | 'expertParallelSize'
    | 'redundantExpertSlots'
  > {
  /** bf16 KV pool (NHD tiles) on the same device, at least numBlocks * layers * 2 * blockSize * kvHeads * headDim * 2 bytes. */
  kvBuffer: RawDeviceBuffer;
  /** cuBLAS library candidates, tried in order (lib/native/libraries.ts). */
  cublas: string[];
  /** cuBLASLt library candidates (absent or none loading: GEMMs through cublasGemmEx). */
  cublasLt?: string[];
  /** Replay decode steps as CUDA graphs (default true). */
  cudaGraphs?: boolean;
  /** This runner is tensor-parallel rank `rank` of `group` (lib/engine/cuda-parallel.ts); its kvBuffer holds its kv heads. */
  tp?: { group: RawCudaTpGroup; rank: number };
  /**
   * MoE models: expert parallelism over tp's group (`size` its size, or 1 for redundant slots on one rank; each rank
   * holds its own experts and `redundantSlots` more), attention replicated on every rank (tp 1) or split (tp = ep).
   */
  ep?: { size: number; redundantSlots?: number; replicatedAttention?: boolean };
  /**
   * This runner is pipeline stage `stage` of `size` (lib/engine/cuda-pipeline.ts): layers [layerStart, layerStart +
   * layerCount) (its kvBuffer holds those), its input from the previous stage's `output` channel.
   */
  pp?: {
    stage: number;
    size: number;
    layerStart: number;
    layerCount: number;
    input?: RawCudaStageChannel;
    output?: RawCudaStageChannel;
  };
}

/** Hands micro-batches' hidden states from one pipeline stage's rank to the next's (native/src/engine/cuda_llama_pp.h). */
export type RawCudaStageChannel = object;

/**
 * The ranks of one tensor-parallel runner group: on one CUDA device (the local communicator,
 * native/src/engine/cuda_llama_tp.h) or one GPU each through NCCL (native/src/engine/cuda_llama_nccl.h).
 */
export interface RawCudaTpGroup {
  readonly size: number;
  readonly communicator: 'local' | 'nccl';
}

/** new CudaTpGroup(size, options): NCCL's library candidates and the bound on each rank's join. */
export type RawCudaTpGroupOptions = { communicator: 'local' } | { communicator: 'nccl'; nccl: string[]; timeoutMs: number };

/** What a tensor-parallel rank holds: [start, count] of heads, kv heads, intermediate channels, vocabulary rows. */
export interface RawTensorShard {
  rank: number;
  size: number;
  heads: [number, number];
  kvHeads: [number, number];
  intermediate: [number, number];
  vocab: [number, number];
}

/** One forward batch, in the native runners' argument order (built by `forwardArgs`, lib/engine/runner.ts). */
export type RawForwardArgs = readonly [
  tokens: Int32Array,
  positions: Int32Array,
  seqStarts: Int32Array,
  blockTables: Int32Array,
  maxBlocksPerSeq: number,
  contextLens: Int32Array,
];

/** The GPU engine's GEMM set-up (CudaModelRunner.gemmTuning). */
export interface GemmTuning {
  /** cuBLASLt autotuning on (TANDEM_GEMM_TUNE; false on the gemmex path). */
  readonly tune: boolean;
  /** The dense gate_up GEMM writes bf16 (TANDEM_GATEUP_BF16), else fp32. */
  readonly gateUpBf16: boolean;
  /** GEMM shapes tuned so far. */
  readonly shapes: number;
  /** Milliseconds spent tuning so far (at most about 2000 per runner). */
  readonly ms: number;
}
/**
 * The flash decode kernels a GPU runner uses: `small` for steps of at most `smallMaxRows` decode rows, `medium` for
 * at most `mediumMaxRows`, else `large`.
 */
export interface DecodeAttention {
  small: DecodeKernel;
  medium: DecodeKernel;
  large: DecodeKernel;
  smallMaxRows: number;
  mediumMaxRows: number;
}
/** native/kernels/attention.cu: tandem_flash_decode (+ _combine), _decode2, _decode3. */
export type DecodeKernel = 'decode1' | 'decode2' | 'decode3';

export interface RawCudaLlama {
  readonly weightBytes: number;
  readonly cudaGraphs: { active: boolean; reason: string | null };
  readonly attentionKernels: 'prefill3' | 'flash2' | 'flash' | 'reference';
  readonly decodeAttention: DecodeAttention | null;
  readonly gemvMaxBatch: number;
  readonly gemmPath: 'lt' | 'gemmex';
  readonly gemmTuning: GemmTuning;
  readonly disposed: boolean;
  /** What this rank holds (the whole model for one rank); null once disposed. */
  readonly tensorParallel: RawTensorShard | null;
  init(): Promise<void>;
  setWeight(name: string, data: Float32Array): Promise<void>;
  /** Generates a dummy tensor on the GPU (lib/engine/model/dummy.ts's DummyRecipe; native/kernels/dummy_init.cu). */
  fillDummy(
    name: string,
    recipe: { kind: 'ones' } | { kind: 'uniform'; keys: [number, number, number]; width: number },
  ): Promise<void>;
  /**
   * Reads tensors of an open safetensors file into the weights (64 MiB reads into pinned staging, double-buffered);
   * progress[0] counts the file bytes done meanwhile.
   */
  loadFromFile(
    fd: number,
    tensors: { name: string; offset: number; bytes: number; dtype: 'BF16' | 'F16' | 'F32' }[],
    progress?: Float64Array,
  ): Promise<void>;
  /** A tensor's bf16 bit patterns as the GPU holds them. */
  readWeight(name: string): Promise<Uint16Array>;
  missingWeights(): string[];
  ready(): void;
  /** `slot`: a pipeline stage's micro-batch slot of its channels (default 0), here and in the two passes below. */
  forward(...args: [...batch: RawForwardArgs, slot?: number]): Promise<Float32Array>;
  /**
   * A tensor-parallel rank's pass whose logits nobody reads (rank 0 runs forward or forwardSampled meanwhile), or a
   * pipeline stage's before the last (it hands its hidden state to the next stage).
   */
  forwardWithoutLogits(...args: [...batch: RawForwardArgs, slot?: number]): Promise<void>;
  /** Throws TANDEM_BAD_ARGUMENT at once when forward() would refuse the batch; runs nothing. */
  checkForward(...batch: RawForwardArgs): void;
  /** Whether this rank holds the tensor (an expert-parallel rank holds its own experts' only). */
  holds(name: string): boolean;
  /** MoE: the placement in force, layers x ranks x slotsPerRank slots -> expert (-1: empty). */
  expertPlacement(): { ranks: number; slotsPerRank: number; slotExpert: Int32Array };
  /** MoE: device addresses [gateUp, down] of this rank's local slot (a placement change's copy source). */
  expertSlotAddress(layer: number, slot: number): [number, number];
  /** MoE, phase 1 of a placement change: copies the experts at [gateUp, down] address pairs into staging. */
  stageExperts(sources: Float64Array): Promise<void>;
  /** MoE, phase 2: staged experts into [layer, slot] pairs, then the new placement's routing tables. */
  commitExperts(dests: Int32Array, placement: Int32Array): Promise<{ slotsCopied: number; bytes: number }>;
  /** MoE: pairs routed per layer and expert, and pairs this rank ran per layer, since the last call; a reset. */
  takeExpertLoad(): Promise<{ perExpert: Float64Array; pairsRun: Float64Array }>;
  /**
   * A tensor-parallel rank's stream time (ms, CUDA events around each collective, waits for its peers included) in
   * all-reduces and the logits gather since the last call; the first call starts the timing and gives zeros.
   */
  takeCollectiveTime(): Promise<{ allReduceMs: number; gatherMs: number }>;
  forwardSampled(
    ...args: [
      ...batch: RawForwardArgs,
      plan: { n: Int32Array; flags: Int32Array; invT: Float64Array; topP: Float64Array; u: Float64Array },
      slot?: number,
    ]
  ): Promise<{
    maxN: number;
    ints: Int32Array;
    dbl: Float64Array;
    topIds: Int32Array;
    topLogits: Float32Array;
    fullRows: Int32Array;
    full: Float32Array;
  }>;
  dispose(): Promise<void>;
}

/** Host time (ms) one CPU rank spent inside its collectives: waiting for its peers plus its own summing and copying. */
export interface RawCollectiveTime {
  /** All-reduces: attention and FFN partial sums, the vocabulary-parallel embedding. */
  allReduceMs: number;
  /** The gather of vocabulary-parallel logits. */
  gatherMs: number;
  /** Barriers (replicated kv heads: the writer before the readers). */
  barrierMs: number;
  /** Waiting for the previous pipeline stage's activations. */
  handoverMs: number;
}

export interface RawCpuLlama {
  readonly threads: number;
  /** The matrix kernel in use: 'avx512', 'avx2' or 'generic'. */
  readonly kernel: string;
  readonly disposed: boolean;
  /** max(tensorParallelSize, expertParallelSize) x pipelineParallelSize. */
  readonly ranks: number;
  /** Rank `rank`'s slice of a tensor (rank = stage * max(tp, ep) + rank in the stage; default 0). */
  setWeight(name: string, data: Float32Array, rank?: number): void;
  missingWeights(): string[];
  ready(): void;
  forward(...batch: RawForwardArgs): Promise<Float32Array>;
  /** Tokens routed per layer and expert (layer-major) by the passes since the last call; empty for a dense model. */
  takeExpertLoad(): Float64Array;
  /** (token, choice) pairs each expert-parallel rank ran per layer (numLayers x ep, layer-major) since the last call. */
  takeRankLoad(): Float64Array;
  /** The expert placement in force: slot -> expert, numLayers x ranks x slotsPerRank. */
  expertPlacement(): { ranks: number; slotsPerRank: number; slotExpert: Int32Array };
  /**
   * Checks a placement (throws TANDEM_BAD_ARGUMENT, nothing changed), then, after the passes queued before it, copies
   * the expert weights the rewritten slots need and switches the routing table.
   */
  applyExpertPlacement(
    slotExpert: Int32Array,
  ): Promise<{ slotsCopied: number; crossRankCopies: number; bytes: number }>;
  /** Host time each rank (stage * group + group rank) spent in its collectives since the last call, and a reset. */
  takeCollectiveTime(): RawCollectiveTime[];
  /** Test hook: the next forward pass throws in `rank` just before decoder layer `layer`. */
  failRankForTest(rank: number, layer: number): void;
  dispose(): Promise<void>;
}

export interface RawBinding {
  addonVersion: string;
  napiVersion: number;
  probe(options: { libraries: RawLibraryCandidates; fatbin?: Uint8Array }): Promise<RawProbe>;
  /** ms of each timed bf16 GEMM y[m, n] = x[m, k] . w[n, k]^T through the engine's cuBLAS (native/src/engine/gemm_bench.h). */
  timeGemm(
    device: RawCudaDevice,
    options: { m: number; n: number; k: number; iterations: number; warmup?: number; cublas?: string[] },
  ): Promise<number[]>;
  /**
   * The range an attached profiler records (ncu --profile-from-start off): cuProfilerStart, or cuProfilerStop after
   * the device's work is done, on the device's thread (native/src/addon.cpp). Without a profiler, nothing happens.
   */
  cudaProfiler(device: RawCudaDevice, action: 'start' | 'stop'): Promise<void>;
  CudaDevice: new (ordinal: number) => RawCudaDevice;
  DeviceBuffer: new (...args: never[]) => RawDeviceBuffer;
  TransferAgent: new (
    options: {
      name: string;
      tcpHost?: string;
      tcpPort?: number;
      timeoutMs?: number;
      notifications?: 'events' | 'poll';
      kernels?: Uint8Array;
      secret?: Uint8Array;
      allowedUids?: number[];
      ucp?: string[];
      nccl?: string[];
    },
    onNotification: (from: string, message: Buffer) => void,
  ) => RawTransferAgent;
  CpuLlama: new (options: RawCpuLlamaOptions) => RawCpuLlama;
  CudaLlama: new (device: RawCudaDevice, options: RawCudaLlamaOptions) => RawCudaLlama;
  CudaTpGroup: new (size: number, options?: RawCudaTpGroupOptions) => RawCudaTpGroup;
  CudaStageChannel: new () => RawCudaStageChannel;
}

let cached: { binding: RawBinding; path: string } | undefined;

/** Explains a load failure in terms of what the user can do about it. */
function explain(error: Error, searched: string): string {
  const text = error.message;
  const lines = [`Tandem's native addon could not be loaded: ${text.split('\n')[0]}`];
  if (/No native build was found/.test(text)) {
    lines.push(
      `No compiled addon for this platform (searched ${searched}).`,
      'Build it: `npm run build:addon` (needs python3, make and a C++17 compiler), or make a prebuild on a',
      'machine like this one with `npm run build:prebuild`. Set TANDEM_ADDON=/path/to/tandem.node to use a specific file.',
    );
  } else if (/GLIBC_|GLIBCXX_|CXXABI_/.test(text)) {
    lines.push(
      'The binary was built against a newer C or C++ runtime than this system has.',
      'Rebuild on this machine with `npm run build:addon`, or use a prebuild made on an older distribution.',
    );
  } else if (/wrong ELF class|invalid ELF header|Exec format error/.test(text)) {
    lines.push('The binary is for another CPU architecture. Rebuild here with `npm run build:addon`.');
  } else if (/NODE_MODULE_VERSION|napi/i.test(text)) {
    lines.push('This Node.js does not offer N-API version 9 (Node 20.17 or newer is required).');
  } else {
    lines.push('Rebuild it with `npm run build:addon`; if that fails, the compiler output says why.');
  }
  return lines.join('\n');
}

/** Loads the addon once: TANDEM_ADDON, else build/Release (a local build) then prebuilds/, as node-gyp-build tries them. */
export function loadBinding(): { binding: RawBinding; path: string } {
  if (cached) return cached;
  const require = createRequire(import.meta.url);
  const override = process.env.TANDEM_ADDON;
  try {
    if (override) {
      if (!existsSync(override)) {
        throw new NativeLoadError(`TANDEM_ADDON points at ${override}, which does not exist`);
      }
      cached = { binding: require(override) as RawBinding, path: override };
    } else {
      const nodeGypBuild = require('node-gyp-build') as { (dir: string): unknown; resolve(dir: string): string };
      const path = nodeGypBuild.resolve(packageRoot);
      cached = { binding: require(path) as RawBinding, path };
    }
  } catch (error) {
    if (error instanceof NativeLoadError) throw error;
    const searched = override ?? `${join(packageRoot, 'build', 'Release')} and ${join(packageRoot, 'prebuilds')}`;
    throw new NativeLoadError(explain(error as Error, searched), { cause: error });
  }
  return cached;
}
