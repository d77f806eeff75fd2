#!/usr/bin/env node
// npm run bundle:gpu-host [-- --out DIR] [-- --no-node]
//
// Makes tandem-gpu-host.tar.xz: one self-contained folder for an x86-64 GPU host with no Node.js and
// no network. It holds a Node runtime, the production node_modules plus the test runner (vitest) and
// tsx, the built addon and kernel fatbin, dist/, the TypeScript sources the tests import, the GPU
// tests and the benchmarks. On the host:
//
//   tar xJf tandem-gpu-host.tar.xz && cd tandem-gpu-host
//   ./run test:gpu             # npm run test:gpu
//   ./run bench:transfer       # npm run bench:transfer (arguments pass through); bench:collectives, bench:engine,
//                              # bench:engine-ab, bench:start, bench:eplb too
//   ./run profile:engine OUT   # scripts/profile-engine.sh: ncu profiles of one forward per case (needs ncu)
//   ./run info                 # tandem info
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const outDir = args.includes('--out') ? args[args.indexOf('--out') + 1] : root;
const withNode = !args.includes('--no-node');
const name = 'tandem-gpu-host';
const stage = join(outDir, name);
const LIMIT = 60 * 2 ** 20;

function need(path, hint) {
  if (!existsSync(join(root, path))) {
    console.error(`bundle:gpu-host: ${path} is missing; ${hint}`);
    process.exit(1);
  }
}
need('dist/index.js', 'run `npm run build:ts` first');
const require = createRequire(join(root, 'package.json'));
const addon = require('node-gyp-build').resolve(root);
need('build-kernels/tandem_kernels.json', 'run `npm run build:kernels` first');
const manifest = JSON.parse(readFileSync(join(root, 'build-kernels/tandem_kernels.json'), 'utf8'));
if (!manifest.built)
  console.warn(`bundle:gpu-host: WARNING: kernels not built (${manifest.reason}); GPU tests will fail`);

rmSync(stage, { recursive: true, force: true });
mkdirSync(stage, { recursive: true });
const copy = (from, to = from) => cpSync(join(root, from), join(stage, to), { recursive: true, dereference: true });

for (const path of [
  'package.json',
  'dist',
  'lib',
  'bench',
  'test',
  'vitest.config.ts',
  'vitest.gpu.config.ts',
  'tsconfig.json',
  'binding.gyp',
  'scripts/ncu-summary.ts',
  'scripts/profile-engine.sh',
  // The kernels' sources, for the micro benchmarks that include them (bench/micro/attention.cu: nvcc on the host).
  'native/kernels',
])
  copy(path);
copy(relative(root, addon), join('build', 'Release', 'tandem.node'));
for (const f of ['tandem_kernels.fatbin', 'tandem_kernels.json']) {
  if (existsSync(join(root, 'build-kernels', f))) copy(join('build-kernels', f));
}

// node_modules: the closure of the production dependencies plus vitest, tsx and the chart library, resolved the way Node
// resolves them (nested node_modules first, then up the tree).
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const roots = [...Object.keys(pkg.dependencies ?? {}), 'vitest', 'tsx', 'vega', 'vega-lite', 'openai'];
const seen = new Set();
function locate(name, fromDir) {
  let dir = fromDir;
  for (;;) {
    const candidate = join(dir, 'node_modules', name);
    if (existsSync(join(candidate, 'package.json'))) return candidate;
    if (dir === root || dir === dirname(dir)) return undefined;
    dir = dirname(dir);
  }
}
function visit(name, fromDir, optional) {
  const dir = locate(name, fromDir);
  if (!dir) {
    if (!optional) throw new Error(`bundle:gpu-host: cannot resolve ${name} from ${fromDir}`);
    return;
  }
  if (seen.has(dir)) return;
  seen.add(dir);
  const p = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
  for (const dep of Object.keys(p.dependencies ?? {})) visit(dep, dir, false);
  for (const dep of Object.keys(p.optionalDependencies ?? {})) visit(dep, dir, true);
  for (const [dep, meta] of Object.entries(p.peerDependenciesMeta ?? {})) if (!meta.optional) visit(dep, dir, true);
  for (const dep of Object.keys(p.peerDependencies ?? {}))
    if (!(p.peerDependenciesMeta ?? {})[dep]?.optional) visit(dep, dir, true);
}
for (const r of roots) visit(r, root, false);
for (const dir of seen) cpSync(dir, join(stage, relative(root, dir)), { recursive: true, dereference: true });
// node_modules/.bin is not needed: ./run calls the entry points directly.

if (withNode) {
  const nodeOut = join(stage, 'node');
  cpSync(process.execPath, nodeOut);
  const strip = spawnSync('strip', [nodeOut]);
  if (strip.status !== 0) console.warn('bundle:gpu-host: strip unavailable; the Node binary stays unstripped');
  chmodSync(nodeOut, 0o755);
}

writeFileSync(
  join(stage, 'run'),
  `#!/usr/bin/env bash
# Runs Tandem's GPU tests and benchmarks with the Node runtime in this folder. See README.md.
set -euo pipefail
here="$(cd "$(dirname "\${BASH_SOURCE[0]}")" && pwd)"
node="$here/node"; [ -x "$node" ] || node="$(command -v node)"
export NCCL_NVLS_ENABLE="\${NCCL_NVLS_ENABLE:-0}"
cd "$here"
cmd="\${1:-}"; shift || true
case "$cmd" in
  test:gpu) exec "$node" node_modules/vitest/vitest.mjs run --config vitest.gpu.config.ts "$@" ;;
  test) exec "$node" node_modules/vitest/vitest.mjs run "$@" ;;
  bench:transfer) exec "$node" --import tsx bench/transfer.ts "$@" ;;
  bench:collectives) exec "$node" --import tsx bench/collectives.ts "$@" ;;
  bench:engine) exec "$node" --import tsx bench/engine.ts "$@" ;;
  bench:engine-ab) exec "$node" --import tsx bench/engine-ab.ts "$@" ;;
  bench:start) exec "$node" --import tsx bench/start.ts "$@" ;;
  bench:eplb) exec "$node" --import tsx bench/eplb.ts "$@" ;;
  profile:engine) NODE="$node" exec bash scripts/profile-engine.sh "$@" ;;
  info) exec "$node" dist/cli/main.js info "$@" ;;
  node) exec "$node" "$@" ;;
  *) echo "usage: ./run test:gpu | bench:transfer [--quick] [--json FILE] | bench:collectives [--quick] [--json FILE] | bench:engine [--quick] [--json FILE] | bench:engine-ab --variants 'NAME=VALUE;...' [-- bench:engine options] | bench:start --dir DIR [--model dummy:PRESET] [--runs N] | bench:eplb [--device cuda] [--quick] [--out FILE] | profile:engine OUT [CASE...] | info [--json] | node ARGS" >&2; exit 2 ;;
esac
`,
);
chmodSync(join(stage, 'run'), 0o755);

const tarball = join(outDir, `${name}.tar.xz`);
execFileSync('tar', ['-C', outDir, '-cf', tarball, '--use-compress-program=xz -T0 -6', name], { stdio: 'inherit' });
const size = statSync(tarball).size;
console.log(`bundle:gpu-host: ${tarball} (${(size / 2 ** 20).toFixed(1)} MiB, ${seen.size} packages)`);
if (size > LIMIT) {
  console.error(`bundle:gpu-host: the tarball is over the 60 MiB limit`);
  process.exit(1);
}
