#!/usr/bin/env node
// `npm run test:mutation [-- MODULE ...]`: mutation testing of the policy modules with StrykerJS, one pass per
// module (stryker.config.mjs: `mutationModules`), each mutating that module and running only its tests. Prints a
// summary (score = killed and timed-out mutants over all mutants that ran or had no test reach them) and the time of
// each pass; exits 1 when a module with `breakBelow` scores under it. Reports: reports/mutation/<module>/.
import { Stryker } from '@stryker-mutator/core';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { mutationModules } from '../stryker.config.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
process.chdir(root);
const names = process.argv.slice(2);
for (const name of names) {
  if (!(name in mutationModules)) {
    console.error(`test:mutation: unknown module '${name}' (known: ${Object.keys(mutationModules).join(', ')})`);
    process.exit(2);
  }
}

const rows = [];
for (const name of names.length > 0 ? names : Object.keys(mutationModules)) {
  const { mutate, testFiles, breakBelow } = mutationModules[name];
  const started = Date.now();
  // vitest.mutation.config.ts runs only these (see there why not Stryker's `testFiles`).
  process.env.TANDEM_MUTATION_TEST_FILES = testFiles.join(',');
  const results = await new Stryker({
    mutate,
    htmlReporter: { fileName: `reports/mutation/${name}/mutation.html` },
    jsonReporter: { fileName: `reports/mutation/${name}/mutation.json` },
  }).runMutationTest();
  const count = (status) => results.filter((r) => r.status === status).length;
  const detected = count('Killed') + count('Timeout');
  const undetected = count('Survived') + count('NoCoverage');
  const score = detected + undetected > 0 ? (100 * detected) / (detected + undetected) : 100;
  rows.push({
    module: name,
    mutants: results.length,
    killed: count('Killed'),
    timeout: count('Timeout'),
    survived: count('Survived'),
    noCoverage: count('NoCoverage'),
    errors: count('CompileError') + count('RuntimeError'),
    score: Number(score.toFixed(1)),
    seconds: Math.round((Date.now() - started) / 1000),
    breakBelow,
  });
}
console.table(rows);
const failed = rows.filter((r) => r.breakBelow !== null && r.score < r.breakBelow);
for (const r of failed) console.error(`test:mutation: ${r.module} scored ${r.score}%, under ${r.breakBelow}%`);
process.exit(failed.length > 0 ? 1 : 0);
