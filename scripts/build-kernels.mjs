#!/usr/bin/env node
// Builds native/kernels/*.cu into build-kernels/tandem_kernels.fatbin with CMake (see CMakeLists.txt).
// Without nvcc or cmake it still succeeds, writes a manifest that says why, and prints that.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const out = join(root, 'build-kernels');
mkdirSync(out, { recursive: true });

function run(args) {
  const r = spawnSync('cmake', args, { cwd: root, stdio: 'inherit' });
  if (r.error) return { ok: false, why: `cmake could not run: ${r.error.message}` };
  return { ok: r.status === 0, why: `cmake ${args[0]} exited with ${r.status}` };
}

function manifestSaysBuilt() {
  try {
    return JSON.parse(readFileSync(join(out, 'tandem_kernels.json'), 'utf8')).built === true;
  } catch {
    return false;
  }
}

// Configure once, and again while the manifest says the kernels were not built (nvcc may have come since);
// `cmake --build` configures again by itself when CMakeLists.txt changes. Configuring rewrites the manifest that
// `tandem info` reads, so an up-to-date build (as `npm pack` runs it) leaves every file as it was.
let result = { ok: true };
if (!existsSync(join(out, 'CMakeCache.txt')) || !manifestSaysBuilt())
  result = run(['-S', root, '-B', out, '-DCMAKE_BUILD_TYPE=Release']);
if (result.ok) result = run(['--build', out, '--parallel', '2']);
if (!result.ok) {
  if (result.why.startsWith('cmake could not run')) {
    writeFileSync(join(out, 'tandem_kernels.json'), JSON.stringify({ built: false, reason: result.why }) + '\n');
    console.warn(`tandem: kernels not built (${result.why}); install cmake and nvcc to build them`);
    process.exit(0);
  }
  console.error(`tandem: kernel build failed (${result.why})`);
  process.exit(1);
}
const manifest = JSON.parse(readFileSync(join(out, 'tandem_kernels.json'), 'utf8'));
if (manifest.built) {
  console.log(
    `tandem: kernels built for ${manifest.architectures.join(', ')} + PTX ${manifest.ptx.join(', ')} -> build-kernels/tandem_kernels.fatbin`,
  );
} else {
  console.warn(`tandem: kernels not built: ${manifest.reason}`);
}
