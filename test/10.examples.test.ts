import { describe, expect, it } from 'vitest';
import { runTs } from './helpers/cli.js';

// The README's two-process example must keep working as written.
describe('examples/transfer-two-process.ts', () => {
  it.each([[[]], [['--tcp']]])('runs end to end %j', (args) => {
    const r = runTs('examples/transfer-two-process.ts', args as string[]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('checked 16 blocks on notification: all correct');
    expect(r.stdout).toMatch(/16 pieces \(8 after merging adjacent ones\)/);
  });
});
