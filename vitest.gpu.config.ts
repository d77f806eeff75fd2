import { defineConfig } from 'vitest/config';

// `npm run test:gpu`: the GPU tests, on a GPU host. TANDEM_REQUIRE_GPU turns "no GPU here, skipped" into
// a failure, so a GPU host whose driver is broken cannot pass by skipping.
export default defineConfig({
  test: {
    pool: 'forks',
    include: ['test/gpu/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    env: { TANDEM_REQUIRE_GPU: '1' },
    fileParallelism: false,
  },
});
