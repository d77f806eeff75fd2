import { defineConfig, mergeConfig } from 'vitest/config';
import base from './vitest.config.js';

// Stryker's runs (npm run test:mutation): the same tests, with room for instrumented code, which runs many times
// slower than plain code in the sampler's loops.
export default mergeConfig(base, defineConfig({ test: { testTimeout: 600_000, hookTimeout: 600_000 } }));
