/**
 * The package as a user gets it: `npm pack` after the README's set-up, then the tarball installed into an empty
 * project by a shell whose PATH holds node, npm, npx and sh and nothing else (no gcc, g++, cc, make, python3 or
 * node-gyp), then imported and run. Proves that the tarball ships the prebuilt addon and the kernel fatbin, that
 * installing it compiles nothing, and that the installed package finds both from its own folder.
 *
 * Time: the pack is quick when the prebuild is up to date (.ci/run makes it); otherwise prebuildify compiles the
 * addon once (a minute or two on two cores). Installing the tarball's dependencies reads the npm cache
 * (--prefer-offline) and the registry for what the cache lacks.
 */
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  realpathSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { packageRoot } from '../lib/native/paths.js';

const work = mkdtempSync(join(tmpdir(), 'tandem-package-'));
const app = join(work, 'app');
const bin = join(work, 'bin');

/** The env of a user's shell: no npm lifecycle variables, no TANDEM_* overrides, a PATH of `bin` only. */
function userEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { PATH: bin };
  for (const key of [
    'HOME',
    'USER',
    'TMPDIR',
    'LANG',
    'npm_config_cache',
    'npm_config_registry',
    'npm_config_userconfig',
  ])
    if (process.env[key] !== undefined) env[key] = process.env[key];
  return env;
}

function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv, timeoutMs: number) {
  const r: SpawnSyncReturns<string> = spawnSync(cmd, args, { cwd, env, encoding: 'utf8', timeout: timeoutMs });
  return { status: r.status, out: `${r.stdout ?? ''}${r.stderr ?? ''}`, stdout: r.stdout ?? '', error: r.error };
}

const inTreeKernels = JSON.parse(readFileSync(join(packageRoot, 'build-kernels', 'tandem_kernels.json'), 'utf8')) as {
  built: boolean;
};
let tarball = '';
let installed = '';

