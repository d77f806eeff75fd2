/**
 * capabilities(): what this machine offers Tandem, and for everything it lacks, why.
 *
 * The shape is stable (schemaVersion 1): other tools read `cuda.available`, `cuda.devices[]`,
 * `nccl.available`, `nccl.version` and the rest. Fields are only ever added. See README.md.
 */
import { cpus, freemem, totalmem } from 'node:os';
import { loadBinding, type RawProbe } from '../native/binding.js';
import { kernelImage, readKernelImage } from '../native/kernels.js';
import { libraryCandidates } from '../native/libraries.js';
import { packageVersion } from '../version.js';

export interface CudaDeviceInfo {
  ordinal: number;
  name: string;
  uuid: string;
  pciBusId: string;
  memoryBytes: number;
  computeCapability: string;
  multiprocessors: number;
  l2CacheBytes: number;
  /** Theoretical DRAM bandwidth from the memory clock and bus width, GB/s. */
  memoryBandwidthGBps: number;
  virtualMemoryManagement: boolean;
  posixFdHandles: boolean;
}

export interface Capabilities {
  schemaVersion: 1;
  tandem: { version: string; addonPath: string; addonVersion: string };
  node: {
    version: string;
    napiVersion: number;
    addonNapiVersion: number;
    platform: string;
    arch: string;
    glibc?: string;
  };
  cpu: { model: string; cores: number; memoryBytes: number; freeMemoryBytes: number };
  cuda: {
    available: boolean;
    reason?: string;
    libraryPath?: string;
    /** e.g. "13.0"; absent when no driver loaded. */
    driverVersion?: string;
    devices: CudaDeviceInfo[];
    /** peerAccess[i][j]: device i can map device j's memory (true on the diagonal). */
    peerAccess: boolean[][];
    nvlink: {
      available: boolean;
      reason?: string;
      /** links[i][j]: active NVLink links from device i to device j. */
      links: number[][];
      /** Per device: active NVLink links in all (to GPUs and NVSwitches). */
      activeLinks: number[];
      /** Per device: active links that end at an NVSwitch (counted toward every switch-connected peer). */
      switchLinks: number[];
      /** One link's bandwidth per direction, GB/s, for this GPU generation; null when unknown. */
      perLinkGBps: number | null;
      /** bandwidthGBps[i][j] = links[i][j] x perLinkGBps (per direction). */
      bandwidthGBps: number[][];
    };
  };
  nccl: { available: boolean; reason?: string; libraryPath?: string; version?: string; versionCode?: number };
  ucx: {
    available: boolean;
    reason?: string;
    libraryPath?: string;
    version?: string;
    /** Transport names UCX offers here (tcp, posix, sysv, cma, rc_verbs, cuda_copy, cuda_ipc, ...). */
    transports: string[];
    /** transport/device pairs, e.g. "tcp/lo". */
    resources: string[];
    /** Loadable transport modules found beside libucp (cma, ib, cuda, ...). */
    modules: string[];
    /** True when UCX can move GPU memory itself (cuda_copy/cuda_ipc present). */
    cudaTransports: boolean;
    cudaTransportsReason?: string;
  };
  cublas: {
    available: boolean;
    reason?: string;
    libraryPath?: string;
    version?: string;
    lt: { available: boolean; reason?: string; libraryPath?: string; version?: string };
  };
  kernels: {
    built: boolean;
    path: string;
    architectures: string[];
    ptx: string[];
    /** Loaded on device 0 with cuModuleLoadData during this probe. */
    loaded: boolean;
    reason?: string;
  };
}

/** Per-link, per-direction NVLink rate by compute capability major (NVLink generation). */
export function nvlinkPerLinkGBps(computeCapabilityMajor: number): number | null {
  if (computeCapabilityMajor === 9) return 26.5625; // NVLink 4 (H100/H200): 18 links = 478 GB/s
  if (computeCapabilityMajor === 10) return 50; // NVLink 5 (B200): 18 links = 900 GB/s
  if (computeCapabilityMajor === 8) return 25; // NVLink 3 (A100)
  if (computeCapabilityMajor === 7) return 25; // NVLink 2 (V100)
  return null;
}

function versionFromCode(code: number, majorScale: number): string {
  const major = Math.floor(code / majorScale);
  const minor = Math.floor((code % majorScale) / 100);
  const patch = code % 100;
  return `${major}.${minor}.${patch}`;
}

function glibcVersion(): string | undefined {
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined;
  return report?.header?.glibcVersionRuntime;
}

