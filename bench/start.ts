/**
 * npm run bench:start -- --dir DIR [--model dummy:llama-3.1-8b] [--shards 4] [--device cuda|cpu] [--runs 3]
 *                        [--torch auto|on|off] [--json FILE] [--svg FILE] [--keep]
 *
 * Start-up from a checkpoint on local disk, against the disk's own read rate and PyTorch (issue 22: a real 8B
 * checkpoint ready in <= 30 s).
 *
 * The checkpoint: DIR's own when it holds one (config.json with model.safetensors.index.json or model.safetensors;
 * kept afterwards), else one written there in the shape of --model's preset as published checkpoints are laid out:
 * config.json, `model-0000i-of-0000n.safetensors` shards of bf16 tensors in the manifest's order, cut into --shards
 * of about equal size, model.safetensors.index.json (written last: a checkpoint cut short by a failure is never taken
 * for a whole one), and the tokenizer of test/fixtures/hf-tiny-llama (384 ids; the vocabulary is raised to 384 where a
 * preset's is smaller, so that every id the tokenizer gives has an embedding row; bos and eos are the tokenizer's).
 * The values are finite and of the dummy generator's scale (1/sqrt(fan in); norms 1), tiled from a 2 MiB random
 * pattern per scale rather than drawn one by one, and written in 32 MiB sequential writes, with progress on stderr.
 * A written checkpoint is removed at the end (the folder too if this made it) unless --keep.
 *
 * Each run measures, in an order that rotates by one place per run, each on a cold page cache:
 *   disk        a plain sequential read of every shard file, 64 MiB reads into one buffer: the floor for any loader;
 *   Tandem      bench/start-tandem.ts in a fresh process: openModel on DIR until ready as a worker of `npm start`
 *               is (on a GPU with its engine warm-up), with the start-up log's phases;
 *   PyTorch     bench/start_torch.py in a fresh process per row, where python3 imports torch and safetensors (and
 *               --torch is not off): safetensors.torch.load_file of every shard onto the device, and, where
 *               transformers imports, AutoModelForCausalLM.from_pretrained(DIR, bfloat16, device_map=device).
 * Tandem's and PyTorch's times run from the call that opens the device to the weights on it (synchronised);
 * "process s" adds the interpreter's start and imports (spawn to ready; Tandem's child runs through tsx, which compiles
 * the TypeScript as it imports it, where `npm start` runs the built dist/).
 * Cold cache: before each measurement bench/start_cache.py fsyncs every file of the checkpoint and drops it from the
 * page cache with posix_fadvise(POSIX_FADV_DONTNEED) (no root needed; /proc/sys/vm/drop_caches where that leaves
 * pages cached and it is writable), then counts the pages still cached (mincore). Without python3: fsync and
 * `dd iflag=nocache count=0`, counted by `fincore`. A measurement whose files stayed cached (over 1%), or whose cache
 * could not be counted, is labelled "warm"; a checkpoint on tmpfs or ramfs "memory".
 *
 * Prints a table (median and min per row over the runs, GB/s, the share of the disk's rate, PyTorch's time over
 * Tandem's) and the phases of Tandem's median run; writes the JSON (default bench-results/start.json, rewritten
 * after every run, `complete: false` until the end) and an SVG chart beside it (--svg to place it elsewhere).
 * A failed Tandem or disk measurement: exit code 1 after the table (a PyTorch failure is a row's error only). Bad
 * options, a --dir that is a file or a folder of other files, too little free space, or --torch on without PyTorch:
 * exit code 2 and one line saying why, before anything is written.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  statfsSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { open } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ChartUnavailableError, panels, PANEL_HEIGHT, PANEL_WIDTH, writeChart } from '../lib/bench/chart.js';
import { median } from '../lib/bench/stats.js';
import { choiceOption, numberOption, UsageError } from '../lib/cli/args.js';
import { formatTable, percent, sig } from '../lib/bench/table.js';
import { expectedTensors, loadModelConfig, toHfConfig, type ModelConfig } from '../lib/engine/model/config.js';
import { dummyConfig, dummyTensorRecipe, Xoshiro128 } from '../lib/engine/model/dummy.js';
import { ByteProgress } from '../lib/engine/model/progress.js';
import {
  f32ToBf16,
  INDEX_FILE,
  numel,
  openSafetensors,
  safetensorsHeader,
  SINGLE_FILE,
} from '../lib/engine/model/safetensors.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const TANDEM_CHILD = join(ROOT, 'bench', 'start-tandem.ts');
const TORCH_CHILD = join(ROOT, 'bench', 'start_torch.py');
const CACHE_HELPER = join(ROOT, 'bench', 'start_cache.py');
const TOKENIZER_FIXTURE = join(ROOT, 'test', 'fixtures', 'hf-tiny-llama');
const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'];

/** Bytes per write while writing shards, and per read of the disk row. */
const WRITE_CHUNK = 32 * 2 ** 20;
const READ_CHUNK = 64 * 2 ** 20;
/** Every tensor starts at its own offset (from its name) in the first OFFSET_SPAN bytes of its scale's block. */
const OFFSET_SPAN = 32 * 2 ** 20;
/** Values in the random pattern tiled over a block: about 2 MiB of bf16, and no power of two, so rows differ. */
const PATTERN_VALUES = 2 ** 20 + 7;
/** Written data is flushed to the disk every this many bytes, so that progress shows the disk's rate, not memory's. */
const SYNC_EVERY = 2 ** 30;
/** Free space kept beyond the checkpoint's size. */
const SPACE_MARGIN = 256 * 2 ** 20;
/** A measurement whose files keep more than this share in the page cache after eviction is "warm". */
const COLD_RESIDENT_SHARE = 0.01;
/** A child process that takes longer is stopped. */
const CHILD_TIMEOUT_MS = 20 * 60_000;
const SEED = 0;

