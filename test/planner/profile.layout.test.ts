/**
 * Profiles of several parallel layouts (issue 27): format version 2 counts a layout's devices as its ranks
 * (max(tp, ep) x pp) and records the layouts left out; a version 1 file (one TP 1 layout, no skippedLayouts) is
 * still read. Measured: the CPU engine's ranks, one entry per layout the model allows.
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  layoutGrid,
  loadProfile,
  measureProfile,
  parseProfile,
  planCapacity,
  ProfileError,
  PROFILE_VERSION,
} from '../../lib/planner/index.js';
import { BadArgumentError } from '../../lib/errors.js';
import { syntheticLayout, syntheticProfile } from './synthetic.js';

const dir = mkdtempSync(join(tmpdir(), 'tandem-profile-layout-'));

/** A profile as `tandem profile` wrote it at version 1: the same layouts, no skippedLayouts. */
function versionOne() {
  const { skippedLayouts: _, ...rest } = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2 })]);
  return { ...rest, version: 1 };
}

describe('profile format version 2', () => {
  it('a version 1 file is still read, as version 2 with no layouts skipped, and plans the same', () => {
    expect(PROFILE_VERSION).toBe(2);
    const file = join(dir, 'v1.json');
    writeFileSync(file, JSON.stringify(versionOne()));
    const read = loadProfile(file);
    expect(read.version).toBe(2);
    expect(read.skippedLayouts).toEqual([]);
    expect(read.layouts).toEqual(versionOne().layouts);
    const request = { rate: 10, isl: 1024, osl: 256, ttftMs: 500, itlMs: 30, gpus: 64 };
    const v2 = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2 })]);
    expect(planCapacity(read, request)).toEqual(planCapacity(v2, request));
  });

  it('a version 1 file is validated by version 1 rules (devices tp x pp); version 2 needs skippedLayouts', () => {
    const v1 = versionOne() as unknown as { layouts: { gpusPerReplica: number }[] };
    v1.layouts[1]!.gpusPerReplica = 3;
    expect(() => parseProfile(v1, 'v1.json')).toThrow(
      new ProfileError('v1.json: layouts[1].gpusPerReplica: must be tp x pp = 2 (got 3)'),
    );
    const { skippedLayouts: _, ...noSkipped } = syntheticProfile();
    expect(() => parseProfile(noSkipped, 'v2.json')).toThrow(ProfileError);
  });

  it('version 2 counts ranks: an expert-parallel layout takes max(tp, ep) x pp devices', () => {
    const layout = { ...syntheticLayout(), parallelism: { tp: 1, pp: 2, ep: 4 }, gpusPerReplica: 8 };
    expect(parseProfile(syntheticProfile([layout])).layouts[0]!.gpusPerReplica).toBe(8);
    expect(() => parseProfile(syntheticProfile([{ ...layout, gpusPerReplica: 2 }]), 'p.json')).toThrow(
      new ProfileError('p.json: layouts[0].gpusPerReplica: must be max(tp, ep) x pp = 8 (got 2)'),
    );
  });

  it('layoutGrid: every combination of the sizes listed; bad sizes are a BadArgumentError', () => {
    expect(layoutGrid({ tp: [2, 1], pp: [1, 2] })).toEqual([
      { tp: 1, pp: 1, ep: 1 },
      { tp: 1, pp: 2, ep: 1 },
      { tp: 2, pp: 1, ep: 1 },
      { tp: 2, pp: 2, ep: 1 },
    ]);
    expect(layoutGrid({})).toEqual([{ tp: 1, pp: 1, ep: 1 }]);
    expect(() => layoutGrid({ tp: [0] })).toThrow(BadArgumentError);
    expect(() => layoutGrid({ ep: [] })).toThrow(BadArgumentError);
  });
});

describe('measureProfile over layouts (CPU ranks)', () => {
  const sweep = { isl: [32, 64], batch: [1, 2], context: [64], repeats: 1, decodeSteps: 2 };

  it('one entry per layout the model allows, with its ranks; the others left out with the reason', async () => {
    const skipped: string[] = [];
    const profile = await measureProfile({
      model: 'dummy:tiny',
      device: 'cpu',
      sweep,
      layouts: layoutGrid({ tp: [1, 2, 3], pp: [1, 2] }),
      onSkipLayout: (layout, why) => skipped.push(`${layout}: ${why}`),
    });
    expect(profile.layouts.map((l) => [l.parallelism, l.gpusPerReplica])).toEqual([
      [{ tp: 1, pp: 1, ep: 1 }, 1],
      [{ tp: 1, pp: 2, ep: 1 }, 2],
      [{ tp: 2, pp: 1, ep: 1 }, 2],
      [{ tp: 2, pp: 2, ep: 1 }, 4],
    ]);
    for (const l of profile.layouts) {
      expect(l.prefill.map((p) => p.isl)).toEqual([32, 64]);
      expect(l.decode.map((d) => d.batch)).toEqual([1, 2]);
    }
    const reason = "dummy:tiny: tensor parallel size 3 does not divide the model's 4 attention heads";
    expect(profile.skippedLayouts).toEqual([
      { parallelism: { tp: 3, pp: 1, ep: 1 }, reason },
      { parallelism: { tp: 3, pp: 2, ep: 1 }, reason },
    ]);
    expect(skipped).toEqual([`tp3: ${reason}`, `tp3pp2: ${reason}`]);
  }, 120_000);

  it('no layout the model allows: a BadArgumentError naming each reason', async () => {
    const failed = measureProfile({ model: 'dummy:tiny', device: 'cpu', sweep, layouts: [{ tp: 3 }, { ep: 2 }] });
    await expect(failed).rejects.toThrow(BadArgumentError);
    await expect(failed).rejects.toThrow(
      /^no layout asked for fits dummy:tiny: tp3: .*attention heads; tp1ep2: .*needs a mixture-of-experts model/,
    );
  });
});
