#!/usr/bin/env python3
"""The PyTorch side of `npm run bench:engine` (bench/engine.ts runs it on the same GPU, after Tandem's rows).

    python3 bench/engine_torch.py CASES_JSON      (or the JSON on stdin)

CASES_JSON: {"model": {hiddenSize, intermediateSize, numLayers, numHeads, numKvHeads, headDim, vocabSize,
              ropeTheta, rmsNormEps, tieWordEmbeddings},
             "prefill": [ISL, ...], "decode": [{"batch": B, "context": C}, ...],
             "warmup": {"prefill": N, "decode": N}, "repeats": {"prefill": N, "decode": N},
             "transformers": true|false, "ceilings": {"gemm": 8192, "copyBytes": 1073741824}, "device": 0}

Two implementations of the same Llama shape, random bf16 weights:
  plain         the Llama below: fused QKV and gate/up projections, RMSNorm, RoPE, GQA attention with
                torch.nn.functional.scaled_dot_product_attention (enable_gqa=True), a static KV cache.
                Prefill: one sequence of ISL tokens, SDPA causal, eager. Decode: B sequences, every one with C
                tokens in its cache; one step (new token's K/V written at position C-1, attention over the C
                cached tokens, lm_head, greedy argmax) captured in a CUDA graph per case and replayed. The cache
                holds small constant values (not a prefilled prompt): a step's time does not depend on them.
  transformers  LlamaForCausalLM from a config (attn_implementation="sdpa", random init, bf16), prefill rows
                only, last-token logits only (logits_to_keep=1), where transformers imports.
RoPE runs with plain theta frequencies (llama3 scaling only changes the frequencies, not the work).
Every case: `warmup` untimed runs, then `repeats` timed ones, each between two CUDA events; the median.
Ceilings: torch.matmul bf16 n^3 (TFLOP/s) and a device-to-device copy_ (GB/s = bytes copied / time).

Prints one JSON object on stdout; progress on stderr. A case that fails (out of memory, say) becomes a row with
"error" and the rest go on; bad input or no usable GPU exits 2 with one line on stderr.
"""
import gc
import json
import statistics
import sys
import time


def progress(line):
    print(f"engine_torch: {line}", file=sys.stderr, flush=True)