/** statfs type numbers of file systems held in memory, and of some common disk file systems (for the header). */
const MEMORY_FS: Record<number, string> = { 0x01021994: 'tmpfs', 0x858458f6: 'ramfs' };
const DISK_FS: Record<number, string> = {
  0xef53: 'ext4',
  0x58465342: 'xfs',
  0x9123683e: 'btrfs',
  0x794c7630: 'overlayfs',
  0x6969: 'nfs',
  0x65735546: 'fuse',
  0x2fc12fc1: 'zfs',
};

class StartUsageError extends Error {}

const USAGE = `usage: npm run bench:start -- --dir DIR [--model dummy:llama-3.1-8b] [--shards 4] [--device cuda|cpu]
         [--runs 3] [--torch auto|on|off] [--json FILE] [--svg FILE] [--keep]
  Start-up from a checkpoint in DIR (written there in --model's shape when DIR holds none; removed afterwards unless
  --keep): per run, on a cold page cache, a plain sequential read of the shards (the disk's floor), Tandem's openModel
  to ready in a fresh process, and PyTorch's safetensors load_file and transformers from_pretrained where python3
  imports torch (--torch auto; on: required; off: skipped). --shards 1 to 256, --runs 1 to 20.
  JSON: --json (default bench-results/start.json); SVG beside it unless --svg.
  On a GPU host without Node, through the bundle: ./run bench:start --dir /tmp/tandem-8b`;

/** Bytes as people read them: 16.1 GB, 412 MB, 98.3 kB. */
const gb = (bytes: number) =>
  bytes >= 1e9 ? `${(bytes / 1e9).toFixed(1)} GB` : bytes >= 1e6 ? `${sig(bytes / 1e6)} MB` : `${sig(bytes / 1e3)} kB`;
const progress = (line: string) => console.error(`bench:start: ${line}`);

// ---------------------------------------------------------------------------------------------------------------
// The checkpoint
// ---------------------------------------------------------------------------------------------------------------

interface Checkpoint {
  dir: string;
  /** Shard files, in order. */
  shards: string[];
  /** Bytes of the shard files (headers included): what the disk row reads. */
  fileBytes: number;
  /** Bytes of the tensors: what a loader moves to the device. */
  tensorBytes: number;
  tensors: number;
  config: ModelConfig;
}

/** Whether `dir` holds a checkpoint: config.json with an index or a single model.safetensors. */
function holdsCheckpoint(dir: string): boolean {
  return (
    existsSync(join(dir, 'config.json')) && (existsSync(join(dir, INDEX_FILE)) || existsSync(join(dir, SINGLE_FILE)))
  );
}

/** The files a loader reads (what the page cache is emptied of): the shards, the index, config and tokenizer. */
function checkpointFiles(c: Checkpoint): string[] {
  const small = ['config.json', 'generation_config.json', INDEX_FILE, ...TOKENIZER_FILES];
  return [...c.shards, ...small.map((f) => join(c.dir, f)).filter((f) => existsSync(f))];
}

/** The ids of the fixture tokenizer: its vocabulary size and its bos / eos ids. */
function fixtureTokenizer(): { vocabSize: number; bosId: number; eosId: number } {
  const tok = JSON.parse(readFileSync(join(TOKENIZER_FIXTURE, 'tokenizer.json'), 'utf8')) as {
    model: { vocab: Record<string, number> };
    added_tokens: { id: number; content: string }[];
  };
  const cfg = JSON.parse(readFileSync(join(TOKENIZER_FIXTURE, 'tokenizer_config.json'), 'utf8')) as {
    bos_token: string;
    eos_token: string;
  };
  const ids = [...Object.values(tok.model.vocab), ...tok.added_tokens.map((t) => t.id)];
  const idOf = (content: string) => {
    const t = tok.added_tokens.find((a) => a.content === content);
    if (!t) throw new Error(`${TOKENIZER_FIXTURE}/tokenizer.json has no token ${content}`);
    return t.id;
  };
  return { vocabSize: Math.max(...ids) + 1, bosId: idOf(cfg.bos_token), eosId: idOf(cfg.eos_token) };
}

/** The config of the checkpoint written for `model`: the preset's, with the fixture tokenizer's ids. */
function checkpointConfig(model: string): ModelConfig {
  const tok = fixtureTokenizer();
  const config = dummyConfig(model);
  return {
    ...config,
    vocabSize: Math.max(config.vocabSize, tok.vocabSize),
    bosTokenId: tok.bosId,
    eosTokenIds: [tok.eosId],
    torchDtype: 'bfloat16',
  };
}

