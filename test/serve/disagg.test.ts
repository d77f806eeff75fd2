import { describe, expect, it } from 'vitest';
import {
  DEFAULT_DISAGGREGATION_THRESHOLDS,
  DEFAULT_MAX_PREFILL_QUEUE,
  DEFAULT_MIN_REMOTE_PREFILL_TOKENS,
  shouldPrefillRemotely,
} from '../../lib/router/disagg.js';

const MIN = DEFAULT_MIN_REMOTE_PREFILL_TOKENS;
const QUEUE = DEFAULT_MAX_PREFILL_QUEUE;

describe('shouldPrefillRemotely', () => {
  it('uses the named defaults', () => {
    expect(DEFAULT_DISAGGREGATION_THRESHOLDS).toEqual({ minRemotePrefillTokens: MIN, maxPrefillQueue: QUEUE });
  });

  it('prompt length: remote from exactly minRemotePrefillTokens uncached tokens', () => {
    const at = (uncachedPromptTokens: number) =>
      shouldPrefillRemotely({ uncachedPromptTokens, prefillQueueDepth: 0, prefillWorkersAvailable: 1 });
    expect(at(0)).toBe(false);
    expect(at(MIN - 1)).toBe(false);
    expect(at(MIN)).toBe(true);
    expect(at(MIN + 1)).toBe(true);
  });

  it('queue: remote while fewer than maxPrefillQueue requests wait per available prefill worker', () => {
    const at = (prefillQueueDepth: number, prefillWorkersAvailable = 1) =>
      shouldPrefillRemotely({ uncachedPromptTokens: MIN, prefillQueueDepth, prefillWorkersAvailable });
    expect(at(QUEUE - 1)).toBe(true);
    expect(at(QUEUE)).toBe(false);
    expect(at(QUEUE + 1)).toBe(false);
    expect(at(2 * QUEUE - 1, 2)).toBe(true);
    expect(at(2 * QUEUE, 2)).toBe(false);
  });

  it('no prefill worker: always local', () => {
    expect(
      shouldPrefillRemotely({ uncachedPromptTokens: 100 * MIN, prefillQueueDepth: 0, prefillWorkersAvailable: 0 }),
    ).toBe(false);
  });

  it('takes thresholds from the graph', () => {
    const t = { minRemotePrefillTokens: 1, maxPrefillQueue: 1 };
    expect(
      shouldPrefillRemotely({ uncachedPromptTokens: 1, prefillQueueDepth: 0, prefillWorkersAvailable: 1 }, t),
    ).toBe(true);
    expect(
      shouldPrefillRemotely({ uncachedPromptTokens: 0, prefillQueueDepth: 0, prefillWorkersAvailable: 1 }, t),
    ).toBe(false);
    expect(
      shouldPrefillRemotely({ uncachedPromptTokens: 1, prefillQueueDepth: 1, prefillWorkersAvailable: 1 }, t),
    ).toBe(false);
  });
});
