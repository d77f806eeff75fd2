import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { capabilities, libraryCandidates, nvlinkPerLinkGBps } from '../lib/index.js';
import { assembleCapabilities } from '../lib/capabilities/index.js';
import type { RawProbe } from '../lib/native/binding.js';
import { runTs } from './helpers/cli.js';

describe('capabilities(): this machine', () => {
  it('reports node, N-API, CPU and memory', async () => {
    const c = await capabilities();
    expect(c.schemaVersion).toBe(1);
    expect(c.node.version).toBe(process.versions.node);
    expect(c.node.napiVersion).toBeGreaterThanOrEqual(9);
    expect(c.node.addonNapiVersion).toBe(9);
    expect(c.cpu.cores).toBeGreaterThan(0);
    expect(c.cpu.memoryBytes).toBeGreaterThan(0);
  });

  it('gives a reason for everything unavailable, and a version for everything available', async () => {
    const c = await capabilities();
    for (const [name, part] of Object.entries({ cuda: c.cuda, nccl: c.nccl, ucx: c.ucx, cublas: c.cublas })) {
      if (part.available) {
        if (name !== 'cuda') expect((part as { version?: string }).version, name).toMatch(/^\d+\.\d+\.\d+$/);
      } else {
        expect(part.reason, name).toBeTruthy();
      }
    }
    if (!c.cuda.available) {
      expect(c.cuda.devices).toEqual([]);
      expect(c.kernels.loaded).toBe(false);
      expect(c.kernels.reason).toBeTruthy();
    }
  });

  it('names every searched place when libcuda is missing', async () => {
    const c = await capabilities();
    if (c.cuda.available) return; // a GPU host: covered by the GPU tests
    expect(c.cuda.reason).toMatch(/^libcuda\.so\.1 not found \(searched: libcuda\.so\.1, /);
  });

  it('reports the kernel fatbin built by CMake, with its architectures', async () => {
    const c = await capabilities();
    expect(c.kernels.path).toMatch(/tandem_kernels\.fatbin$/);
    if (c.kernels.built) {
      expect(c.kernels.architectures).toEqual(expect.arrayContaining(['sm_90a', 'sm_100a']));
      expect(c.kernels.ptx.length).toBeGreaterThan(0);
    } else {
      expect(c.kernels.reason).toBeTruthy();
    }
  });

  it('reports UCX transports when UCX is installed (CI installs libucx)', async () => {
    const c = await capabilities();
    if (!c.ucx.available) {
      expect(c.ucx.reason).toMatch(/libucp\.so\.0 not found/);
      return;
    }
    expect(c.ucx.transports).toEqual(expect.arrayContaining(['tcp']));
    expect(c.ucx.resources.some((r) => r.startsWith('tcp/'))).toBe(true);
    if (!c.ucx.cudaTransports) expect(c.ucx.cudaTransportsReason).toMatch(/no CUDA transports/);
  });
});

describe('library search paths', () => {
  it('tries TANDEM_LIB* overrides first, expanding a folder to the library names', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-libs-'));
    const c = libraryCandidates({ TANDEM_LIBNCCL: dir, TANDEM_LIBCUDA: '/opt/a/libcuda.so.1:/opt/b/libcuda.so.1' });
    expect(c.nccl[0]).toBe(join(dir, 'libnccl.so.2'));
    expect(c.cuda.slice(0, 3)).toEqual(['/opt/a/libcuda.so.1', '/opt/b/libcuda.so.1', 'libcuda.so.1']);
    expect(c.cublas).toContain('libcublas.so.13');
  });

  it('adds $CUDA_HOME/lib64 for toolkit libraries', () => {
    const c = libraryCandidates({ CUDA_HOME: '/opt/cuda-x' });
    expect(c.cublas).toContain('/opt/cuda-x/lib64/libcublas.so.13');
    expect(c.nccl).toContain('/opt/cuda-x/lib64/libnccl.so.2');
  });

  it('a TANDEM_LIBCUDA that is not a library is named in the reason (fresh process)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-fakecuda-'));
    const fake = join(dir, 'libcuda.so.1');
    writeFileSync(fake, 'not a library');
    const r = runTs('lib/cli/main.ts', ['info', '--json'], { TANDEM_LIBCUDA: fake });
    expect(r.status).toBe(0);
    const c = JSON.parse(r.stdout) as { cuda: { available: boolean; reason?: string } };
    if (c.cuda.available) return; // the real driver was found after the fake one
    expect(c.cuda.reason).toContain(fake);
    expect(c.cuda.reason).toMatch(/invalid ELF header|file too short/);
  });
});