interface PlannedShard {
  file: string;
  tensors: { name: string; shape: number[]; bytes: number }[];
  header: Buffer;
  bytes: number;
}

/**
 * The manifest's tensors cut into `count` shards of about equal size, in order: a tensor goes to the shard its
 * middle byte falls in. Throws StartUsageError when a shard would be empty (more shards than the sizes allow).
 */
function planShards(dir: string, config: ModelConfig, count: number): PlannedShard[] {
  const tensors = expectedTensors(config).map((t) => ({ ...t, bytes: numel(t.shape) * 2 }));
  const total = tensors.reduce((a, t) => a + t.bytes, 0);
  const groups: (typeof tensors)[] = Array.from({ length: count }, () => []);
  let before = 0;
  for (const t of tensors) {
    groups[Math.min(count - 1, Math.floor(((before + t.bytes / 2) * count) / total))]!.push(t);
    before += t.bytes;
  }
  if (groups.some((g) => g.length === 0))
    throw new StartUsageError(
      `--shards ${count}: the ${tensors.length} tensors of this model do not fill ${count} shards of about equal size`,
    );
  const pad = (i: number) => String(i).padStart(5, '0');
  return groups.map((group, i) => {
    const file = join(dir, `model-${pad(i + 1)}-of-${pad(count)}.safetensors`);
    const header = safetensorsHeader(
      file,
      group.map((t) => [t.name, { dtype: 'BF16', shape: t.shape }] as const),
      { format: 'pt' },
    );
    return { file, tensors: group, header, bytes: header.length + group.reduce((a, t) => a + t.bytes, 0) };
  });
}

/**
 * A block of bf16 values to write tensors from: a random pattern of PATTERN_VALUES values drawn as the dummy
 * generator draws (uniform, centred, `width` wide), tiled over WRITE_CHUNK + OFFSET_SPAN bytes; all ones for norms.
 */
function valueBlock(recipe: ReturnType<typeof dummyTensorRecipe>): Buffer {
  const block = Buffer.alloc(WRITE_CHUNK + OFFSET_SPAN);
  if (recipe.kind === 'ones') {
    const bits = f32ToBf16(Float32Array.of(1))[0]!;
    for (let i = 0; i < block.length; i += 2) block.writeUInt16LE(bits, i);
    return block;
  }
  const values = new Float32Array(PATTERN_VALUES);
  new Xoshiro128(...recipe.keys).fillCentered(values, 0, PATTERN_VALUES, recipe.width);
  const pattern = Buffer.from(f32ToBf16(values).buffer);
  for (let at = 0; at < block.length; at += pattern.length) pattern.copy(block, at);
  return block;
}

/**
 * Writes the checkpoint of `config` into `dir` (see the file's comment), adding every path written to `written` as
 * it goes (what a clean-up removes). Returns its seconds and the checkpoint.
 */
async function writeCheckpoint(
  dir: string,
  config: ModelConfig,
  shards: PlannedShard[],
  written: string[],
): Promise<{ seconds: number; checkpoint: Checkpoint }> {
  const total = shards.reduce((a, s) => a + s.bytes, 0);
  const started = performance.now();
  const bytesProgress = new ByteProgress('writing checkpoint', total, progress);
  const blocks = new Map<string, Buffer>();
  for (const shard of shards) {
    written.push(shard.file);
    const handle = await open(shard.file, 'w');
    try {
      await handle.write(shard.header);
      let unsynced = 0;
      for (const t of shard.tensors) {
        const recipe = dummyTensorRecipe(config, SEED, t.name);
        const key = recipe.kind === 'ones' ? 'ones' : String(recipe.width);
        let block = blocks.get(key);
        if (!block) blocks.set(key, (block = valueBlock(recipe)));
        // An even offset of its own in the block, from the name's hash (so that tensors of one scale differ).
        const start = recipe.kind === 'ones' ? 0 : (recipe.keys[2] % (OFFSET_SPAN / 2)) * 2;
        for (let left = t.bytes; left > 0;) {
          const n = Math.min(WRITE_CHUNK, left);
          const { bytesWritten } = await handle.write(block, start, n);
          if (bytesWritten !== n) throw new Error(`${shard.file}: short write (${bytesWritten} of ${n} bytes)`);
          left -= n;
          unsynced += n;
          bytesProgress.add(n);
          if (unsynced >= SYNC_EVERY) {
            await handle.datasync();
            unsynced = 0;
          }
        }
      }
      bytesProgress.add(shard.header.length);
      await handle.sync();
    } finally {
      await handle.close();
    }
  }
  bytesProgress.finish();
  const configFile = join(dir, 'config.json');
  written.push(configFile);
  writeFileSync(configFile, JSON.stringify(toHfConfig(config), null, 2) + '\n');
  for (const f of TOKENIZER_FILES) {
    written.push(join(dir, f));
    copyFileSync(join(TOKENIZER_FIXTURE, f), join(dir, f));
  }
  const weightMap: Record<string, string> = {};
  for (const s of shards) for (const t of s.tensors) weightMap[t.name] = basename(s.file);
  const tensorBytes = shards.reduce((a, s) => a + s.tensors.reduce((b, t) => b + t.bytes, 0), 0);
  const indexFile = join(dir, INDEX_FILE);
  written.push(indexFile);
  writeFileSync(
    indexFile,
    JSON.stringify({ metadata: { total_size: tensorBytes }, weight_map: weightMap }, null, 2) + '\n',
  );
  return {
    seconds: (performance.now() - started) / 1000,
    checkpoint: {
      dir,
      shards: shards.map((s) => s.file),
      fileBytes: total,
      tensorBytes,
      tensors: Object.keys(weightMap).length,
      config,
    },
  };
}

