/**
 * scripts/ncu-summary.ts (issue 22's profiles): Nsight Compute's raw page as CSV into time per kernel class and per
 * kernel, on a sample written by hand in ncu's format (==PROF== lines, header, units row, thousands separators, mixed
 * units, n/a); scripts/profile-engine.sh's plumbing with a stand-in for ncu (the flags it passes, one process per
 * case and variant, the summaries it collects); and bench:engine's --profile-case refused where it cannot run. No GPU.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import { packageRoot } from '../../lib/native/paths.js';
import {
  formatSummary,
  kernelClass,
  parseCsv,
  parseNcuRaw,
  summarise,
  type KernelGroup,
} from '../../scripts/ncu-summary.js';
import { runTs } from '../helpers/cli.js';

const SAMPLE = readFileSync(join(packageRoot, 'test/fixtures/ncu/decode-raw.csv'), 'utf8');
const dir = mkdtempSync(join(tmpdir(), 'tandem-ncu-summary-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const byKey = (groups: KernelGroup[], key: string) => groups.find((g) => g.key === key)!;

describe('ncu raw CSV', () => {
  it('reads quoted fields with commas, doubled quotes and newlines', () => {
    expect(parseCsv('"a,b","say ""hi""",3\r\n"x\ny",,\n')).toEqual([
      ['a,b', 'say "hi"', '3'],
      ['x\ny', '', ''],
    ]);
  });

  it('reads every launch after the header and the units row, in base units', () => {
    const launches = parseNcuRaw(SAMPLE);
    expect(launches.map((l) => l.id)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    const embed = launches[0]!;
    expect(embed.name).toBe('tandem_llama_embed');
    expect(embed.time).toBeCloseTo(2e-6, 12); // usecond
    expect(embed.dramReadBytes).toBeCloseTo(0.52e6, 3); // Mbyte
    expect(embed.dramWriteBytes).toBe(1_024_000); // "1,024" Kbyte
    expect(embed.smPct).toBeCloseTo(1.5, 9);
    expect(embed.memoryPct).toBeCloseTo(3.1, 9);
    expect(launches[4]!.name).toMatch(/^void cutlass::Kernel2</);
    expect(launches[12]!.memoryPct).toBeUndefined(); // n/a
  });

  it("reads the abbreviated base units the host's ncu writes (ns, B)", () => {
    const lines = SAMPLE.split('\n');
    const units = lines.findIndex((l) => l.includes('"Mbyte","Kbyte"'));
    lines[units] = lines[units]!.replace('"Mbyte","Kbyte","%","usecond","%"', '"B","B","%","ns","%"');
    const embed = parseNcuRaw(lines.join('\n'))[0]!;
    expect(embed.time).toBeCloseTo(2e-9, 15);
    expect(embed.dramReadBytes).toBeCloseTo(0.52, 9);
    expect(embed.dramWriteBytes).toBe(1024);
  });

  it('sums time, DRAM traffic and time-weighted throughput per class and per kernel', () => {
    const s = summarise(parseNcuRaw(SAMPLE));
    expect(s.launches).toBe(13);
    expect(s.kernelTime).toBeCloseTo(272.5e-6, 12);
    expect(s.classes.map((c) => c.key)).toEqual([
      'GEMM',
      'GEMV',
      'attention',
      'elementwise',
      'norm',
      'sampler',
      'rope',
      'copy',
      'other',
    ]);
    const gemm = byKey(s.classes, 'GEMM');
    expect(gemm.launches).toBe(2);
    expect(gemm.time).toBeCloseTo(150e-6, 12);
    expect(gemm.share).toBeCloseTo(150 / 272.5, 9);
    expect(gemm.dramGBps).toBeCloseTo(254e6 / 150e-6 / 1e9, 6);
    expect(gemm.smPct).toBeCloseTo((80 * 100 + 70 * 50) / 150, 9);
    expect(gemm.memoryPct).toBeCloseTo((60 * 100 + 50 * 50) / 150, 9);
    const gemv = byKey(s.kernels, 'tandem_gemv_m1');
    expect(gemv.launches).toBe(2);
    expect(gemv.dramReadBytes).toBeCloseTo(220e6, 3);
    expect(gemv.dramGBps).toBeCloseTo((220e6 + 4000) / 84e-6 / 1e9, 6);
    expect(byKey(s.classes, 'elementwise').launches).toBe(2); // embed and silu_mul
    expect(byKey(s.classes, 'other').memoryPct).toBeUndefined();
    expect(s.classes.reduce((a, c) => a + c.share, 0)).toBeCloseTo(1, 12);

    const text = formatSummary(s, 3);
    expect(text).toMatch(/^13 kernel launches, 0\.27\d ms of kernel time, 0\.511 GB DRAM traffic/);
    expect(text).toContain('| GEMM | 2 | 0.150 | 55.0% | 75.0 | 250.0 | 4.0 | 1693 | 76.7 | 56.7 |  |');
    expect(text).toContain('| kernel (top 3 of 12) |');
  });

  it("reads the tensor pipe's share where the CSV has it, time-weighted like the others", () => {
    // A tensor-pipe column after the last: header, unit (%) and a value per launch (n/a for the last).
    const lines = SAMPLE.split('\n');
    const header = lines.findIndex((l) => l.startsWith('"ID"'));
    lines[header] += ',"sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"';
    lines[header + 1] += ',"%"';
    for (let i = header + 2, id = 0; i < lines.length; i++) {
      if (!/^"\d+"/.test(lines[i]!)) continue;
      lines[i] += id === 12 ? ',"n/a"' : `,"${10 * (id % 5)}"`;
      id++;
    }
    const launches = parseNcuRaw(lines.join('\n'));
    expect(launches[3]!.tensorPct).toBe(30);
    expect(launches[12]!.tensorPct).toBeUndefined();
    const s = summarise(launches);
    const gemm = byKey(s.classes, 'GEMM');
    const [a, b] = launches.filter((l) => kernelClass(l.name) === 'GEMM');
    expect(gemm.tensorPct).toBeCloseTo((a!.tensorPct! * a!.time + b!.tensorPct! * b!.time) / (a!.time + b!.time), 9);
    expect(formatSummary(s)).toMatch(/\| GEMM \| 2 \| 0\.150 \| 55\.0% \| .* \| 76\.7 \| 56\.7 \| \d+\.\d \|/);
  });

  it('classes the engine and cuBLAS kernels by name', () => {
    expect(kernelClass('tandem_flash_prefill2w4_d128')).toBe('attention');
    expect(kernelClass('tandem_gemv_swiglu_m2')).toBe('GEMV');
    expect(kernelClass('sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64')).toBe('GEMM');
    expect(kernelClass('void cublasLt::splitKreduce_kernel<32, 16, int, float>')).toBe('GEMM');
    expect(kernelClass('tandem_sample_finish')).toBe('sampler');
    expect(kernelClass('tandem_llama_add_rmsnorm')).toBe('norm');
    expect(kernelClass('tandem_llama_rope_kv')).toBe('rope');
    expect(kernelClass('tandem_llama_add_bias')).toBe('elementwise');
    expect(kernelClass('tandem_copy_chunks')).toBe('copy');
  });

  it('refuses output without the raw header or the time column with BadArgumentError', () => {
    expect(() => parseNcuRaw('==PROF== No kernels were profiled.\n')).toThrow(BadArgumentError);
    expect(() => parseNcuRaw('"ID","Kernel Name","dram__bytes_read.sum"\n"0","k","1"\n')).toThrow(
      /no gpu__time_duration.sum column/,
    );
    expect(() => parseNcuRaw('"ID","Kernel Name","gpu__time_duration.sum"\n"","","furlong"\n"0","k","1"\n')).toThrow(
      /unknown unit 'furlong'/,
    );
  });

  it('runs as a script: tables on stdout, JSON on --json, exit 2 with the reason on bad input', () => {
    const json = join(dir, 'summary.json');
    const r = runTs('scripts/ncu-summary.ts', [join(packageRoot, 'test/fixtures/ncu/decode-raw.csv'), '--json', json]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^\| class \| launches \| total ms/m);
    expect(r.stdout).toContain('| tandem_gemv_m1 | 2 |');
    const out = JSON.parse(readFileSync(json, 'utf8')) as { launches: number; classes: KernelGroup[] };
    expect(out.launches).toBe(13);
    expect(out.classes[0]!.key).toBe('GEMM');

    const empty = join(dir, 'empty.csv');
    writeFileSync(empty, '==PROF== No kernels were profiled.\n');
    const bad = runTs('scripts/ncu-summary.ts', [empty]);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/no ncu raw-page header/);
  });
});

describe('bench:engine --profile-case', () => {
  it('refuses a malformed case before anything loads, and the CPU engine, with exit 2', () => {
    const bad = runTs('bench/engine.ts', ['--device', 'cpu', '--profile-case', 'decode:64:512']);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--profile-case must be prefill:<tokens> or decode:b<batch>:ctx<context>/);
    const cpu = runTs('bench/engine.ts', ['--device', 'cpu', '--model', 'dummy:tiny', '--profile-case', 'prefill:8']);
    expect(cpu.status).toBe(2);
    expect(cpu.stderr).toMatch(/--profile-case profiles the GPU engine: it needs a CUDA device/);
  });
});

describe('scripts/profile-engine.sh', () => {
  it('runs ncu once per case and variant with the range flags, then summarises each report into OUT', () => {
    // A stand-in for ncu: a profiling run records its arguments and writes the report; --import prints the sample.
    const fake = join(dir, 'fake-ncu');
    const calls = join(dir, 'ncu-calls.txt');
    const tunes = join(dir, 'ncu-gemm-tune.txt'); // TANDEM_GEMM_TUNE as each profiling run saw it
    writeFileSync(
      fake,
      [
        '#!/usr/bin/env bash',
        'if [ "$1" = --version ]; then echo "Version 2025.3.0.0 (stand-in)"; exit 0; fi',
        'if [ "$1" = --query-metrics ]; then printf "Device NVIDIA H100\\nsm__pipe_tensor_op_hmma_cycles_active  Counter  cycle\\n"; exit 0; fi',
        `echo "$*" >> '${calls}'`,
        `if [ "$1" = --import ]; then cat '${join(packageRoot, 'test/fixtures/ncu/decode-raw.csv')}'; exit 0; fi`,
        `echo "\${TANDEM_GEMM_TUNE:-unset}" >> '${tunes}'`,
        'while [ "$1" != -o ]; do shift; done; touch "$2.ncu-rep"; shift 2',
        'for a in "$@"; do case "$a" in decode:*|prefill:*) echo "profiled $a: one forward, 1.00 ms wall";; esac; done',
      ].join('\n') + '\n',
    );
    chmodSync(fake, 0o755);
    const out = join(dir, 'profiles');
    // The script's ncu runs (not the --import ones), from a clean record, for these cases and environment; OUT
    // relative to the caller's directory, though the script runs from the package root.
    const profile = (cases: string[], env: Record<string, string> = {}): string[] => {
      writeFileSync(calls, '');
      writeFileSync(tunes, '');
      const r = spawnSync('bash', [join(packageRoot, 'scripts/profile-engine.sh'), 'profiles', ...cases], {
        cwd: dir,
        env: { ...process.env, NCU: fake, NODE: process.execPath, MODEL: 'dummy:tiny', ...env },
        encoding: 'utf8',
        timeout: 60_000,
      });
      expect(r.status, r.stderr).toBe(0);
      return readFileSync(calls, 'utf8')
        .trim()
        .split('\n')
        .filter((line) => !line.startsWith('--import'));
    };
    const runs = profile(['prefill:16', 'decode:b2:ctx32']);
    expect(readFileSync(tunes, 'utf8').trim().split('\n')).toEqual(['unset', 'unset', 'unset']);
    expect(runs).toHaveLength(3); // prefill once; decode as a graph and eagerly
    for (const run of runs) {
      expect(run).toMatch(/--profile-from-start off --clock-control none --graph-profiling node/);
      expect(run).toContain('--metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,');
      // The tensor pipe's share, asked for because this ncu lists the metric.
      expect(run).toMatch(/,sm__pipe_tensor_op_hmma_cycles_active\.avg\.pct_of_peak_sustained_active /);
      expect(run).toMatch(/bench\/engine\.ts --device cuda --model dummy:tiny --profile-case/);
      expect(run).not.toContain('--replay-mode'); // ncu's default, kernel replay
    }
    expect(runs[0]).toMatch(/--profile-case prefill:16 --graphs on$/);
    expect(runs[1]).toMatch(/--profile-case decode:b2:ctx32 --graphs on$/);
    expect(runs[2]).toMatch(/--profile-case decode:b2:ctx32 --graphs off$/);
    const summary = readFileSync(join(out, 'summary.md'), 'utf8');
    for (const heading of ['## prefill:16 (prefill)', '## decode:b2:ctx32 (graph)', '## decode:b2:ctx32 (eager)'])
      expect(summary).toContain(heading);
    expect(summary).toContain('profiled decode:b2:ctx32: one forward, 1.00 ms wall');
    expect(summary).toContain('| GEMM | 2 | 0.150 | 55.0% |');
    const eager = JSON.parse(readFileSync(join(out, 'decode-b2-ctx32-eager.json'), 'utf8')) as { launches: number };
    expect(eager.launches).toBe(13);

    // REPLAY=application: ncu reruns the benchmark per pass (a KV pool too large to save and restore per kernel).
    const replayed = profile(['decode:b2:ctx32'], { VARIANTS: 'graph', REPLAY: 'application' });
    expect(replayed).toHaveLength(1);
    expect(replayed[0]).toMatch(/--graph-profiling node --target-processes all --replay-mode application --metrics /);
    // Every pass must launch the same kernels: the heuristic's GEMM algorithms, not timed picks.
    expect(readFileSync(tunes, 'utf8').trim()).toBe('0');
  });
});
