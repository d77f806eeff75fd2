import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadBinding, NativeLoadError } from '../lib/index.js';
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