/** The checkpoint already in `dir`: its config and its shards' sizes (from the headers; no data is read). */
function existingCheckpoint(dir: string): Checkpoint {
  const config = loadModelConfig(dir);
  const checkpoint = openSafetensors(dir);
  try {
    const names = checkpoint.listTensors();
    const shards = [...new Set(names.map((n) => checkpoint.info(n).file))].sort();
    return {
      dir,
      shards,
      fileBytes: shards.reduce((a, f) => a + statSync(f).size, 0),
      tensorBytes: names.reduce((a, n) => a + checkpoint.info(n).byteLength, 0),
      tensors: names.length,
      config,
    };
  } finally {
    checkpoint.close();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The page cache
// ---------------------------------------------------------------------------------------------------------------

type CacheState = 'cold' | 'warm' | 'memory';

interface CacheReport {
  state: CacheState;
  /** posix_fadvise (bench/start_cache.py), dd iflag=nocache, or none. */
  method: string;
  /** Bytes of the checkpoint's files still cached after eviction; null when they could not be counted. */
  residentBytes: number | null;
  bytes: number;
  dropCaches: boolean;
}

/** Whether python3 can run bench/start_cache.py; settled by the first eviction. */
let pythonCache: boolean | undefined;

/** Pages of `files` in the page cache, counted by fincore (util-linux); null without it. */
function fincoreBytes(files: string[]): number | null {
  const r = spawnSync('fincore', ['--bytes', '--noheadings', '--raw', '--output', 'RES', ...files], {
    encoding: 'utf8',
  });
  if (r.error || r.status !== 0) return null;
  return r.stdout
    .trim()
    .split('\n')
    .reduce((a, line) => a + Number(line.trim()), 0);
}

/** Drops the checkpoint's files from the page cache and says how cold it is now (see the file's comment). */
function evictCache(files: string[], memoryFs: boolean): CacheReport {
  const bytes = files.reduce((a, f) => a + statSync(f).size, 0);
  const state = (resident: number | null): CacheState =>
    memoryFs ? 'memory' : resident !== null && resident <= bytes * COLD_RESIDENT_SHARE ? 'cold' : 'warm';
  if (pythonCache !== false) {
    const r = spawnSync('python3', [CACHE_HELPER, 'evict', ...files], { encoding: 'utf8', timeout: 300_000 });
    if (!r.error && r.status === 0) {
      pythonCache = true;
      const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { residentBytes: number; dropCaches: boolean };
      return {
        state: state(out.residentBytes),
        method: 'posix_fadvise',
        residentBytes: out.residentBytes,
        bytes,
        dropCaches: out.dropCaches,
      };
    }
    if (pythonCache === undefined)
      progress(
        `bench/start_cache.py could not run (${r.error?.message ?? r.stderr.trim().split('\n').pop()}): ` +
          'evicting with dd iflag=nocache instead',
      );
    pythonCache = false;
  }
  spawnSync('sync', files);
  let dd = true;
  for (const f of files) {
    const r = spawnSync('dd', [`if=${f}`, 'iflag=nocache', 'count=0', 'status=none']);
    dd &&= !r.error && r.status === 0;
  }
  const resident = fincoreBytes(files);
  return {
    state: state(resident),
    method: dd ? 'dd iflag=nocache' : 'none',
    residentBytes: resident,
    bytes,
    dropCaches: false,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------------------------

const ROW_KINDS = ['disk', 'tandem', 'torch-safetensors', 'torch-transformers'] as const;
type RowKind = (typeof ROW_KINDS)[number];
const ROW_LABELS: Record<RowKind, string> = {
  disk: 'disk: sequential read of the shards',
  tandem: 'Tandem: openModel to ready',
  'torch-safetensors': 'PyTorch: safetensors load_file',
  'torch-transformers': 'PyTorch: transformers from_pretrained',
};

interface Measurement {
  row: RowKind;
  cache: CacheReport;
  seconds?: number;
  /** Spawn to ready, the interpreter's start and imports included (child processes only). */
  processSeconds?: number;
  bytes?: number;
  /** Tandem: its start-up log; warm-up; whether the logits of a short prompt were finite. */
  log?: string[];
  warmUpMs?: number;
  finite?: boolean;
  /** PyTorch: how it loaded, and its versions. */
  method?: string;
  versions?: Record<string, string | null>;
  error?: string;
}

/** The disk's floor: every shard read front to back in READ_CHUNK reads into one buffer. */
async function readShards(shards: string[]): Promise<{ seconds: number; bytes: number }> {
  const buffer = Buffer.allocUnsafe(READ_CHUNK);
  const t0 = performance.now();
  let bytes = 0;
  for (const file of shards) {
    const handle = await open(file, 'r');
    try {
      for (;;) {
        const { bytesRead } = await handle.read(buffer, 0, READ_CHUNK, null);
        if (bytesRead === 0) break;
        bytes += bytesRead;
      }
    } finally {
      await handle.close();
    }
  }
  return { seconds: (performance.now() - t0) / 1000, bytes };
}

let runningChild: ChildProcess | undefined;

/**
 * Runs a child that prints one JSON line on stdout when done (with `readyAtMs`, the wall clock at ready), its stderr
 * passed through as progress; resolves with the JSON and processSeconds, from spawn to that ready; rejects with its
 * last stderr line.
 */
function runChild(
  command: string,
  args: string[],
  name: string,
): Promise<{ result: Record<string, unknown>; processSeconds: number }> {
  return new Promise((resolvePromise, reject) => {
    const spawnedAtMs = Date.now();
    // The checkpoint is local: transformers and huggingface_hub are told not to look for it online.
    const env = { ...process.env, HF_HUB_OFFLINE: '1', TRANSFORMERS_OFFLINE: '1' };
    const child = spawn(command, args, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
    runningChild = child;
    let stdout = '';
    let pending = '';
    let lastLine = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      const lines = (pending + d).split('\n');
      pending = lines.pop()!;
      for (const line of lines.filter((l) => l.trim())) {
        progress(`  ${line}`);
        lastLine = line;
      }
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), CHILD_TIMEOUT_MS);
    child.on('error', (e) => {
      clearTimeout(timer);
      runningChild = undefined;
      reject(new Error(`${name} could not be run (${e.message})`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      runningChild = undefined;
      if (pending.trim()) lastLine = pending.trim();
      if (code !== 0)
        return reject(
          new Error(
            `${name} exited with ${code ?? signal}${lastLine ? `: ${lastLine.replace(/^start[-_](tandem|torch): /, '')}` : ''}`,
          ),
        );
      try {
        const result = JSON.parse(stdout.trim().split('\n').pop()!) as Record<string, unknown>;
        resolvePromise({ result, processSeconds: ((result.readyAtMs as number) - spawnedAtMs) / 1000 });
      } catch {
        reject(new Error(`${name} printed no JSON result (${stdout.length} bytes on stdout)`));
      }
    });
  });
}

interface TorchProbe {
  available: boolean;
  reason?: string;
  torch?: string | null;
  safetensors?: string | null;
  transformers?: string | null;
  transformersReason?: string;
  device?: string | null;
}

/** What python3 imports here (bench/start_torch.py probe), and whether PyTorch rows can run on `device`. */
function probeTorch(device: 'cuda' | 'cpu'): TorchProbe {
  const r = spawnSync('python3', [TORCH_CHILD, 'probe'], { encoding: 'utf8', timeout: 180_000 });
  if (r.error) return { available: false, reason: `python3 could not be run (${r.error.message})` };
  if (r.status !== 0)
    return { available: false, reason: `bench/start_torch.py probe failed: ${r.stderr.trim().split('\n').pop()}` };
  const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as Omit<TorchProbe, 'available'> & { cuda: boolean };
  const reason = out.reason ?? (device === 'cuda' && !out.cuda ? `torch ${out.torch} sees no CUDA device` : undefined);
  return { available: reason === undefined, ...out, ...(reason ? { reason } : {}) };
}

async function measure(row: RowKind, c: Checkpoint, device: 'cuda' | 'cpu', memoryFs: boolean): Promise<Measurement> {
  const cache = evictCache(checkpointFiles(c), memoryFs);
  try {
    if (row === 'disk') {
      const { seconds, bytes } = await readShards(c.shards);
      return { row, cache, seconds, bytes };
    }
    if (row === 'tandem') {
      const { result, processSeconds } = await runChild(
        process.execPath,
        ['--import', 'tsx', TANDEM_CHILD, c.dir, device],
        'bench/start-tandem.ts',
      );
      const r = result as { seconds: number; log: string[]; warmUpMs?: number; finite: boolean };
      if (!r.finite)
        throw new Error('Tandem opened the checkpoint, but a short prompt gave logits that are not finite');
      const { seconds, log, warmUpMs, finite } = r;
      return {
        row,
        cache,
        seconds,
        processSeconds,
        bytes: c.tensorBytes,
        log,
        ...(warmUpMs !== undefined ? { warmUpMs } : {}),
        finite,
      };
    }
    const impl = row === 'torch-safetensors' ? 'safetensors' : 'transformers';
    const { result, processSeconds } = await runChild(
      'python3',
      [TORCH_CHILD, 'load', '--impl', impl, '--dir', c.dir, '--device', device],
      'bench/start_torch.py',
    );
    const r = result as {
      seconds: number;
      bytes: number;
      finite: boolean;
      method: string;
      torch: string;
      transformers: string | null;
    };
    const { seconds, bytes, finite, method } = r;
    return {
      row,
      cache,
      seconds,
      processSeconds,
      bytes,
      finite,
      method,
      versions: { torch: r.torch, transformers: r.transformers },
    };
  } catch (error) {
    return { row, cache, error: (error as Error).message };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Summary, table, JSON, chart
// ---------------------------------------------------------------------------------------------------------------

interface RowSummary {
  row: RowKind;
  label: string;
  /** Seconds of each run that succeeded, in run order. */
  seconds: number[];
  median: number | null;
  min: number | null;
  processMedian: number | null;
  bytes: number | null;
  gbPerS: number | null;
  /** 'cold' when every measurement was; 'memory' on tmpfs; else 'warm'. */
  cache: CacheState;
  /** The disk row's median / this row's: 1 means the loader runs at the disk's rate. */
  shareOfDiskRate: number | null;
  /** PyTorch rows: PyTorch's median / Tandem's (above 1: Tandem is faster). */
  torchOverTandem: number | null;
  errors: string[];
}

/** Tandem's start-up log as phases: "name: N ms" and "name: X GB in N ms (...)" lines. */
function phasesOf(log: readonly string[]): { phase: string; ms: number }[] {
  const phases: { phase: string; ms: number }[] = [];
  for (const line of log) {
    const m = /^(.+?): (?:[\d.]+ GB in )?(\d+) ms\b/.exec(line);
    if (m) phases.push({ phase: m[1]!, ms: Number(m[2]) });
  }
  return phases;
}

function summarise(rows: RowKind[], measurements: Measurement[]): RowSummary[] {
  const summaries = rows.map((row): RowSummary => {
    const ms = measurements.filter((m) => m.row === row);
    const ok = ms.filter((m) => m.seconds !== undefined);
    const seconds = ok.map((m) => m.seconds!);
    const processes = ok.filter((m) => m.processSeconds !== undefined).map((m) => m.processSeconds!);
    const med = seconds.length ? median(seconds) : null;
    const bytes = ok[0]?.bytes ?? null;
    const states = new Set(ms.map((m) => m.cache.state));
    return {
      row,
      label: ROW_LABELS[row],
      seconds,
      median: med,
      min: seconds.length ? Math.min(...seconds) : null,
      processMedian: processes.length ? median(processes) : null,
      bytes,
      gbPerS: med && bytes ? bytes / 1e9 / med : null,
      cache: states.has('memory') ? 'memory' : states.has('warm') ? 'warm' : 'cold',
      shareOfDiskRate: null,
      torchOverTandem: null,
      errors: ms.filter((m) => m.error !== undefined).map((m) => m.error!),
    };
  });
  const disk = summaries.find((s) => s.row === 'disk')?.median ?? null;
  const tandem = summaries.find((s) => s.row === 'tandem')?.median ?? null;
  for (const s of summaries) {
    if (s.row !== 'disk' && disk !== null && s.median) s.shareOfDiskRate = disk / s.median;
    if (s.row.startsWith('torch') && tandem && s.median !== null) s.torchOverTandem = s.median / tandem;
  }
  return summaries;
}

/** Tandem's run of median time (the lower middle of an even count). */
function medianTandemRun<M extends Measurement>(measurements: M[]): M | undefined {
  const ok = measurements.filter((m) => m.row === 'tandem' && m.seconds !== undefined);
  const sorted = [...ok].sort((a, b) => a.seconds! - b.seconds!);
  return sorted[(sorted.length - 1) >> 1];
}

function table(summaries: RowSummary[]): string {
  return formatTable(
    ['row', 'cache', 'median s', 'min s', 'GB/s', 'share of disk rate', 'PyTorch s / Tandem s', 'process s', 'runs'],
    summaries.map((s) => [
      s.label,
      s.cache,
      sig(s.median),
      sig(s.min),
      sig(s.gbPerS),
      s.shareOfDiskRate === null ? '' : percent(s.shareOfDiskRate),
      s.torchOverTandem === null ? '' : `${s.torchOverTandem.toFixed(2)}x`,
      sig(s.processMedian),
      `${s.seconds.length}${s.errors.length ? ` (${s.errors.length} failed)` : ''}`,
    ]),
  );
}

async function chart(file: string, title: string, summaries: RowSummary[], phases: { phase: string; ms: number }[]) {
  const rows = summaries
    .filter((s) => s.median !== null)
    .map((s) => ({ row: s.label, median: s.median!, min: s.min!, cache: s.cache }));
  const specs: Record<string, unknown>[] = [
    {
      width: PANEL_WIDTH,
      height: PANEL_HEIGHT,
      title: 'Seconds per row: bar the median, dot the fastest run',
      data: { values: rows },
      layer: [
        {
          mark: { type: 'bar', color: '#4c78a8' },
          encoding: {
            y: { field: 'row', type: 'nominal', title: null, sort: null, axis: { labelLimit: 400 } },
            x: { field: 'median', type: 'quantitative', title: 'seconds (lower is faster)', scale: { zero: true } },
          },
        },
        {
          mark: { type: 'point', filled: true, color: '#e45756', size: 80 },
          encoding: {
            y: { field: 'row', type: 'nominal', sort: null },
            x: { field: 'min', type: 'quantitative' },
          },
        },
      ],
    },
  ];
  if (phases.length)
    specs.push({
      width: PANEL_WIDTH,
      height: PANEL_HEIGHT,
      title: "Tandem's start-up phases (median run)",
      data: { values: phases },
      mark: { type: 'bar', color: '#59a14f' },
      encoding: {
        y: { field: 'phase', type: 'nominal', title: null, sort: null, axis: { labelLimit: 400 } },
        x: { field: 'ms', type: 'quantitative', title: 'ms', scale: { zero: true } },
      },
    });
  await writeChart(file, panels({ text: 'Tandem bench:start: start-up from a checkpoint', subtitle: title }, specs, 1));
}

// ---------------------------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------------------------

/** The nearest folder of `path` that exists (for statfs of a folder not made yet). */
function existingAncestor(path: string): string {
  let p = resolve(path);
  while (!existsSync(p) && dirname(p) !== p) p = dirname(p);
  return p;
}

async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      dir: { type: 'string' },
      model: { type: 'string', default: 'dummy:llama-3.1-8b' },
      shards: { type: 'string', default: '4' },
      device: { type: 'string', default: 'cuda' },
      runs: { type: 'string', default: '3' },
      torch: { type: 'string', default: 'auto' },
      json: { type: 'string', default: 'bench-results/start.json' },
      svg: { type: 'string' },
      keep: { type: 'boolean', default: false },
      help: { type: 'boolean' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  if (!values.dir) throw new StartUsageError('--dir is required: the folder of the checkpoint (written there if none)');
  const dir = resolve(values.dir);
  const device = choiceOption('device', values.device, ['cuda', 'cpu'] as const)!;
  const runs = numberOption('runs', values.runs, { integer: true, min: 1, max: 20 })!;
  const shardCount = numberOption('shards', values.shards, { integer: true, min: 1, max: 256 })!;
  choiceOption('torch', values.torch, ['auto', 'on', 'off'] as const);
  if (!values.model.startsWith('dummy:'))
    throw new StartUsageError(
      `--model must be dummy:<preset>, the shape of the checkpoint to write (got ${values.model})`,
    );
  let config: ModelConfig;
  try {
    config = checkpointConfig(values.model);
  } catch (error) {
    throw new StartUsageError(`--model: ${(error as Error).message}`);
  }

  // DIR: a checkpoint to reuse, or a new or empty folder to write one into.
  const dirExisted = existsSync(dir);
  if (dirExisted && !statSync(dir).isDirectory()) throw new StartUsageError(`--dir ${dir} is a file, not a folder`);
  const reuse = dirExisted && holdsCheckpoint(dir);
  if (dirExisted && !reuse && readdirSync(dir).length > 0)
    throw new StartUsageError(
      `--dir ${dir} holds files but no checkpoint (config.json with ${INDEX_FILE} or ${SINGLE_FILE}): ` +
        'name a new or empty folder, or one with a checkpoint',
    );
  let existing: Checkpoint | undefined;
  if (reuse)
    try {
      existing = existingCheckpoint(dir);
    } catch (error) {
      throw new StartUsageError(`--dir ${dir}: its checkpoint cannot be read: ${(error as Error).message}`);
    }

  const torch: TorchProbe = values.torch === 'off' ? { available: false, reason: '--torch off' } : probeTorch(device);
  if (values.torch === 'on' && !torch.available)
    throw new StartUsageError(`--torch on, but PyTorch cannot run here: ${torch.reason}`);

  const fs = statfsSync(existingAncestor(dir));
  const fsType = MEMORY_FS[fs.type] ?? DISK_FS[fs.type] ?? `type 0x${fs.type.toString(16)}`;
  const memoryFs = fs.type in MEMORY_FS;
  const free = fs.bavail * fs.bsize;
  let plan: PlannedShard[] | undefined;
  if (!reuse) {
    plan = planShards(dir, config, shardCount);
    const need = plan.reduce((a, s) => a + s.bytes, 0);
    if (need + SPACE_MARGIN > free)
      throw new StartUsageError(
        `the checkpoint needs ${gb(need)} (and ${gb(SPACE_MARGIN)} to spare); the filesystem of ${dir} has ${gb(free)} free`,
      );
  }
  progress(`${dir}: filesystem ${fsType}, ${gb(free)} free of ${gb(fs.blocks * fs.bsize)}`);
  if (memoryFs)
    progress(`${dir} is on ${fsType}, which is memory: the disk row measures memory, and every row is labelled so`);

  // From here on, a written checkpoint is removed however the benchmark ends (unless --keep).
  const written: string[] = [];
  let cleaned = false;
  const cleanUp = () => {
    if (cleaned || reuse) return;
    cleaned = true;
    if (values.keep) return progress(`kept the checkpoint in ${dir} (--keep)`);
    if (!dirExisted) rmSync(dir, { recursive: true, force: true });
    else for (const f of written) rmSync(f, { force: true });
    progress(`removed the checkpoint written in ${dir}`);
  };
  const onSignal = (signal: NodeJS.Signals) => {
    runningChild?.kill('SIGKILL');
    progress(`${signal}: stopping`);
    cleanUp();
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  try {
    let checkpoint: Checkpoint;
    let writeSeconds: number | undefined;
    if (existing) {
      checkpoint = existing;
      progress(
        `reusing the checkpoint in ${dir} (${checkpoint.shards.length} shard(s), ${gb(checkpoint.fileBytes)}, ` +
          `${checkpoint.tensors} tensors, ${checkpoint.config.architecture} with ${checkpoint.config.numLayers} layers); ` +
          'it stays there, and --model and --shards are not used',
      );
    } else {
      mkdirSync(dir, { recursive: true });
      progress(
        `writing a ${values.model} checkpoint (bf16, ${plan!.length} shards, ${gb(plan!.reduce((a, s) => a + s.bytes, 0))}) to ${dir}`,
      );
      const out = await writeCheckpoint(dir, config, plan!, written);
      checkpoint = out.checkpoint;
      writeSeconds = out.seconds;
      progress(
        `wrote the checkpoint in ${writeSeconds.toFixed(1)} s (${sig(checkpoint.fileBytes / 1e9 / writeSeconds)} GB/s)`,
      );
    }

    const rows: RowKind[] = ['disk', 'tandem'];
    if (torch.available) {
      rows.push('torch-safetensors');
      if (torch.transformers) rows.push('torch-transformers');
      else progress(`no transformers row: ${torch.transformersReason ?? 'transformers does not import'}`);
    } else progress(`no PyTorch rows: ${torch.reason}`);

    const measurements: (Measurement & { run: number })[] = [];
    const describe = () =>
      `${checkpoint.config.architecture}, ${checkpoint.shards.length} shard(s), ${gb(checkpoint.fileBytes)} on ${fsType}; ` +
      `${device}; ${runs} run(s) in rotating order; page cache before each: ${[...new Set(measurements.map((m) => `${m.cache.method}${m.cache.dropCaches ? ' + drop_caches' : ''}`))].join(', ') || '-'}`;
    const writeJson = (complete: boolean) => {
      const summaries = summarise(rows, measurements);
      const median = medianTandemRun(measurements);
      mkdirSync(dirname(resolve(values.json)), { recursive: true });
      writeFileSync(
        values.json,
        JSON.stringify(
          {
            bench: 'start',
            complete,
            description: describe(),
            checkpoint: {
              dir,
              reused: reuse,
              model: reuse ? null : values.model,
              shards: checkpoint.shards.map((f) => ({ file: basename(f), bytes: statSync(f).size })),
              fileBytes: checkpoint.fileBytes,
              tensorBytes: checkpoint.tensorBytes,
              tensors: checkpoint.tensors,
              config: checkpoint.config,
              ...(writeSeconds !== undefined ? { writeSeconds } : {}),
            },
            filesystem: { type: fsType, memory: memoryFs, freeBytes: free, totalBytes: fs.blocks * fs.bsize },
            device,
            runs,
            torch,
            rows: summaries,
            tandemPhases: median ? { run: median.run, phases: phasesOf(median.log ?? []) } : null,
            measurements,
          },
          null,
          2,
        ) + '\n',
      );
    };

    for (let run = 0; run < runs; run++) {
      const order = rows.map((_, i) => rows[(i + run) % rows.length]!);
      for (const row of order) {
        progress(`run ${run + 1} of ${runs}: ${ROW_LABELS[row]}`);
        const m = await measure(row, checkpoint, device, memoryFs);
        measurements.push({ run: run + 1, ...m });
        progress(
          m.error !== undefined
            ? `run ${run + 1}: ${ROW_LABELS[row]} failed: ${m.error}`
            : `run ${run + 1}: ${ROW_LABELS[row]}: ${m.seconds!.toFixed(2)} s, ${sig(m.bytes! / 1e9 / m.seconds!)} GB/s ` +
                `(page cache ${m.cache.state}${m.cache.residentBytes !== null ? `, ${gb(m.cache.residentBytes)} still cached` : ''})`,
        );
      }
      writeJson(run === runs - 1);
    }

    const summaries = summarise(rows, measurements);
    console.log(`bench:start: ${describe()}`);
    console.log(
      'median and min over the runs; Tandem and PyTorch from the call that opens the device to the weights on it ' +
        '(Tandem with its engine warm-up, as npm start before /health); process s adds the interpreter and imports; ' +
        'share of disk rate = disk s / row s; cache "cold" = under 1% of the files cached when it began',
    );
    console.log(table(summaries));
    const medianRun = medianTandemRun(measurements);
    const phases = medianRun ? phasesOf(medianRun.log ?? []) : [];
    if (medianRun) {
      console.log(`Tandem's start-up, run ${medianRun.run} (the median):`);
      for (const p of phases) console.log(`  ${p.phase}: ${p.ms} ms`);
    }
    for (const s of summaries) for (const e of s.errors) console.log(`${s.label}: failed: ${e}`);
    console.log(`wrote ${values.json}`);
    const svg = values.svg ?? values.json.replace(/\.json$/, '') + '.svg';
    try {
      await chart(svg, describe(), summaries, phases);
      console.log(`wrote ${svg}`);
    } catch (error) {
      if (!(error instanceof ChartUnavailableError)) throw error;
      console.log(`no chart: ${error.message}`);
    }
    const failed = summaries.filter((s) => (s.row === 'disk' || s.row === 'tandem') && s.errors.length);
    return failed.length ? 1 : 0;
  } finally {
    cleanUp();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (error) {
  if (
    error instanceof StartUsageError ||
    error instanceof UsageError ||
    (error instanceof TypeError && String((error as { code?: unknown }).code).startsWith('ERR_PARSE_ARGS'))
  ) {
    console.error(`bench:start: ${error.message}`);
    process.exitCode = 2;
  } else throw error;
}
