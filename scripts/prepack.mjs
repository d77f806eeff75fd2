#!/usr/bin/env node
// `npm pack` and `npm publish` run this first, then `prepare` (tsc, kernels). An installed package must work on
// a GPU host with no compiler and no nvcc, so the tarball ships the addon prebuilt (scripts/prebuild.mjs) and the
// kernel fatbin, as node-llama-cpp and better-sqlite3 ship theirs. Packing stops when one is missing, or when the
// addon was compiled without UCX headers (it would have no UCX backend wherever it is installed), unless
// TANDEM_PACK_WITHOUT names the missing pieces: a comma-separated list of `kernels` and `ucx`.
//
// Each step leaves up-to-date outputs untouched, so tests that load them while a pack runs are not disturbed.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, unlinkSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const pieces = ['kernels', 'ucx'];
const without = new Set(
  (process.env.TANDEM_PACK_WITHOUT ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean),
);
for (const p of without) {
  if (!pieces.includes(p)) fail(`TANDEM_PACK_WITHOUT: unknown piece '${p}' (known: ${pieces.join(', ')})`);
}

function fail(message) {
  console.error(`tandem pack: ${message}`);
  process.exit(1);
}

function runScript(script) {
  const r = spawnSync(process.execPath, [join(root, 'scripts', script)], { stdio: 'inherit', cwd: root });
  if (r.status !== 0) fail(`scripts/${script} failed (exit ${r.status ?? r.signal})`);
}

// Kernels.
runScript('build-kernels.mjs');
const manifest = JSON.parse(readFileSync(join(root, 'build-kernels', 'tandem_kernels.json'), 'utf8'));
if (!manifest.built || !existsSync(join(root, 'build-kernels', 'tandem_kernels.fatbin'))) {
  const why = manifest.reason ?? 'the fatbin is missing';
  if (!without.has('kernels'))
    fail(
      `no kernel fatbin to ship (${why}). Install nvcc (CUDA 12.8 or newer) and cmake, or set TANDEM_PACK_WITHOUT=kernels`,
    );
  console.warn(`tandem pack: packing without GPU kernels (${why}); the manifest that says so is packed`);
}

// The prebuilt addon.
runScript('prebuild.mjs');
const addon = readFileSync(join(root, 'prebuilds', `${process.platform}-${process.arch}`, 'tandem.node'));
// Compiled in only where native/src/transfer/ucx_backend.cpp was built without <ucp/api/ucp.h>.
if (addon.includes('UCX headers were not present when Tandem was built')) {
  if (!without.has('ucx'))
    fail('the prebuilt addon has no UCX backend: install libucx-dev, or set TANDEM_PACK_WITHOUT=ucx');
  console.warn('tandem pack: packing an addon without the UCX backend (libucx-dev was not installed)');
}

// dist/: outputs whose source is gone (tsc never deletes them) stay out of the package. `prepare` compiles next.
const dist = join(root, 'dist');
if (existsSync(dist)) {
  for (const e of readdirSync(dist, { withFileTypes: true, recursive: true })) {
    const compiled = /(\.d)?\.(js|ts)(\.map)?$/;
    if (!e.isFile() || !compiled.test(e.name)) continue;
    const file = join(e.parentPath, e.name);
    const stem = relative(dist, file).replace(compiled, '');
    if (!existsSync(join(root, 'lib', `${stem}.ts`))) {
      unlinkSync(file);
      console.log(`tandem pack: removed dist/${relative(dist, file)} (no lib/${stem}.ts)`);
    }
  }
}
