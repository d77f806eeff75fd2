import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadBinding, NativeLoadError } from '../lib/index.js';
import { packageRoot } from '../lib/native/paths.js';
import { runTs } from './helpers/cli.js';

describe('native addon: loading', () => {
  it('loads through node-gyp-build and reports N-API 9', () => {
    const { binding, path } = loadBinding();
    expect(path).toMatch(/tandem\.node$/);
    expect(binding.napiVersion).toBe(9);
    expect(typeof binding.probe).toBe('function');
    expect(typeof binding.CudaDevice).toBe('function');
  });

  it('explains a missing binary named by TANDEM_ADDON', () => {
    const r = runTs('lib/cli/main.ts', ['info'], { TANDEM_ADDON: '/nonexistent/tandem.node' });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('TANDEM_ADDON points at /nonexistent/tandem.node, which does not exist');
  });

  it('explains a binary that is not a shared object, and says what to do', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-bad-addon-'));
    const bogus = join(dir, 'tandem.node');
    writeFileSync(bogus, 'this is not an ELF file');
    const r = runTs('lib/cli/main.ts', ['info'], { TANDEM_ADDON: bogus });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("Tandem's native addon could not be loaded");
    expect(r.stderr).toMatch(/npm run build:addon/);
  });

  it('with no build at all, names the places searched in the order node-gyp-build tries them', () => {
    // A package of the loader alone: package.json and binding.gyp, no build/ and no prebuilds/.
    const root = mkdtempSync(join(tmpdir(), 'tandem-no-addon-'));
    writeFileSync(join(root, 'package.json'), '{"type": "module"}');
    writeFileSync(join(root, 'binding.gyp'), '{}');
    mkdirSync(join(root, 'lib', 'native'), { recursive: true });
    for (const file of ['errors.ts', 'native/binding.ts', 'native/paths.ts'])
      copyFileSync(join(packageRoot, 'lib', file), join(root, 'lib', file));
    symlinkSync(join(packageRoot, 'node_modules'), join(root, 'node_modules'));
    writeFileSync(
      join(root, 'load.ts'),
      "import { loadBinding } from './lib/native/binding.js';\ntry { loadBinding(); } catch (e) { console.log((e as Error).message); }\n",
    );
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'load.ts')], { cwd: root, encoding: 'utf8' });
    rmSync(root, { recursive: true }); // the node_modules link goes, not what it points at
    expect(r.stdout).toContain(
      `No compiled addon for this platform (searched ${join(root, 'build', 'Release')} and ${join(root, 'prebuilds')}).`,
    );
  });

  it('loads where the addon cannot be constructed directly: DeviceBuffer needs CudaDevice.alloc', () => {
    const { binding } = loadBinding();
    const Ctor = binding.DeviceBuffer as unknown as new () => unknown;
    expect(() => new Ctor()).toThrow(/use CudaDevice.alloc/);
  });

  it('throws NativeLoadError (a typed error) for load failures', () => {
    expect(new NativeLoadError('x')).toBeInstanceOf(Error);
    expect(new NativeLoadError('x').code).toBe('TANDEM_NATIVE_LOAD');
  });
});
