import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

// bench/micro/attention_torch.py (PyTorch's SDPA backends on attention.cu's prefill shape, for issue 22's cuDNN
// question) runs only where torch and a GPU are; here its refusals: bad arguments before anything is imported, and
// a machine without torch or without a GPU, each with exit code 2 and a line that says why, not a traceback.
const packageRoot = join(import.meta.dirname, '..', '..');
const script = join(packageRoot, 'bench/micro/attention_torch.py');
const python = spawnSync('python3', ['--version']).status === 0;
const run = (args: string[]) => spawnSync('python3', [script, ...args], { encoding: 'utf8', timeout: 120_000 });

describe.skipIf(!python)('bench/micro/attention_torch.py', () => {
  it.each([
    [['--tokens', '0'], /argument --tokens: token counts must be 1 to 131072, got '0'/],
    [['--tokens', '512,x'], /argument --tokens: expected a comma-separated list of token counts, got '512,x'/],
    [['--repeats', '0'], /--repeats must be 1 to 1000, got 0/],
    [['--bogus'], /unrecognized arguments: --bogus/],
  ])('refuses %j with exit code 2 and says why', (args, message) => {
    const r = run(args);
    expect(r.status).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(message);
    expect(r.stderr).not.toContain('Traceback');
  });

  it.skipIf(spawnSync('python3', ['-c', 'import torch; assert torch.cuda.is_available()']).status === 0)(
    'without torch or a GPU: one line, exit code 2',
    () => {
      const r = run(['--tokens', '512', '--repeats', '1']);
      expect(r.status, r.stderr).toBe(2);
      expect(r.stdout).toBe('');
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/^attention_torch: (cannot import torch: |no CUDA GPU visible to torch)/);
    },
  );
});
