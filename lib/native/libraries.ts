/**
 * Where the optional native libraries are looked for. Each list is tried in order; a bare soname goes
 * through the dynamic loader's own search (LD_LIBRARY_PATH, ld.so.cache), a path is opened as is.
 *
 * Overrides, tried first (a file, or a folder that holds the library; several separated by ':'):
 *   TANDEM_LIBCUDA      libcuda.so.1 (the CUDA driver)
 *   TANDEM_LIBNVML      libnvidia-ml.so.1 (NVLink topology)
 *   TANDEM_LIBNCCL      libnccl.so.2
 *   TANDEM_LIBUCP       libucp.so.0 (UCX)
 *   TANDEM_LIBCUBLAS    libcublas.so.13 / .12
 *   TANDEM_LIBCUBLASLT  libcublasLt.so.13 / .12
 * CUDA_HOME (or CUDA_PATH) adds $CUDA_HOME/lib64 for the toolkit libraries (cuBLAS, NCCL).
 */
import { statSync } from 'node:fs';
import { join } from 'node:path';
import type { RawLibraryCandidates } from './binding.js';

export const LIBRARY_ENV = {
  cuda: 'TANDEM_LIBCUDA',
  nvml: 'TANDEM_LIBNVML',
  nccl: 'TANDEM_LIBNCCL',
  ucp: 'TANDEM_LIBUCP',
  cublas: 'TANDEM_LIBCUBLAS',
  cublasLt: 'TANDEM_LIBCUBLASLT',
} as const satisfies Record<keyof RawLibraryCandidates, string>;

const SONAMES: Record<keyof RawLibraryCandidates, string[]> = {
  cuda: ['libcuda.so.1'],
  nvml: ['libnvidia-ml.so.1'],
  nccl: ['libnccl.so.2'],
  ucp: ['libucp.so.0'],
  cublas: ['libcublas.so.13', 'libcublas.so.12'],
  cublasLt: ['libcublasLt.so.13', 'libcublasLt.so.12'],
};

const DRIVER_DIRS = [
  '/usr/lib/x86_64-linux-gnu',
  '/usr/lib64',
  '/usr/lib',
  '/usr/local/nvidia/lib64',
  '/usr/lib/wsl/lib',
];
const TOOLKIT_DIRS = ['/usr/local/cuda/lib64', '/usr/lib/x86_64-linux-gnu', '/usr/lib64'];

function isDirectory(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
  }
}

function expand(entry: string, sonames: string[]): string[] {
  return isDirectory(entry) ? sonames.map((name) => join(entry, name)) : [entry];
}

export function libraryCandidates(env: NodeJS.ProcessEnv = process.env): RawLibraryCandidates {
  const cudaHome = env.CUDA_HOME ?? env.CUDA_PATH;
  const toolkitDirs = [...(cudaHome ? [join(cudaHome, 'lib64')] : []), ...TOOLKIT_DIRS];
  const build = (key: keyof RawLibraryCandidates, dirs: string[]): string[] => {
    const sonames = SONAMES[key];
    const override = env[LIBRARY_ENV[key]];
    const fromEnv = override
      ? override
          .split(':')
          .filter(Boolean)
          .flatMap((e) => expand(e, sonames))
      : [];
    const fromDirs = dirs.flatMap((dir) => sonames.map((name) => join(dir, name)));
    return [...new Set([...fromEnv, ...sonames, ...fromDirs])];
  };
  return {
    cuda: build('cuda', DRIVER_DIRS),
    nvml: build('nvml', DRIVER_DIRS),
    nccl: build('nccl', toolkitDirs),
    ucp: build('ucp', ['/usr/lib/x86_64-linux-gnu', '/usr/lib64', '/opt/ucx/lib']),
    cublas: build('cublas', toolkitDirs),
    cublasLt: build('cublasLt', toolkitDirs),
  };
}
