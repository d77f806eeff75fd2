// StrykerJS over the policy modules (docs/mutation.md). `npm run test:mutation` (scripts/mutation.mjs) runs one
// Stryker pass per module in `mutationModules`, mutating that module only and running only its tests; this file's
// default export is what every pass shares, and what a plain `npx stryker run --mutate ... --testFiles ...` uses.
// Everything Stryker writes stays under reports/mutation/ (gitignored): the sandbox copies and the reports.

/** @type {Record<string, { mutate: string[]; testFiles: string[]; breakBelow: number | null }>} */
export const mutationModules = {
  sampler: {
    mutate: ['lib/engine/sampler.ts'],
    testFiles: ['test/engine/engine.sampler.test.ts'],
    breakBelow: 80,
  },
  'block-manager': {
    mutate: ['lib/engine/block-manager.ts'],
    testFiles: ['test/engine/engine.block-manager.test.ts'],
    breakBelow: 80,
  },
  disagg: {
    mutate: ['lib/router/disagg.ts'],
    testFiles: ['test/serve/disagg.test.ts'],
    breakBelow: 80,
  },
  // Its unit tests, with fake workers in this process (the end-to-end test's workers run in other processes, where no
  // mutant is active, and take minutes per mutant).
  router: {
    mutate: ['lib/router/router.ts'],
    testFiles: ['test/serve/router.test.ts'],
    breakBelow: 80,
  },
  // Request validation: the schemas and the rules that turn a body into a checked request. Its boundary tests, and
  // the frontend tests that reach it over HTTP (not the fuzz test: minutes per mutant).
  validation: {
    mutate: ['lib/frontend/request.ts'],
    testFiles: [
      'test/serve/frontend.validation.test.ts',
      'test/serve/frontend.test.ts',
      'test/serve/frontend.http.test.ts',
      'test/serve/frontend.engine.test.ts',
    ],
    breakBelow: 80,
  },
};

/** @type {import('@stryker-mutator/api/core').PartialStrykerOptions} */
export default {
  testRunner: 'vitest',
  plugins: ['@stryker-mutator/vitest-runner'],
  vitest: { configFile: 'vitest.mutation.config.ts', related: false },
  // Runs, for each mutant, only the tests that reached it.
  coverageAnalysis: 'perTest',
  concurrency: 2,
  timeoutMS: 10_000,
  tempDirName: 'reports/mutation/.sandbox',
  cleanTempDir: 'always',
  // Kept out of the sandbox copies: build scratch (build-prebuild/ links to node_modules/), results, reports.
  ignorePatterns: [
    'build-prebuild',
    'bench-results',
    '.gpu',
    'reports',
    'tandem-gpu-host*',
    '*.tgz',
    'isolate-*-v8.log',
  ],
  reporters: ['clear-text', 'progress', 'html', 'json'],
  htmlReporter: { fileName: 'reports/mutation/mutation.html' },
  jsonReporter: { fileName: 'reports/mutation/mutation.json' },
};
