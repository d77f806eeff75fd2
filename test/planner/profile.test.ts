import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadProfile, parseProfile, ProfileError, writeProfile } from '../../lib/planner/index.js';
import { syntheticLayout, syntheticProfile } from './synthetic.js';

const dir = mkdtempSync(join(tmpdir(), 'tandem-profile-'));

function profileError(fn: () => unknown): ProfileError {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(ProfileError);
    expect((error as ProfileError).code).toBe('TANDEM_BAD_PROFILE');
    return error as ProfileError;
  }
  throw new Error('no error thrown');
}

describe('profile file', () => {
  it('round trip: what writeProfile writes, loadProfile reads back equal', () => {
    const profile = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 1.8 })]);
    const file = join(dir, 'sub', 'p.json');
    writeProfile(file, profile);
    expect(loadProfile(file)).toEqual(profile);
  });

  it('a missing file, a file that is not JSON', () => {
    expect(profileError(() => loadProfile(join(dir, 'none.json'))).message).toBe(
      `${join(dir, 'none.json')}: cannot read the profile (ENOENT)`,
    );
    const bad = join(dir, 'bad.json');
    writeFileSync(bad, '{"format": ');
    expect(profileError(() => loadProfile(bad)).message).toMatch(/bad\.json: not JSON \(/);
  });

  it('every problem is named with its path', () => {
    const p = syntheticProfile() as unknown as Record<string, unknown>;
    const layout = (p.layouts as Record<string, unknown>[])[0]!;
    const prefill = layout.prefill as Record<string, unknown>[];
    prefill[1]!.isl = prefill[0]!.isl; // listed twice
    prefill[2]!.ms = -1;
    layout.gpusPerReplica = 2; // tp 1
    p.version = 3;
    const message = profileError(() => parseProfile(p, 'p.json')).message;
    const lines = message.split('\n');
    expect(lines).toContain('p.json: version: Invalid input: expected 2');
    expect(lines.some((l) => l.startsWith('p.json: layouts[0].prefill[2].ms: '))).toBe(true);
    expect(lines).toContain('p.json: layouts[0].gpusPerReplica: must be max(tp, ep) x pp = 1 (got 2)');
    expect(lines).toContain(`p.json: layouts[0].prefill[1].isl: isl ${prefill[0]!.isl} is listed twice`);
  });

  it('unknown fields, a duplicate layout, no decode points, min > median', () => {
    const p = syntheticProfile([syntheticLayout(), syntheticLayout()]) as unknown as Record<string, unknown>;
    p.extra = 1;
    const layouts = p.layouts as Record<string, unknown>[];
    layouts[1]!.decode = [];
    const first = (layouts[0]!.decode as { stepMs: number; stepMsMin: number }[])[0]!;
    first.stepMsMin = first.stepMs + 1;
    const lines = profileError(() => parseProfile(p, 'p.json')).message.split('\n');
    expect(lines.some((l) => l.startsWith('p.json: (top level): ') && l.includes('extra'))).toBe(true);
    expect(lines.some((l) => l.startsWith('p.json: layouts[1].decode: '))).toBe(true);
    expect(lines).toContain('p.json: layouts[0].decode[0]: must have stepMsMin <= stepMs <= stepMsMax');
  });

  it('writeProfile refuses an invalid profile and writes nothing', () => {
    const p = syntheticProfile();
    p.layouts[0]!.kvCapacityTokens = 0;
    const file = join(dir, 'never.json');
    profileError(() => writeProfile(file, p));
    profileError(() => loadProfile(file));
  });
});
