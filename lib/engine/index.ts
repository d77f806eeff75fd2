/**
 * The reference engine: a Llama-family model (HF checkpoint or `dummy:<preset>`) on a paged KV cache with
 * continuous batching. `openModel` is the entry point; `Engine` is the interface a worker hosts (and an
 * external engine could implement); `ModelRunner` is the contract for the math underneath.
 */
export * from './engine.js';
export { LlmEngine, type LlmEngineOptions } from './llm-engine.js';
export { KvBlockManager, type KvBlockManagerOptions } from './block-manager.js';
export { DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS } from './scheduler.js';
export { CpuModelRunner, loadWeights, type CpuModelRunnerOptions, type NamedTensor, type WeightSource } from './cpu.js';
export type { ForwardBatch, ModelRunner } from './runner.js';
export { openModel, type OpenModelOptions, type OpenedModel } from './open.js';
export {
  byteTextTokenizer,
  loadTokenizer,
  type ChatMessage,
  type StreamDecoder,
  type TextTokenizer,
} from './tokenizer.js';
export * from './model/index.js';
