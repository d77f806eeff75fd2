/**
 * Forecasts of the next planning interval's load from the intervals seen so far. One interface, `Forecaster`
 * (observe a value, predict the next); the planner takes any. Defaults: Holt's linear trend for the request rate
 * (a rate that ramps is caught a step early), a moving mean for ISL and OSL (they drift, they do not trend).
 */
import { BadArgumentError } from '../errors.js';

export interface Forecaster {
  /** The model, for decision logs: `holt(alpha=0.5, beta=0.3)`. */
  readonly name: string;
  observe(value: number): void;
  /** The next value; undefined before any observation. */
  predict(): number | undefined;
}

function checkUnit(name: string, v: number): void {
  if (!(v > 0 && v <= 1)) throw new BadArgumentError(`${name} must be in (0, 1] (got ${String(v)})`);
}

function checkValue(v: number): void {
  if (typeof v !== 'number' || !Number.isFinite(v))
    throw new BadArgumentError(`a forecast observes finite numbers (got ${String(v)})`);
}

/**
 * Holt's linear trend (double exponential smoothing): level l and trend b, updated on each value y as
 *   l' = alpha y + (1 - alpha)(l + b),   b' = beta (l' - l) + (1 - beta) b,
 * started from l = y0, b = 0. The forecast one step ahead is l + b, never below 0 (a load is not negative).
 */
export class HoltLinearForecaster implements Forecaster {
  readonly name: string;
  private level: number | undefined;
  private trend = 0;

  constructor(
    readonly alpha = 0.5,
    readonly beta = 0.3,
  ) {
    checkUnit('alpha', alpha);
    checkUnit('beta', beta);
    this.name = `holt(alpha=${alpha}, beta=${beta})`;
  }

  observe(value: number): void {
    checkValue(value);
    if (this.level === undefined) {
      this.level = value;
      return;
    }
    const level = this.alpha * value + (1 - this.alpha) * (this.level + this.trend);
    this.trend = this.beta * (level - this.level) + (1 - this.beta) * this.trend;
    this.level = level;
  }

  predict(): number | undefined {
    return this.level === undefined ? undefined : Math.max(0, this.level + this.trend);
  }
}

/** The mean of the last `window` values. */
export class MovingMeanForecaster implements Forecaster {
  readonly name: string;
  private readonly values: number[] = [];

  constructor(readonly window = 5) {
    if (!Number.isSafeInteger(window) || window < 1)
      throw new BadArgumentError(`window must be a positive integer (got ${String(window)})`);
    this.name = `moving-mean(window=${window})`;
  }

  observe(value: number): void {
    checkValue(value);
    this.values.push(value);
    if (this.values.length > this.window) this.values.shift();
  }

  predict(): number | undefined {
    if (this.values.length === 0) return undefined;
    return this.values.reduce((a, b) => a + b, 0) / this.values.length;
  }
}

/** One interval's load: requests per second, mean prompt and output tokens per request. */
export interface LoadSample {
  rate: number;
  isl: number;
  osl: number;
}

/** A forecast of rate, ISL and OSL, each by its own Forecaster. */
export class LoadForecast {
  readonly rate: Forecaster;
  readonly isl: Forecaster;
  readonly osl: Forecaster;

  constructor(models: Partial<Record<keyof LoadSample, Forecaster>> = {}) {
    this.rate = models.rate ?? new HoltLinearForecaster();
    this.isl = models.isl ?? new MovingMeanForecaster();
    this.osl = models.osl ?? new MovingMeanForecaster();
  }

  observe(sample: LoadSample): void {
    this.rate.observe(sample.rate);
    this.isl.observe(sample.isl);
    this.osl.observe(sample.osl);
  }

  /** The next interval's load (lengths rounded up to whole tokens); undefined before any sample. */
  predict(): LoadSample | undefined {
    const rate = this.rate.predict();
    const isl = this.isl.predict();
    const osl = this.osl.predict();
    if (rate === undefined || isl === undefined || osl === undefined) return undefined;
    return { rate, isl: Math.max(1, Math.ceil(isl)), osl: Math.max(1, Math.ceil(osl)) };
  }

  /** The models, for decision logs. */
  get models(): Record<keyof LoadSample, string> {
    return { rate: this.rate.name, isl: this.isl.name, osl: this.osl.name };
  }
}
