/**
 * The GPU kernel fatbin built by CMake (`npm run build:kernels`) and its manifest. TANDEM_KERNELS
 * overrides the fatbin's path (its manifest is looked for beside it, same name with .json).
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { packageRoot } from './paths.js';

export interface KernelManifest {
  built: boolean;
  reason?: string;
  nvcc?: string;
  architectures?: string[];
  ptx?: string[];
  sources?: string[];
}

export interface KernelImage {
  path: string;
  present: boolean;
  manifest: KernelManifest;
}

export function kernelImage(env: NodeJS.ProcessEnv = process.env): KernelImage {
  const path = env.TANDEM_KERNELS ?? join(packageRoot, 'build-kernels', 'tandem_kernels.fatbin');
  const manifestPath = path.replace(/\.fatbin$/, '') + '.json';
  let manifest: KernelManifest;
  if (existsSync(manifestPath)) {
    try {
      manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as KernelManifest;
    } catch (error) {
      manifest = { built: false, reason: `unreadable manifest ${manifestPath}: ${(error as Error).message}` };
    }
  } else {
    manifest = { built: false, reason: `no kernel build found at ${path} (run \`npm run build:kernels\`)` };
  }
  const present = existsSync(path);
  if (!present && manifest.built) {
    manifest = { ...manifest, built: false, reason: `the manifest says built, but ${path} is missing` };
  }
  return { path, present, manifest };
}

export function readKernelImage(image: KernelImage = kernelImage()): Uint8Array | undefined {
  return image.present ? new Uint8Array(readFileSync(image.path)) : undefined;
}