export function assembleCapabilities(
  raw: RawProbe,
  addon: { path: string; version: string; napi: number },
): Capabilities {
  const devices: CudaDeviceInfo[] = raw.cuda.devices.map((d) => ({
    ordinal: d.ordinal,
    name: d.name,
    uuid: d.uuid,
    pciBusId: d.pciBusId,
    memoryBytes: d.totalMemoryBytes,
    computeCapability: `${d.computeCapabilityMajor}.${d.computeCapabilityMinor}`,
    multiprocessors: d.multiprocessors,
    l2CacheBytes: d.l2CacheBytes,
    memoryBandwidthGBps: Math.round((2 * d.memoryClockKHz * 1e3 * (d.memoryBusWidthBits / 8)) / 1e9),
    virtualMemoryManagement: d.virtualMemoryManagement,
    posixFdHandles: d.posixFdHandles,
  }));
  const perLink = devices.length > 0 ? nvlinkPerLinkGBps(raw.cuda.devices[0]!.computeCapabilityMajor) : null;
  const links = raw.cuda.nvlink.links;
  const nvlinkReason = raw.cuda.nvlink.reason ?? (devices.length < 2 ? 'fewer than two CUDA devices' : undefined);

  const ucxVersion = raw.ucx.available ? raw.ucx.versionParts.join('.') : undefined;
  const cudaTransports = raw.ucx.transports.some((t) => t.startsWith('cuda'));
  const image = kernelImage();

  const kernelsReason = !image.manifest.built
    ? image.manifest.reason
    : raw.kernels.loaded
      ? undefined
      : (raw.kernels.reason ?? (raw.cuda.available ? 'not tried' : `CUDA unavailable`));

  return {
    schemaVersion: 1,
    tandem: { version: packageVersion, addonPath: addon.path, addonVersion: addon.version },
    node: {
      version: process.versions.node,
      napiVersion: Number(process.versions.napi),
      addonNapiVersion: addon.napi,
      platform: process.platform,
      arch: process.arch,
      ...(glibcVersion() ? { glibc: glibcVersion() } : {}),
    },
    cpu: {
      model: cpus()[0]?.model ?? 'unknown',
      cores: cpus().length,
      memoryBytes: totalmem(),
      freeMemoryBytes: freemem(),
    },
    cuda: {
      available: raw.cuda.available,
      ...(raw.cuda.reason ? { reason: raw.cuda.reason } : {}),
      ...(raw.cuda.libraryPath ? { libraryPath: raw.cuda.libraryPath } : {}),
      ...(raw.cuda.driverVersion
        ? { driverVersion: `${Math.floor(raw.cuda.driverVersion / 1000)}.${(raw.cuda.driverVersion % 1000) / 10}` }
        : {}),
      devices,
      peerAccess: raw.cuda.peerAccess,
      nvlink: {
        available: raw.cuda.nvlink.available,
        ...(nvlinkReason ? { reason: nvlinkReason } : {}),
        links,
        activeLinks: raw.cuda.nvlink.activeLinks,
        switchLinks: raw.cuda.nvlink.switchLinks ?? [],
        perLinkGBps: perLink,
        bandwidthGBps: links.map((row) => row.map((n) => (perLink === null ? 0 : n * perLink))),
      },
    },
    nccl: {
      available: raw.nccl.available,
      ...(raw.nccl.reason ? { reason: raw.nccl.reason } : {}),
      ...(raw.nccl.libraryPath ? { libraryPath: raw.nccl.libraryPath } : {}),
      ...(raw.nccl.available
        ? {
            versionCode: raw.nccl.versionCode,
            // NCCL >= 2.9 encodes major*10000 + minor*100 + patch; older releases used major*1000.
            version: versionFromCode(raw.nccl.versionCode, raw.nccl.versionCode >= 20900 ? 10000 : 1000),
          }
        : {}),
    },
    ucx: {
      available: raw.ucx.available,
      ...(raw.ucx.reason ? { reason: raw.ucx.reason } : {}),
      ...(raw.ucx.libraryPath ? { libraryPath: raw.ucx.libraryPath } : {}),
      ...(ucxVersion ? { version: ucxVersion } : {}),
      transports: raw.ucx.transports,
      resources: raw.ucx.resources,
      modules: raw.ucx.modules,
      cudaTransports,
      ...(!raw.ucx.available
        ? { cudaTransportsReason: 'UCX unavailable' }
        : cudaTransports
          ? {}
          : {
              cudaTransportsReason:
                raw.ucx.transportReason ??
                `this UCX has no CUDA transports (transports: ${raw.ucx.transports.join(', ') || 'none'}; ` +
                  `modules: ${raw.ucx.modules.join(', ') || 'none'}): GPU memory cannot move through UCX here`,
            }),
    },
    cublas: {
      available: raw.cublas.available,
      ...(raw.cublas.reason ? { reason: raw.cublas.reason } : {}),
      ...(raw.cublas.libraryPath ? { libraryPath: raw.cublas.libraryPath } : {}),
      ...(raw.cublas.available ? { version: raw.cublas.versionParts.join('.') } : {}),
      lt: {
        available: raw.cublas.lt.available,
        ...(raw.cublas.lt.reason ? { reason: raw.cublas.lt.reason } : {}),
        ...(raw.cublas.lt.libraryPath ? { libraryPath: raw.cublas.lt.libraryPath } : {}),
        ...(raw.cublas.lt.available ? { version: versionFromCode(raw.cublas.lt.versionCode, 10000) } : {}),
      },
    },
    kernels: {
      built: image.manifest.built,
      path: image.path,
      architectures: image.manifest.architectures ?? [],
      ptx: image.manifest.ptx ?? [],
      loaded: raw.kernels.loaded,
      ...(kernelsReason ? { reason: kernelsReason } : {}),
    },
  };
}

/** Probes the machine (on an addon thread; first call loads the libraries) and reports what it found. */
export async function capabilities(): Promise<Capabilities> {
  const { binding, path } = loadBinding();
  const fatbin = readKernelImage();
  const raw = await binding.probe({ libraries: libraryCandidates(), ...(fatbin ? { fatbin } : {}) });
  return assembleCapabilities(raw, { path, version: binding.addonVersion, napi: binding.napiVersion });
}
