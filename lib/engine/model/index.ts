export * from './config.js';
export * from './safetensors.js';
export * from './dummy.js';
export * from './tokenizer-bytes.js';
export * from './manifest.js';