describe('capabilities(): assembling a multi-GPU report', () => {
  const device = (ordinal: number, bus: string) => ({
    ordinal,
    name: 'NVIDIA H200',
    uuid: `GPU-0000000${ordinal}-0000-0000-0000-000000000000`,
    pciBusId: bus,
    totalMemoryBytes: 150_754_820_096,
    computeCapabilityMajor: 9,
    computeCapabilityMinor: 0,
    multiprocessors: 132,
    l2CacheBytes: 52_428_800,
    memoryBusWidthBits: 6144,
    memoryClockKHz: 3_201_000,
    virtualMemoryManagement: true,
    posixFdHandles: true,
  });
  const raw: RawProbe = {
    cuda: {
      available: true,
      libraryPath: '/usr/lib/libcuda.so.1',
      driverVersion: 13000,
      devices: [device(0, '0000:19:00.0'), device(1, '0000:3b:00.0')],
      peerAccess: [
        [true, true],
        [true, true],
      ],
      peerPerformanceRank: [
        [0, 0],
        [0, 0],
      ],
      nvlink: {
        available: true,
        links: [
          [0, 18],
          [18, 0],
        ],
        activeLinks: [18, 18],
        switchLinks: [0, 0],
        unmatchedLinks: [0, 0],
        nvmlLinkVersion: [4, 4],
      },
    },
    nccl: { available: true, libraryPath: '/usr/lib/x86_64-linux-gnu/libnccl.so.2', versionCode: 22803 },
    ucx: {
      available: true,
      versionParts: [1, 16, 0],
      transports: ['cma', 'posix', 'self', 'sysv', 'tcp'],
      resources: ['tcp/lo'],
      modules: ['cma', 'ib', 'rdmacm'],
    },
    cublas: { available: true, versionParts: [13, 1, 0], lt: { available: true, versionCode: 130100 } },
    kernels: { tried: true, loaded: true },
  };
  const c = assembleCapabilities(raw, { path: '/x/tandem.node', version: '0.1.0', napi: 9 });

  it('formats versions: driver 13.0, NCCL 2.28.3, UCX 1.16.0, cuBLAS 13.1.0', () => {
    expect(c.cuda.driverVersion).toBe('13.0');
    expect(c.nccl.version).toBe('2.28.3');
    expect(c.ucx.version).toBe('1.16.0');
    expect(c.cublas.version).toBe('13.1.0');
    expect(c.cublas.lt.version).toBe('13.1.0');
  });

  it('computes per-pair NVLink bandwidth from links x per-link rate', () => {
    expect(c.cuda.nvlink.perLinkGBps).toBe(26.5625);
    expect(c.cuda.nvlink.bandwidthGBps[0]![1]).toBeCloseTo(478.125);
    expect(c.cuda.devices[0]!.computeCapability).toBe('9.0');
    expect(c.cuda.devices[0]!.memoryBandwidthGBps).toBe(4917);
  });

  it('says why GPU memory cannot go through a UCX without CUDA transports', () => {
    expect(c.ucx.cudaTransports).toBe(false);
    expect(c.ucx.cudaTransportsReason).toMatch(/no CUDA transports.*modules: cma, ib, rdmacm/);
  });

  it('knows NVLink rates per generation', () => {
    expect(nvlinkPerLinkGBps(10)).toBe(50);
    expect(nvlinkPerLinkGBps(6)).toBeNull();
  });
});
