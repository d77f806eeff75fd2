/**
 * Benchmarks of serving: `tandem bench serve` (npm run bench:serve), its load generator, workloads, trace
 * parser, statistics, reports and charts. The chart helpers (chart.ts) serve bench:transfer and bench:engine too.
 */
export {
  ARRIVAL_KINDS,
  arrivalTimesMs,
  drawLengths,
  formatLengthSpec,
  parseLengthSpec,
  seededSource,
  unitIntervals,
  type ArrivalKind,
  type ArrivalSpec,
  type LengthSpec,
} from './distributions.js';
export { MOONCAKE_BLOCK_TOKENS, TraceFormatError, loadTrace, parseTrace, type TraceRequest } from './trace.js';
export { PromptFactory, PROMPT_APIS, type PromptApi, type FittedPrompt } from './prompts.js';
export {
  workloadRequests,
  workloadShape,
  type SharedPrefixSpec,
  type WorkloadRequest,
  type WorkloadShape,
  type WorkloadSpec,
} from './workload.js';
export {
  DEFAULT_SLO,
  PERCENTILES,
  distribution,
  meetsSlo,
  percentile,
  runStats,
  tpotMs,
  type Distribution,
  type RequestTiming,
  type RunStats,
  type Slo,
} from './stats.js';
export { LoadProcess, runLoad, timeRequest, type LoadOptions, type LoadRequest, type LoadTarget } from './load.js';
export {
  BenchTargetError,
  benchServe,
  benchTokenizer,
  requestBody,
  serverRoot,
  servedModel,
  sweepPoints,
  type BenchServeConfig,
  type BenchServeReport,
  type BenchUi,
  type LoadPoint,
  type LoadSweep,
  type PointResult,
  type TargetResult,
  type TargetSpec,
} from './serve.js';
export {
  comparisonTable,
  describeRun,
  formatReport,
  targetTable,
  writeReportJson,
  writeServeCharts,
} from './report.js';
export { BENCH_SERVE_HELP, benchServeMain, parseBenchServeArgs, ProgressLine, QUICK } from './command.js';
export {
  BYTES_LABEL,
  ChartUnavailableError,
  colourScheme,
  NUMBER_LABEL,
  panels,
  renderSvg,
  scaleFor,
  writeChart,
  type ChartSpec,
} from './chart.js';
