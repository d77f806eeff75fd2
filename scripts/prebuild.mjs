#!/usr/bin/env node
// Makes prebuilds/linux-x64/tandem.node, the addon the package ships so that installing it compiles nothing:
// prebuildify (N-API 9, stripped) for the platform it runs on. node-gyp-build (the package's install script and
// lib/native/binding.ts) loads it wherever build/Release/tandem.node is absent, as in an installed package.
//
// prebuildify runs `node-gyp rebuild` and moves the result out of build/Release, so it works in a scratch copy
// (build-prebuild/: binding.gyp, package.json, links to native/ and node_modules/) and never touches the
// working tree's build/, which tests running beside a `npm pack` may be loading.
//
// Skipped when the prebuild is there and its inputs hash to the stamp of the last build: binding.gyp,
// native/src/**, the package's name and version (compiled in), node-addon-api's version, the UCX headers the
// compiler sees (the UCX backend is compiled only with them) and the prebuildify arguments. Run through npm
// (`npm run build:prebuild`, `npm pack`): node-gyp takes the Node headers from npm's `nodedir` setting.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
  copyFileSync,
} from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const tuple = `${process.platform}-${process.arch}`;
const prebuildifyArgs = ['--napi', '--strip', '--target', 'node@20.17.0'];
const scratch = join(root, 'build-prebuild');
const stampPath = join(scratch, 'inputs.sha256');
const target = join(root, 'prebuilds', tuple, 'tandem.node');

function filesUnder(dir) {
  return readdirSync(dir, { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name))
    .sort();
}

/** The UCX version the C++ compiler finds headers for, or 'none'. */
function ucxHeaders() {
  const cxx = process.env.CXX || 'c++';
  const r = spawnSync(cxx, ['-E', '-P', '-x', 'c++', '-'], {
    input: '#include <ucp/api/ucp_version.h>\nUCP_API_MAJOR UCP_API_MINOR\n',
    encoding: 'utf8',
  });
  return r.status === 0 ? r.stdout.trim().split('\n').pop() : 'none';
}

function inputsHash() {
  const h = createHash('sha256');
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
  const addonApi = JSON.parse(readFileSync(join(root, 'node_modules', 'node-addon-api', 'package.json'), 'utf8'));
  h.update(
    JSON.stringify({ tuple, prebuildifyArgs, name: pkg.name, version: pkg.version, addonApi: addonApi.version }),
  );
  h.update(`ucx ${ucxHeaders()}\n`);
  for (const file of [join(root, 'binding.gyp'), ...filesUnder(join(root, 'native', 'src'))]) {
    h.update(`${relative(root, file)}\n`);
    h.update(readFileSync(file));
  }
  return h.digest('hex');
}

const sha256 = (file) => createHash('sha256').update(readFileSync(file)).digest('hex');

/** Loads the addon in a child process: a binary that cannot load (or crashes loading) is never shipped. */
function selfTest(file) {
  const r = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(file)})`], { encoding: 'utf8' });
  if (r.status !== 0)
    throw new Error(`the prebuild ${file} does not load: ${(r.stderr || '').trim() || `exit ${r.status}`}`);
}

const inputs = inputsHash();
if (existsSync(target) && existsSync(stampPath)) {
  const [stampInputs, stampOutput] = readFileSync(stampPath, 'utf8').trim().split(' ');
  if (stampInputs === inputs && stampOutput === sha256(target)) {
    selfTest(target);
    console.log(`tandem: prebuild up to date: ${relative(root, target)}`);
    process.exit(0);
  }
}

rmSync(scratch, { recursive: true, force: true });
mkdirSync(scratch, { recursive: true });
copyFileSync(join(root, 'binding.gyp'), join(scratch, 'binding.gyp'));
copyFileSync(join(root, 'package.json'), join(scratch, 'package.json'));
symlinkSync(join(root, 'native'), join(scratch, 'native'));
symlinkSync(join(root, 'node_modules'), join(scratch, 'node_modules'));

const prebuildify = join(root, 'node_modules', 'prebuildify', 'bin.js');
console.log(`tandem: prebuildify ${prebuildifyArgs.join(' ')} (in ${relative(root, scratch)}/)`);
const r = spawnSync(process.execPath, [prebuildify, ...prebuildifyArgs, '--cwd', scratch], { stdio: 'inherit' });
if (r.status !== 0) {
  console.error(`tandem: prebuildify failed (exit ${r.status ?? r.signal}); the compiler output above says why`);
  process.exit(1);
}
const built = join(scratch, 'prebuilds', tuple, 'tandem.node');
selfTest(built);
mkdirSync(dirname(target), { recursive: true });
// Copy then rename: a process loading the old prebuild never sees half a file.
const partial = `${target}.${process.pid}.partial`;
copyFileSync(built, partial);
renameSync(partial, target);
writeFileSync(stampPath, `${inputs} ${sha256(target)}\n`);
console.log(`tandem: prebuild -> ${relative(root, target)}`);
