import { defineConfig } from 'vitest/config';
import { experimental_getRunnerTask, type Reporter, type RunnerTestCase, type TestModule } from 'vitest/node';
import base from './vitest.config.js';

// Stryker's runs (npm run test:mutation, scripts/mutation.mjs): the module's tests only, named in
// TANDEM_MUTATION_TEST_FILES, with room for instrumented code (many times slower than plain code in the sampler's
// loops). The test files are chosen here rather than with Stryker's `testFiles`, with which Stryker 9.6 and 10.0
// activate static mutants (module-level values) after the module has loaded, so that they always survive
// (stryker-js issue 6144).
const files = process.env.TANDEM_MUTATION_TEST_FILES?.split(',').filter(Boolean);

/**
 * A test file that could not be loaded (a mutant made a module throw on import) becomes one failed test. Stryker's
 * vitest runner (9.6 and 10.0) builds a mutant's result from the tests it collected, and such a file collects none,
 * so the mutant would count as survived (stryker-js issue 6150).
 */
class LoadFailureAsFailedTest implements Reporter {
  onTestRunEnd(testModules: ReadonlyArray<TestModule>): void {
    for (const file of testModules.map((m) => experimental_getRunnerTask(m))) {
      if (file.result?.state !== 'fail' || file.tasks.length > 0) continue;
      // Only what the runner reads from a test: its name, file, suite chain, mode and result.
      const failed: Partial<RunnerTestCase> = {
        type: 'test',
        id: `${file.id}_load`,
        name: 'loads',
        mode: 'run',
        file,
        suite: file,
        result: { state: 'fail', errors: file.result.errors },
        meta: {},
      };
      file.tasks.push(failed as RunnerTestCase);
    }
  }
}

// Not mergeConfig: it would append `include` to the base's instead of replacing it.
export default defineConfig({
  ...base,
  test: {
    ...base.test,
    ...(files ? { include: files } : {}),
    testTimeout: 600_000,
    hookTimeout: 600_000,
    reporters: ['default', new LoadFailureAsFailedTest()],
  },
});
