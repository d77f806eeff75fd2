import { defineConfig } from 'vitest/config';
import base from './vitest.config.js';

// Stryker's runs (npm run test:mutation, scripts/mutation.mjs): the module's tests only, named in
// TANDEM_MUTATION_TEST_FILES, with room for instrumented code (many times slower than plain code in the sampler's
// loops). The test files are chosen here rather than with Stryker's `testFiles`, with which Stryker 9.6 and 10.0
// activate static mutants (module-level values) after the module has loaded, so that they always survive
// (stryker-js issue 6144).
const files = process.env.TANDEM_MUTATION_TEST_FILES?.split(',').filter(Boolean);

// Not mergeConfig: it would append `include` to the base's instead of replacing it.
export default defineConfig({
  ...base,
  test: { ...base.test, ...(files ? { include: files } : {}), testTimeout: 600_000, hookTimeout: 600_000 },
});
