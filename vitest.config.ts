import { defineConfig } from 'vitest/config';

// Anything that loads the native addon runs in forked processes, never in worker threads of the runner.
export default defineConfig({
  test: {
    pool: 'forks',
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    reporters: ['default'],
  },
});