def fail(message, code=2):
    print(f"engine_torch: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001 - any import failure means the same to the caller
    fail(f"cannot import torch: {type(e).__name__}: {e}")

MODEL_FIELDS = ("hiddenSize", "intermediateSize", "numLayers", "numHeads", "numKvHeads", "headDim", "vocabSize",
                "ropeTheta", "rmsNormEps")


class PlainLlama:
    """A Llama forward in plain PyTorch: weights as bf16 tensors, K/V caches passed in."""

    def __init__(self, m, max_positions, device):
        self.m = m
        h, d, i = m["hiddenSize"], m["headDim"], m["intermediateSize"]
        self.nh, self.nkv, self.d, self.eps = m["numHeads"], m["numKvHeads"], d, m["rmsNormEps"]
        qkv = (self.nh + 2 * self.nkv) * d

        def w(*shape):  # N(0, 0.02): keeps activations finite through the layers
            return torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02

        self.embed = w(m["vocabSize"], h)
        self.lm_head = self.embed if m.get("tieWordEmbeddings") else w(m["vocabSize"], h)
        self.norm = torch.ones(h, device=device, dtype=torch.bfloat16)
        self.layers = [dict(ln1=torch.ones(h, device=device, dtype=torch.bfloat16), wqkv=w(qkv, h),
                            wo=w(h, self.nh * d), ln2=torch.ones(h, device=device, dtype=torch.bfloat16),
                            wgu=w(2 * i, h), wdown=w(h, i)) for _ in range(m["numLayers"])]
        inv_freq = 1.0 / (m["ropeTheta"] ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv_freq)
        self.cos, self.sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)

    @staticmethod
    def rope(x, cos, sin):  # x [B, heads, T, D]; cos, sin [B, 1, T, D/2]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, tokens, positions, caches, write_at=None):
        """tokens, positions [B, T]. Prefill (write_at None): K/V go to caches[l][:, :, :T], causal attention over
        the T tokens. Decode (T = 1): K/V go to cache slot write_at (a [1] tensor), attention over every slot."""
        b, t = tokens.shape
        nh, nkv, d = self.nh, self.nkv, self.d
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        for layer, (k_cache, v_cache) in zip(self.layers, caches):
            hn = F.rms_norm(x, (x.shape[-1],), layer["ln1"], self.eps)
            q, k, v = F.linear(hn, layer["wqkv"]).split([nh * d, nkv * d, nkv * d], dim=-1)
            q = self.rope(q.view(b, t, nh, d).transpose(1, 2), cos, sin)
            k = self.rope(k.view(b, t, nkv, d).transpose(1, 2), cos, sin)
            v = v.view(b, t, nkv, d).transpose(1, 2)
            if write_at is None:
                k_cache[:, :, :t].copy_(k)
                v_cache[:, :, :t].copy_(v)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                k_cache.index_copy_(2, write_at, k)
                v_cache.index_copy_(2, write_at, v)
                o = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
            x = x + F.linear(o.transpose(1, 2).reshape(b, t, nh * d), layer["wo"])
            gate, up = F.linear(F.rms_norm(x, (x.shape[-1],), layer["ln2"], self.eps), layer["wgu"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer["wdown"])
        last = F.rms_norm(x[:, -1], (x.shape[-1],), self.norm, self.eps)
        return F.linear(last, self.lm_head)  # [B, vocab]: the last token's logits

    def caches(self, batch, length, device):
        shape = (batch, self.nkv, length, self.d)
        # 0.0115 everywhere, like the byte 0x3c that bench:engine fills Tandem's KV pool with: finite, not zero.
        return [(torch.full(shape, 0.0115, device=device, dtype=torch.bfloat16),
                 torch.full(shape, 0.0115, device=device, dtype=torch.bfloat16)) for _ in self.layers]


def time_ms(fn, warmup, repeats):
    """ms of each of `repeats` calls of fn between CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)


def timing(ms):
    return {"samples": len(ms), "msP50": statistics.median(ms), "msMin": ms[0], "msMax": ms[-1]}


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def run_case(rows, base, fn):
    """Appends base + fn()'s fields, or base + the error of a case that failed, and frees what it left."""
    try:
        rows.append({**base, **fn()})
    except Exception as e:  # noqa: BLE001 - out of memory, an SDPA backend refusing a shape: the case fails alone
        message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append({**base, "error": message})
        progress(f"{base['impl']} {base['phase']} batch {base['batch']} context {base['context']}: {message}")
    free_memory()


def ceilings(spec, device):
    n = int(spec.get("gemm", 8192))
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_ms = statistics.median(time_ms(lambda: torch.matmul(a, b), 5, 20))
    del a, b
    nbytes = int(spec.get("copyBytes", 2 ** 30))
    src = torch.ones(nbytes, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = statistics.median(time_ms(lambda: dst.copy_(src), 2, 20))
    del src, dst
    free_memory()
    return {"gemmN": n, "gemmMs": gemm_ms, "gemmTflops": 2 * n ** 3 / (gemm_ms * 1e9), "copyBytes": nbytes,
            "copyMs": copy_ms, "copyGBps": nbytes / (copy_ms * 1e6)}


def plain_rows(cases, m, device):
    rows = []
    prefill, decode = cases.get("prefill", []), cases.get("decode", [])
    max_positions = max([*prefill, *(c["context"] for c in decode), 1])
    model = PlainLlama(m, max_positions, device)
    wp, rp = cases["warmup"]["prefill"], cases["repeats"]["prefill"]
    wd, rd = cases["warmup"]["decode"], cases["repeats"]["decode"]

    def prefill_case(isl):
        tokens = torch.randint(0, 256, (1, isl), device=device)
        positions = torch.arange(isl, device=device).unsqueeze(0)
        caches = model.caches(1, isl, device)
        return timing(time_ms(lambda: model.forward(tokens, positions, caches), wp, rp))

    def decode_case(batch, context):
        caches = model.caches(batch, context, device)
        tokens = torch.randint(0, 256, (batch, 1), device=device)
        positions = torch.full((batch, 1), context - 1, device=device)
        write_at = torch.tensor([context - 1], device=device)

        def step():
            return model.forward(tokens, positions, caches, write_at).argmax(dim=-1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs documents
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        try:
            return {**timing(time_ms(graph.replay, wd, rd)), "cudaGraph": True}
        finally:
            del graph

    with torch.inference_mode():
        for isl in prefill:
            progress(f"plain prefill {isl} tokens")
            run_case(rows, {"impl": "plain", "phase": "prefill", "batch": 1, "tokens": isl, "context": isl},
                     lambda: prefill_case(isl))
        for c in decode:
            b, ctx = c["batch"], c["context"]
            progress(f"plain decode batch {b} at context {ctx} (CUDA graph)")
            run_case(rows, {"impl": "plain", "phase": "decode", "batch": b, "tokens": b, "context": ctx},
                     lambda: decode_case(b, ctx))
    del model
    free_memory()
    return rows


def transformers_rows(cases, m, device):
    """(rows, version, reason): transformers' prefill rows, or no rows and why."""
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:  # noqa: BLE001
        return [], None, f"cannot import transformers: {type(e).__name__}: {e}"
    prefill = cases.get("prefill", [])
    fields = dict(vocab_size=m["vocabSize"], hidden_size=m["hiddenSize"], intermediate_size=m["intermediateSize"],
                  num_hidden_layers=m["numLayers"], num_attention_heads=m["numHeads"],
                  num_key_value_heads=m["numKvHeads"], head_dim=m["headDim"], rms_norm_eps=m["rmsNormEps"],
                  max_position_embeddings=max([*prefill, 2048]), tie_word_embeddings=bool(m.get("tieWordEmbeddings")))
    progress(f"transformers {transformers.__version__}: LlamaForCausalLM from a config, random bf16 weights")
    try:
        # transformers 5 keeps theta in rope_parameters; 4.x takes rope_theta.
        try:
            config = LlamaConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": m["ropeTheta"]})
        except TypeError:
            config = LlamaConfig(**fields, rope_theta=m["ropeTheta"])
        with torch.device(device):
            try:
                model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
            except TypeError:
                model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
        model = model.to(device).eval()  # a transformers that ignored the device context initialised it on the CPU
    except Exception as e:  # noqa: BLE001
        free_memory()
        return [], transformers.__version__, f"LlamaForCausalLM could not be built: {type(e).__name__}: {e}"
    rows = []
    wp, rp = cases["warmup"]["prefill"], cases["repeats"]["prefill"]

    def prefill_case(isl):
        ids = torch.randint(0, 256, (1, isl), device=device)
        return timing(time_ms(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), wp, rp))

    with torch.inference_mode():
        for isl in prefill:
            progress(f"transformers prefill {isl} tokens")
            run_case(rows, {"impl": "transformers", "phase": "prefill", "batch": 1, "tokens": isl, "context": isl},
                     lambda: prefill_case(isl))
    del model
    free_memory()
    return rows, transformers.__version__, None


def read_cases():
    text = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()
    try:
        cases = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"the cases are not JSON: {e}")
    if not isinstance(cases, dict) or not isinstance(cases.get("model"), dict):
        fail("the cases need a 'model' object")
    missing = [f for f in MODEL_FIELDS if not isinstance(cases["model"].get(f), (int, float))]
    if missing:
        fail(f"the model lacks numeric field(s): {', '.join(missing)}")
    if not all(isinstance(n, int) and n > 0 for n in cases.setdefault("prefill", [])):
        fail("'prefill' must be a list of positive token counts")
    for c in cases.setdefault("decode", []):
        if not (isinstance(c, dict) and isinstance(c.get("batch"), int) and isinstance(c.get("context"), int)
                and c["batch"] > 0 and c["context"] > 0):
            fail(f"each 'decode' case needs positive integers batch and context (got {c!r})")
    for key, default in (("warmup", {"prefill": 1, "decode": 3}), ("repeats", {"prefill": 5, "decode": 20})):
        got = cases.get(key, {})
        cases[key] = {phase: int(got.get(phase, default[phase])) for phase in ("prefill", "decode")}
        if min(cases[key].values()) < (0 if key == "warmup" else 1):
            fail(f"'{key}' counts must be {'>= 0' if key == 'warmup' else '>= 1'}")
    return cases


def main():
    cases = read_cases()
    if not torch.cuda.is_available():
        fail("torch sees no CUDA device")
    device = torch.device("cuda", int(cases.get("device", 0)))
    torch.cuda.set_device(device)
    started = time.perf_counter()
    out = {"torch": torch.__version__, "cudaRuntime": torch.version.cuda, "deviceName": torch.cuda.get_device_name(device)}
    progress(f"torch {out['torch']} (CUDA {out['cudaRuntime']}) on {out['deviceName']}")
    out["ceilings"] = ceilings(cases.get("ceilings", {}), device)
    progress(f"ceilings: bf16 GEMM {out['ceilings']['gemmTflops']:.0f} TFLOP/s, copy {out['ceilings']['copyGBps']:.0f} GB/s")
    rows = plain_rows(cases, cases["model"], device)
    out["transformers"] = None
    if cases.get("transformers", True):
        hf_rows, version, reason = transformers_rows(cases, cases["model"], device)
        rows += hf_rows
        out["transformers"] = version
        if reason:
            out["transformersReason"] = reason
            progress(f"no transformers rows: {reason}")
    else:
        out["transformersReason"] = "not asked for"
    out["rows"] = rows
    out["seconds"] = time.perf_counter() - started
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - one clear line for bench:engine instead of a traceback mid-table
        fail(f"{type(e).__name__}: {e}", 1)