beforeAll(() => {
  mkdirSync(bin);
  mkdirSync(app);
  for (const tool of ['node', 'npm', 'npx', 'sh']) {
    const found = spawnSync('sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).stdout.trim();
    if (!found) throw new Error(`${tool} is not on PATH`);
    symlinkSync(found, join(bin, tool));
  }
  // Pieces this machine cannot build are allowed to be missing (the assertions below follow suit).
  const without = ['ucx', ...(inTreeKernels.built ? [] : ['kernels'])];
  const env = { ...process.env, TANDEM_PACK_WITHOUT: without.join(',') };
  const pack = run('npm', ['pack', '--pack-destination', work], packageRoot, env, 300_000);
  expect(pack.status, pack.out).toBe(0);
  const tgz = readdirSync(work).filter((f) => f.endsWith('.tgz'));
  expect(tgz).toHaveLength(1);
  tarball = join(work, tgz[0]!);
  installed = join(app, 'node_modules', 'tandem');
}, 330_000);

afterAll(() => rmSync(work, { recursive: true, force: true }));

describe('the packed package', () => {
  it('holds the prebuilt addon, the kernels, dist/ and the sources to rebuild, and nothing of the tests', () => {
    const list = spawnSync('tar', ['-tzf', tarball], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
    const files = new Set(list.map((f) => f.replace(/^package\//, '')));
    for (const f of [
      'package.json',
      'prebuilds/linux-x64/tandem.node',
      'build-kernels/tandem_kernels.json',
      'dist/index.js',
      'dist/index.d.ts',
      'dist/cli/main.js',
      'binding.gyp',
      'native/src/addon.cpp',
    ])
      expect(files, f).toContain(f);
    expect(files.has('build-kernels/tandem_kernels.fatbin')).toBe(inTreeKernels.built);
    const stray = [...files].filter((f) =>
      /^(test|bench|examples|scripts|build|build-prebuild|native\/tests|docs)\//.test(f),
    );
    expect(stray).toEqual([]);
    expect([...files].filter((f) => f.startsWith('prebuilds/'))).toEqual(['prebuilds/linux-x64/tandem.node']);
  });

  it('installs into a project on a PATH without a compiler, compiling nothing', () => {
    const noCompiler = run(
      'sh',
      ['-c', 'command -v gcc g++ cc c++ make python3 node-gyp; true'],
      app,
      userEnv(),
      10_000,
    );
    expect(noCompiler.stdout.trim(), 'the PATH of the install must hold no build tool').toBe('');
    // Approves the package's install script (npm 11's allowScripts, keyed by the tarball's path), so that it runs.
    writeFileSync(
      join(app, 'package.json'),
      JSON.stringify({ name: 'app', private: true, type: 'module', allowScripts: { [`file:${tarball}`]: true } }),
    );
    const r = run(
      'npm',
      ['install', tarball, '--prefer-offline', '--no-audit', '--no-fund', '--foreground-scripts'],
      app,
      userEnv(),
      120_000,
    );
    if (r.status !== 0 && /ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|network/i.test(r.out))
      throw new Error(
        `installing the tarball needs its dependencies from the npm registry or the npm cache, and neither had them:\n${r.out}`,
      );
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('node-gyp-build'); // the install script ran ...
    expect(r.out).not.toMatch(/gyp info|CXX\(target\)|install-scripts/); // ... compiled nothing, and was approved
    expect(existsSync(join(installed, 'build'))).toBe(false);
    expect(existsSync(join(installed, 'prebuilds', 'linux-x64', 'tandem.node'))).toBe(true);
  });

  it('imports as `tandem` and finds its addon and kernels inside the installed package', () => {
    writeFileSync(
      join(app, 'check.mjs'),
      "import { capabilities } from 'tandem';\nconst c = await capabilities();\n" +
        'console.log(JSON.stringify({ tandem: c.tandem, kernels: c.kernels }));\n',
    );
    const r = run('node', ['check.mjs'], app, userEnv(), 60_000);
    expect(r.status, r.out).toBe(0);
    const caps = JSON.parse(r.stdout) as {
      tandem: { addonPath: string };
      kernels: { built: boolean; path: string; reason?: string };
    };
    const root = realpathSync(installed);
    expect(caps.tandem.addonPath).toBe(join(root, 'prebuilds', 'linux-x64', 'tandem.node'));
    expect(caps.kernels.path).toBe(join(root, 'build-kernels', 'tandem_kernels.fatbin'));
    expect(caps.kernels.built).toBe(inTreeKernels.built);
  });

  it('runs `npx tandem info` and `npx tandem generate` from the installed package', () => {
    const info = run('npx', ['tandem', 'info'], app, userEnv(), 60_000);
    expect(info.status, info.out).toBe(0);
    expect(info.stdout).toContain(join(realpathSync(installed), 'prebuilds', 'linux-x64', 'tandem.node'));
    expect(info.stdout).toMatch(inTreeKernels.built ? /^Kernels: built for sm_90a/m : /^Kernels: not built/m);
    const args = ['generate', '--model', 'dummy:tiny', '--prompt', 'hi', '--max-tokens', '4', '--json'];
    const gen = run('npx', ['tandem', ...args], app, userEnv(), 60_000);
    expect(gen.status, gen.out).toBe(0);
    const out = JSON.parse(gen.stdout) as { tokenIds: number[]; finishReason: string };
    expect(out.tokenIds).toHaveLength(4);
    expect(out.finishReason).toBe('length');
    // Greedy on seeded dummy weights: the same tokens as the working tree's CLI.
    const here = run(
      process.execPath,
      [join(packageRoot, 'dist', 'cli', 'main.js'), ...args],
      packageRoot,
      userEnv(),
      60_000,
    );
    expect(here.status, here.out).toBe(0);
    expect(out.tokenIds).toEqual((JSON.parse(here.stdout) as { tokenIds: number[] }).tokenIds);
  });
});

describe('prepack', () => {
  const prepack = (without: string | undefined) => {
    const env = { ...process.env };
    delete env.TANDEM_PACK_WITHOUT;
    if (without !== undefined) env.TANDEM_PACK_WITHOUT = without;
    return run(process.execPath, [join(packageRoot, 'scripts', 'prepack.mjs')], packageRoot, env, 120_000);
  };

  it('refuses to pack what an installed package would miss, unless told', () => {
    const bogus = prepack('kernels,cuda');
    expect(bogus.status).toBe(1);
    expect(bogus.out).toContain("TANDEM_PACK_WITHOUT: unknown piece 'cuda'");
    const addon = readFileSync(join(packageRoot, 'prebuilds', 'linux-x64', 'tandem.node'));
    const noUcx = addon.includes('UCX headers were not present when Tandem was built');
    const strict = prepack(inTreeKernels.built ? undefined : 'kernels');
    if (noUcx) {
      expect(strict.status).toBe(1);
      expect(strict.out).toContain('the prebuilt addon has no UCX backend: install libucx-dev');
    } else expect(strict.status, strict.out).toBe(0);
    if (!inTreeKernels.built) {
      const r = prepack('ucx');
      expect(r.status).toBe(1);
      expect(r.out).toContain('no kernel fatbin to ship');
    }
  });
});
